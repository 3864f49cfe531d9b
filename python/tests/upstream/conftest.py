# Upstream's scripts are run as programs by ../test_upstream_pair.py (with the environment they
# read), never collected by pytest directly.
collect_ignore_glob = ["*.py"]
