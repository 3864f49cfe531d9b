"""Merges the JSON files of several `transfer-engine bench` invocations into one:
merge_bench_json.py OUT IN... The run fields (first_operation_us, open_segment_us, ...) are the
first input's; results are concatenated in input order, and the copy ceilings
(--memcpy-reference) of each operation and block size are the best any input measured. An input that does not exist (its case
failed) is skipped, so the other cases still count; with none, OUT is not written."""
import json
import os
import sys

docs = [json.load(open(path)) for path in sys.argv[2:] if os.path.exists(path)]
if docs:
    merged = docs[0]
    merged["results"] = [r for d in docs for r in d["results"]]
    ceilings, one_thread = {}, {}
    for d in docs:
        for op, blocks in (d.get("memcpy_gbps_by_operation") or {}).items():
            for block, gbps in blocks.items():
                ceilings.setdefault(op, {})[block] = max(gbps, ceilings.get(op, {}).get(block, 0.0))
        for block, gbps in (d.get("memcpy_1thread_gbps") or {}).items():
            one_thread[block] = max(gbps, one_thread.get(block, 0.0))
    if ceilings:
        merged["memcpy_gbps_by_operation"] = ceilings
    # What the ceilings copied between, each kind once (several mean the inputs differ).
    kinds = list(dict.fromkeys(d["memcpy_copies_between"] for d in docs if d.get("memcpy_copies_between")))
    if kinds:
        merged["memcpy_copies_between"] = "; ".join(kinds)
    if one_thread:
        merged["memcpy_1thread_gbps"] = one_thread
    with open(sys.argv[1], "w") as f:
        json.dump(merged, f, indent=1)
