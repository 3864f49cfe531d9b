# Sourced by the device checks: the bin directory ($1, else a release build), the plugin search
# path, out/, and plugin_status PROTOCOL (the probe's answer: available, hardware absent, ...).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bin=${1:-}
if [ -z "$bin" ]; then
    swift build -c release --manifest-cache none >/dev/null || exit 1
    bin=$(swift build -c release --show-bin-path)
fi
export MC_TRANSPORT_PLUGIN_PATH=$bin MC_STRICT_PROTOCOL=1
mkdir -p out

plugin_status() {
    "$bin/transfer-engine" plugins --json 2>/dev/null \
        | python3 -c "import json,sys; print(next((r['status'] for r in json.load(sys.stdin)['plugins'] if r['protocol']=='$1'), 'missing'))"
}
