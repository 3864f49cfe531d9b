#!/usr/bin/env bash
# Fuzzes every decoder of peer, descriptor and metadata-server input with libFuzzer and
# AddressSanitizer (Fuzz/Sources/Fuzz.swift): JSON, segment descriptors, handshake frames, HTTP
# messages, RESP replies, TCP data headers, a live data server's request loop (one connection per
# input), names/sizes/metadata URLs, GPU peer descriptors, and the transport plugins' handshake
# and peer-descriptor decoders through their C vtable (plugin-<protocol>: each plugin is built
# with the same sanitizers and loaded as the host loads it; one without hardware here says so).
#
#   scripts/fuzz.sh                    # each target for 60 s
#   scripts/fuzz.sh --seconds 20       # scripts/test.sh runs this short form
#   scripts/fuzz.sh --seconds 600 http # one target, longer
#
# Seeds come from Fuzz/corpus/<target>/; what libFuzzer finds on top goes to .build-fuzz/corpus
# (kept between runs). A crash stops the script with the reproducer's path (crash-*, in out/fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=60
if [ "${1:-}" = --seconds ]; then seconds=$2; shift 2; fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(json descriptor handshake http resp tcp-header data-server segment-name gpu-descriptor
                                     plugin-shm plugin-cxl plugin-efa plugin-nvmeof plugin-rdma plugin-ascend)
echo "== building the fuzz harness (libFuzzer + AddressSanitizer, scratch .build-fuzz)"
# --export-dynamic: the plugins, instrumented too, take the sanitizer runtime from the harness.
flags=(--manifest-cache none --scratch-path .build-fuzz -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library -Xlinker --export-dynamic)
TE_FUZZ=1 swift build "${flags[@]}" --product te-fuzz 2>&1 | grep -v "Cannot export local symbol" | grep -E "error|warning:|complete" | tail -5
mkdir -p out/fuzz
described=$(TE_FUZZ=1 swift package --manifest-cache none describe --type json 2>/dev/null || true)
for target in "${targets[@]}"; do
    case "$target" in plugin-*)
        product="transport_${target#plugin-}"
        # A plugin whose -dev package is missing is not a product here (the harness then says so);
        # one that is a product must build.
        if grep -q "\"$product\"" <<< "$described"; then
            if ! TE_FUZZ=1 swift build "${flags[@]}" --product "$product" > "out/fuzz-build-$product.log" 2>&1; then
                grep -E "error" "out/fuzz-build-$product.log" | head -20 >&2
                echo "FAIL: $product did not build for fuzzing" >&2
                exit 1
            fi
        fi ;;
    esac
done
binary=$(TE_FUZZ=1 swift build --scratch-path .build-fuzz --show-bin-path)/te-fuzz
export TE_FUZZ_PLUGIN_DIR=$(dirname "$binary")
# ascend runs over the tests' stand-in CANN (no CANN here), its one "NPU" being host memory.
export TE_FUZZ_ASCEND_STANDIN=$PWD/.build-fuzz/libstandin_cann.so
cc -shared -fPIC -O1 -DSTANDIN_NPUS_DEFAULT=1 -DSTANDIN_DIR_DEFAULT="\"$PWD/.build-fuzz/standin-servers\"" \
    Tests/TransferEngineTests/Fixtures/standin_cann.c -o "$TE_FUZZ_ASCEND_STANDIN"
for target in "${targets[@]}"; do
    corpus=.build-fuzz/corpus/$target
    mkdir -p "$corpus" "Fuzz/corpus/$target"
    echo "== $target: $seconds s"
    if ! TE_FUZZ_TARGET=$target ASAN_OPTIONS=detect_leaks=0 "$binary" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="out/fuzz/$target-" -print_final_stats=1 "$corpus" "Fuzz/corpus/$target" > "out/fuzz/$target.log" 2>&1; then
        tail -40 "out/fuzz/$target.log" >&2
        echo "FAIL: $target crashed; reproducer: $(ls out/fuzz/$target-* 2>/dev/null | head -1)" >&2
        exit 1
    fi
    if grep -q "^SKIPPED" "out/fuzz/$target.log"; then
        grep "^SKIPPED" "out/fuzz/$target.log"
        # shm, cxl and ascend (over the stand-in) need no hardware: a skip there means the harness or the plugin is broken.
        case "$target" in plugin-shm|plugin-cxl|plugin-ascend) echo "FAIL: $target must run on every machine" >&2; exit 1 ;; esac
        continue
    fi
    grep -E "stat::number_of_executed_units|stat::new_units_added" "out/fuzz/$target.log" | tr '\n' ' '
    echo
done
echo "PASS: no crash in ${#targets[@]} targets"
