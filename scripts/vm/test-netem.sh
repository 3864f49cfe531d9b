#!/usr/bin/env bash
# Runs the network fault tests (NetworkFaultTests: a partition mid-batch, a vanished peer, and
# delay and packet loss with tc netem in both directions) in the test guest, whose Debian kernel
# has sch_netem and veth; the machine running the test command may lack netem (there the
# delay/loss test is skipped with that reason). Build first: swift build --build-tests.
#   scripts/vm/test-netem.sh            # about a minute
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/vm/guest-suite.sh
guest_test_binary transfer-engine "swift build"
inner=$(mktemp -p "$PWD" .netem-guest.XXXXXX.sh)
trap 'rm -f "$inner" "${guest_log:-}"' EXIT
cat > "$inner" <<INNER
set -u
modprobe -a veth sch_netem || exit 125
"$tests" --testing-library swift-testing --filter NetworkFaultTests
INNER
run_guest_suite "Network faults between namespaces" -t "${TE_NETEM_TEST_TIMEOUT:-600}" --script "$inner"
if [ "$rc" = 0 ] && grep -q 'delay and loss.*skipped' "$guest_log"; then
    echo "error: the netem test was skipped in the guest" >&2
    rc=1
fi
exit "$rc"
