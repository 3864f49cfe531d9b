#!/bin/bash
# Runs INSIDE the rxe guest (scripts/vm/run-in-rxe-guest.sh --script scripts/vm/rdma-bench.sh):
# perftest (ib_write_bw, ib_read_bw, ib_read_lat) and `transfer-engine bench --protocol rdma`
# in the same boot, so their ratio is the figure (absolute numbers are emulation speed). The
# bandwidth ceilings run two perftest pairs at once (summed), as the plugin posts from two threads.
# Writes out/perftest-*.txt and out/bench-rdma.json; scripts/bench_summary.py prints the ratios.
set -u
DEV=${RXE_DEV:-rxe0}
IP=${RXE_IP:-10.77.0.1}
BIN=${TE_BIN:-$(ls -d .build/release 2>/dev/null || echo .build/debug)}
BIN=${BIN#$PWD/}
GIDX=$(grep -l "$(printf '0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x' ${IP//./ })" \
    /sys/class/infiniband/$DEV/ports/1/gids/* | head -1 | xargs -n1 basename)
mkdir -p out
pair() { # output-file command args... (server, then client to $IP)
    local out=$1; shift
    timeout 150 "$@" >/dev/null 2>&1 &
    local server=$!
    sleep 1
    timeout 120 "$@" "$IP" > "$out" 2>&1
    wait $server
    grep -A1 -E "#bytes" "$out" | tail -1
}
two_pairs() { # output-file-prefix command args...: two pairs at once on their own ports, as the
    # plugin posts from two threads on two QPs (one pair would be a single-thread ceiling)
    local out=$1; shift
    pair "$out.txt" "$@" -p 18515 > "$out.line" &
    local first=$!
    pair "$out-2.txt" "$@" -p 18516 > "$out-2.line"
    wait $first
    echo "$(cat "$out.line") | $(cat "$out-2.line")"
    rm -f "$out.line" "$out-2.line"
}
bandwidth_ceiling() { # block size, file suffix ("" right before its bench case, "-again" right after)
    local size=$1 n=$(($1 > 65536 ? 300 : 2000))
    # scripts/bench.sh --quick: a quarter (with a tenth, thirty 1 MiB reads spent much of their
    # time starting, so the pairs overlapped badly and their sum fell under the engine's figure)
    [ "${TE_QUICK:-0}" = 1 ] && n=$((n / 4))
    echo -n "ib_write_bw $size (two pairs): "; two_pairs out/perftest-write-bw-$size$2 ib_write_bw -d "$DEV" -x "$GIDX" -s $size -n $n -F
    echo -n "ib_read_bw $size (two pairs): "; two_pairs out/perftest-read-bw-$size$2 ib_read_bw -d "$DEV" -x "$GIDX" -s $size -n $n -F
}
sync_ceilings() { # file suffix, as bandwidth_ceiling: one 4 KiB transfer at a time, as a synchronous one
    # is posted and completed. Writes: ib_write_bw with one in flight (its rate is 4 KiB over the
    # mean time per write). Reads: ib_read_lat (one read and its completion per sample, median).
    # (ib_write_lat reports half of a ping-pong in which both sides poll memory: not a completed write.)
    # 2000 in quick mode too (about a second each): 200 read well below the steady rate.
    local n=2000
    echo -n "ib_write_bw 4096, one in flight: "; pair out/perftest-write-bw-4096-t1$1.txt ib_write_bw -d "$DEV" -x "$GIDX" -s 4096 -t 1 -n $n -F
    echo -n "ib_read_lat 4096: "; pair out/perftest-read-lat-4096$1.txt ib_read_lat -d "$DEV" -x "$GIDX" -s 4096 -n $n -F
}
bench_rc=0
engine() { # name, bench arguments...: one `transfer-engine bench` invocation, out/bench-rdma-<name>.json
    local name=$1; shift
    MC_STRICT_PROTOCOL=1 MC_TRANSPORT_PLUGIN_PATH=$PWD/$BIN timeout 600 "$BIN/transfer-engine" bench --loopback --protocol rdma \
        --duration ${TE_DURATION:-2} --working-set 8MiB --no-reference --json out/bench-rdma-$name.json "$@" $extra 2>&1 | grep -v "^\["
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || bench_rc=$rc
}
extra="$*"
rm -f out/perftest-*.txt out/bench-rdma.json out/bench-rdma-*.json
# Emulation speed drifts within a boot, so each ceiling is measured right before and right after
# the engine cases it bounds (the summary takes the better); the cases without a ceiling run last.
echo "== perftest on $DEV (GID index $GIDX) around each transfer-engine bench --protocol rdma case ($BIN)"
for size in 65536 1048576; do
    bandwidth_ceiling $size ""
    engine bw-$size --block-sizes $size --batch-sizes 64
    bandwidth_ceiling $size "-again"
done
sync_ceilings ""
engine sync --block-sizes 4KiB --batch-sizes 1
sync_ceilings "-again"
engine rest-x64 --block-sizes 4KiB --batch-sizes 64
engine rest-x1 --block-sizes 64KiB,1MiB --batch-sizes 1
python3 scripts/vm/merge_bench_json.py out/bench-rdma.json out/bench-rdma-*.json
rm -f out/bench-rdma-*.json
exit "$bench_rc"
