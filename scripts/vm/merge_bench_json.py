"""Merges the JSON files of several `transfer-engine bench` invocations into one:
merge_bench_json.py OUT IN... The run fields (first_operation_us, open_segment_us, ...) are the
first input's; results are concatenated in input order. An input that does not exist (its case
failed) is skipped, so the other cases still count; with none, OUT is not written."""
import json
import os
import sys

docs = [json.load(open(path)) for path in sys.argv[2:] if os.path.exists(path)]
if docs:
    merged = docs[0]
    merged["results"] = [r for d in docs for r in d["results"]]
    with open(sys.argv[1], "w") as f:
        json.dump(merged, f, indent=1)
