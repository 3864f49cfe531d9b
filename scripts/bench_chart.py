"""Draws the results of scripts/bench.sh (out/*.json, out/fi_rma_probe*.txt, out/iperf3.json) as
one chart, out/bench.png and out/bench.svg: GB/s and p50 latency against block size, writes on the
left and reads on the right, one line per transport and batch size, and the references measured in
the same run (the official engine, raw libfabric, iperf3, memcpy) dashed. Needs matplotlib
(Debian: python3-matplotlib; scripts/setup.sh installs it); without it, says so and draws nothing."""
import glob
import json
import os
import re
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "out"
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("bench_chart: matplotlib is not installed (apt-get install python3-matplotlib); no chart drawn")
    sys.exit(0)


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def label_of(path, doc):
    """The transport a bench JSON measured, from its name: bench.json is tcp."""
    name = os.path.basename(path)[len("bench"):-len(".json")].lstrip("-")
    protocol = doc.get("protocol", "tcp")
    if name == "ws8":
        return f"{protocol} (8 MiB working set)"
    if name.startswith("efa-"):
        return f"efa over {'tcp;ofi_rxm' if name.endswith('tcp') else 'shm'}"
    return protocol if not name else name


# series[(op, metric)] = [(label, style, [(block, value)])]
series = {}


def add(op, metric, label, points, dashed=False):
    points = sorted(p for p in points if p[1] is not None and p[1] > 0)
    if points:
        series.setdefault((op, metric), []).append((label, "--" if dashed else "-", points))


for path in sorted(glob.glob(os.path.join(out, "bench*.json"))):
    doc = load(path)
    if not doc or "results" not in doc:
        continue
    label = label_of(path, doc)
    batches = sorted({r["batch_size"] for r in doc["results"]})
    for op in ("write", "read"):
        for batch in batches:
            rows = [r for r in doc["results"] if r["operation"] == op and r["batch_size"] == batch]
            add(op, "gbps", f"{label} x{batch}", [(r["block_size"], r["gbps"]) for r in rows])
            add(op, "p50", f"{label} x{batch}", [(r["block_size"], r["p50_us"]) for r in rows])
            loaded = [r for r in rows if r.get("loaded")]
            if loaded:
                busy = doc.get("background_load_threads", 1)
                add(op, "gbps", f"{label} x{batch}, {busy} busy", [(r["block_size"], r["loaded"]["gbps"]) for r in loaded])
                add(op, "p50", f"{label} x{batch}, {busy} busy", [(r["block_size"], r["loaded"]["p50_us"]) for r in loaded])
        memcpy = (doc.get("memcpy_gbps_by_operation") or {}).get(op) or doc.get("memcpy_gbps") or {}
        if memcpy:
            threads = doc.get("memcpy_threads", 1)
            add(op, "gbps", f"memcpy ({threads} thread{'s' if threads > 1 else ''}, {label}'s buffers)", [(int(k), v) for k, v in memcpy.items()],
                dashed=True)

official = load(os.path.join(out, "official.json")) or {}
by_case = {}
for key, value in official.items():
    m = re.match(r"(write|read) (\d+) (KiB|MiB|GiB|B) x(\d+)", key)
    if m and isinstance(value, dict):
        size = int(m.group(2)) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(3)]
        by_case.setdefault((m.group(1), int(m.group(4)), ""), []).append((size, value.get("gbps"), value.get("p50_us")))
        loaded = value.get("loaded") or {}
        if loaded:
            busy = official.get("background_load_threads", 1)
            by_case.setdefault((m.group(1), int(m.group(4)), f", {busy} busy"), []).append((size, loaded.get("gbps"), loaded.get("p50_us")))
for (op, batch, busy), points in by_case.items():
    add(op, "gbps", f"official engine tcp x{batch}{busy}", [(s, g) for s, g, _ in points], dashed=True)
    add(op, "p50", f"official engine tcp x{batch}{busy}", [(s, p) for s, _, p in points], dashed=True)

for name, label in (("fi_rma_probe.txt", "libfabric tcp;ofi_rxm"), ("fi_rma_probe-shm.txt", "libfabric shm")):
    points = {"write": [], "read": []}
    try:
        for line in open(os.path.join(out, name)):
            m = re.search(r"(fi_write|fi_read)\s+size=\s*(\d+).*?([\d.]+) MB/s\s+([\d.]+) us/op", line)
            if m:
                points["write" if m.group(1) == "fi_write" else "read"].append((int(m.group(2)), float(m.group(3)) / 1000))
    except OSError:
        continue
    for op, values in points.items():
        add(op, "gbps", label, values, dashed=True)

iperf = load(os.path.join(out, "iperf3.json")) or {}
iperf_gbps = ((iperf.get("end") or {}).get("sum_received") or {}).get("bits_per_second", 0) / 8e9

if not series:
    print(f"bench_chart: no results in {out}; no chart drawn")
    sys.exit(0)

# One colour per line label, the same in every panel (tab20 has twenty; more repeat).
labels = sorted({label for lines in series.values() for label, _, _ in lines})
palette = plt.get_cmap("tab20")
colour = {label: palette(i % 20) for i, label in enumerate(labels)}

figure, axes = plt.subplots(2, 2, figsize=(15, 10), sharex=True)
for column, op in enumerate(("write", "read")):
    for row, (metric, title) in enumerate((("gbps", "GB/s"), ("p50", "p50 latency (us)"))):
        ax = axes[row][column]
        for label, style, points in series.get((op, metric), []):
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o" if style == "-" else "s", markersize=3,
                    color=colour[label], label=label)
        if metric == "gbps" and iperf_gbps > 0:
            ax.axhline(iperf_gbps, linestyle=":", color="grey", label="iperf3 (1 TCP stream)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{op}: {title}")
        ax.grid(True, which="both", alpha=0.3)
        if row == 1:
            ax.set_xlabel("block size (bytes)")
        ax.legend(fontsize=7)
figure.suptitle("transfer-engine bench (scripts/bench.sh): this run's transports and references")
figure.tight_layout()
for extension in ("png", "svg"):
    figure.savefig(os.path.join(out, f"bench.{extension}"), dpi=90)
print(f"bench_chart: wrote {out}/bench.png and {out}/bench.svg")
