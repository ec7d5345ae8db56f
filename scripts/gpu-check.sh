#!/usr/bin/env bash
# kiln's GPU check, in two halves (see ARCHITECTURE and GPU notes):
#
#   scripts/gpu-check.sh build   on the development machine (no GPU needed):
#       builds the CUDA test binaries in release mode, strips them into
#       .gpu/bin/ and writes .gpu/run.sh. The bundle carries everything: the
#       kernels are embedded in the binaries and compiled on the GPU machine
#       by its own NVRTC.
#   .gpu/run.sh [REPORT.md]      on the GPU machine, from the repository root:
#       prints the GPU, runs the NVRTC compile test and every parity test,
#       and writes a markdown report (default .gpu/report.md).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-build}" != "build" ]; then
    echo "usage: scripts/gpu-check.sh build" >&2
    exit 2
fi

bundle=.gpu
rm -rf "$bundle"
mkdir -p "$bundle/bin"

echo "building CUDA test binaries..."
cargo test --release --no-run --message-format=json --test cuda_parity --test nvrtc >"$bundle/build.json"
python3 - "$bundle" <<'PY'
import json, shutil, sys, os
bundle = sys.argv[1]
for line in open(os.path.join(bundle, "build.json")):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["kind"] == ["test"]:
        name = msg["target"]["name"]
        shutil.copy(msg["executable"], os.path.join(bundle, "bin", name))
        print(f"bundled {name}")
PY
rm "$bundle/build.json"
strip "$bundle"/bin/* 2>/dev/null || true
git rev-parse HEAD >"$bundle/commit"
git status --porcelain | grep -q . && echo "dirty" >>"$bundle/commit" || true

cat >"$bundle/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs on the GPU machine from the repository root. Writes a markdown report.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
report=${1:-$here/report.md}

# The GPU machine's own NVRTC: PTX from a newer NVRTC than the driver is refused.
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
    if ls "$dir"/libnvrtc.so* >/dev/null 2>&1; then
        export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        nvrtc_dir=$dir
        break
    fi
done
export KILN_REQUIRE_NVRTC=1
export KILN_CACHE_DIR="$here/ptx-cache"

{
    echo "# kiln GPU check"
    echo
    echo "- date: $(date -u +%Y-%m-%d)"
    echo "- commit: $(head -n 1 "$here/commit")$(grep -q dirty "$here/commit" && echo ' (with uncommitted changes)')"
    echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi unavailable')"
    echo "- CUDA (nvidia-smi): $(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' || echo unknown)"
    echo "- NVRTC library: ${nvrtc_dir:-not found} ($(ls "${nvrtc_dir:-/nonexistent}"/libnvrtc.so.* 2>/dev/null | head -n 1 | xargs -r basename))"
    echo
    echo '```'
    nvidia-smi 2>&1 | head -n 20
    echo '```'
} >"$report"

status=0
for test in nvrtc cuda_parity; do
    echo "== $test"
    {
        echo
        echo "## $test"
        echo
        echo '```'
    } >>"$report"
    if ! "$here/bin/$test" --test-threads=1 --nocapture 2>&1 | tee -a "$report"; then
        status=1
    fi
    echo '```' >>"$report"
done
echo "report: $report"
exit $status
RUN
chmod +x "$bundle/run.sh"
du -sh "$bundle"
echo "bundle ready: run .gpu/run.sh on the GPU machine (from the repository root)"
