#!/usr/bin/env bash
# kiln's GPU check, in two halves (see ARCHITECTURE and GPU notes):
#
#   scripts/gpu-check.sh build   on the development machine (no GPU needed):
#       builds in release mode the CUDA test binaries (cuda_parity, nvrtc),
#       the bench binaries (kernels, train_step) and the kiln CLI, strips
#       them into .gpu/bin.tar.xz, copies scripts/compare-pytorch.py beside
#       them and writes .gpu/run.sh. The bundle carries everything: the
#       kernels are embedded in the binaries and compiled on the GPU machine
#       by its own NVRTC. The data (data/, git-ignored) travels separately.
#   .gpu/run.sh [REPORT.md] [PART...]   on the GPU machine, from the
#       repository root: parity tests, benches, the PyTorch comparison and
#       short CUDA training runs, each under its own time budget, into a
#       markdown report (default .gpu/report.md). Its header lists the parts
#       and the environment variables that tune them.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-build}" != "build" ]; then
    echo "usage: scripts/gpu-check.sh build" >&2
    exit 2
fi

bundle=.gpu
rm -rf "$bundle"
mkdir -p "$bundle/bin"

echo "building the CUDA test binaries, the benches and the CLI (release)..."
cargo test --release --no-run --message-format=json --test cuda_parity --test nvrtc >"$bundle/tests.json"
cargo bench --no-run --message-format=json >"$bundle/benches.json"
cargo build --release --message-format=json >"$bundle/cli.json"

# Copies each wanted executable (by target kind and name) out of cargo's JSON
# messages; fails if one is missing, so a bundle is never half-built.
python3 - "$bundle" <<'PY'
import json, os, shutil, sys

bundle = sys.argv[1]
wanted = {
    "tests.json": ("test", {"cuda_parity", "nvrtc"}),
    "benches.json": ("bench", {"kernels", "train_step"}),
    "cli.json": ("bin", {"kiln"}),
}
missing = []
for log, (kind, names) in wanted.items():
    found = set()
    for line in open(os.path.join(bundle, log)):
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
            continue
        target = msg["target"]
        # `cargo build` builds the CLI; a bench build also makes a test-mode copy of it.
        if target["kind"] == [kind] and target["name"] in names and not (kind == "bin" and msg["profile"]["test"]):
            shutil.copy(msg["executable"], os.path.join(bundle, "bin", target["name"]))
            found.add(target["name"])
            print(f"bundled {target['name']} ({kind})")
    missing += sorted(names - found)
if missing:
    sys.exit(f"cargo built no executable for: {', '.join(missing)}")
PY
rm "$bundle"/*.json
strip "$bundle"/bin/*
# Compressed, the binaries take about a seventh of their size: the bundle and
# the data must travel together under 64 MiB. run.sh unpacks them.
tar -C "$bundle/bin" -cf - . | xz -T0 -6 >"$bundle/bin.tar.xz"
rm -rf "${bundle:?}/bin"
cp scripts/compare-pytorch.py "$bundle/"
git rev-parse HEAD >"$bundle/commit"
if [ -n "$(git status --porcelain)" ]; then echo "dirty" >>"$bundle/commit"; fi
{
    rustc --version
    echo "built $(date -u '+%Y-%m-%d %H:%M UTC')"
} >"$bundle/build-info"

cat >"$bundle/run.sh" <<'RUN'
#!/usr/bin/env bash
# kiln's GPU check, the half that runs on the GPU machine. Written by
# `scripts/gpu-check.sh build`: change that script, not this copy.
#
#   .gpu/run.sh [REPORT.md] [PART...]        from the repository root (--help)
#
# PARTs, run in this order (default: all four):
#   parity    the NVRTC compile test and every CUDA parity test, with a table
#   bench     the kernels and train_step benches (criterion, --noplot); their
#             JSON and summary.md go to .gpu/bench/, the summary into the report
#   compare   compare-pytorch.py --device cuda against .gpu/bench (needs PyTorch)
#   train     kiln train vae / gpt / gan on CUDA, then kiln eval vae and
#             kiln eval gpt --full; needs data/ (scripts/fetch-data.sh)
# e.g. `.gpu/run.sh .gpu/report.md parity bench`, `.gpu/run.sh train`.
#
# REPORT (default .gpu/report.md) is written afresh by every call; each run's
# metrics.csv is copied beside it as <REPORT>-<model>-metrics.csv. All else
# lands under .gpu/ (bin/, logs/, bench/, criterion/, runs/, ptx-cache/). With
# $OUT set, the report, metrics, bench JSON + summary, logs and the runs'
# metrics and pictures are copied there after each part.
#
# Every step runs under `timeout` with its own budget in seconds, cut short
# where the run's deadline comes first. Environment (default):
#   KILN_GPU_CHECK_DEADLINE  seconds for the whole call (570)
#   KILN_GPU_BUDGET_NVRTC (60)  _PARITY (150)  _KERNELS (240)  _TRAIN_STEP (120)
#   KILN_GPU_BUDGET_COMPARE (120)  _TRAIN (90, each run)  _EVAL (60, each)
#   KILN_BENCH_QUICK         short bench measurements (1; the full suite takes
#                            several minutes per device: 0 and the bench part alone)
#   KILN_BENCH_FILTER        criterion filter for both benches, e.g. /cuda/
#   KILN_GPU_TRAIN_EPOCHS (1)  KILN_GPU_GPT_STEPS (500)
#   KILN_GPU_TRAIN_LIMIT     vae/gan: train on the first N images (all)
#   KILN_GPU_EVAL_LIMIT      evals: the first N images (vae) or characters (gpt)
#   KILN_GPU_TRAIN_DEVICE    cuda (cpu: a dry run of the train part)
#   KILN_GPU_CHECK_FORCE=1   run bench, compare and train even where
#                            nvidia-smi lists no GPU
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
all_parts="parity bench compare train"

is_part() {
    case $1 in parity | bench | compare | train) return 0 ;; esac
    return 1
}

case ${1:-} in
    -h | --help)
        sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"
        exit 0
        ;;
esac
report=$here/report.md
if [ $# -gt 0 ] && [[ $1 == *.md ]]; then
    report=$1
    shift
fi
case $report in /*) ;; *) report=$PWD/$report ;; esac
parts=${*:-$all_parts}
for part in $parts; do
    is_part "$part" || {
        echo "unknown part '$part' (parts: $all_parts; the report's name ends in .md; see --help)" >&2
        exit 2
    }
done
wants() { case " $parts " in *" $1 "*) return 0 ;; esac; return 1; }
cd "$root" || exit 1
rm -rf "${here:?}/logs"
mkdir -p "$(dirname "$report")" "$here/logs"

deadline=${KILN_GPU_CHECK_DEADLINE:-570}
budget_nvrtc=${KILN_GPU_BUDGET_NVRTC:-60}
budget_parity=${KILN_GPU_BUDGET_PARITY:-150}
budget_kernels=${KILN_GPU_BUDGET_KERNELS:-240}
budget_train_step=${KILN_GPU_BUDGET_TRAIN_STEP:-120}
budget_compare=${KILN_GPU_BUDGET_COMPARE:-120}
budget_train=${KILN_GPU_BUDGET_TRAIN:-90}
budget_eval=${KILN_GPU_BUDGET_EVAL:-60}
bench_quick=${KILN_BENCH_QUICK-1}
bench_filter=${KILN_BENCH_FILTER:-}
train_epochs=${KILN_GPU_TRAIN_EPOCHS:-1}
gpt_steps=${KILN_GPU_GPT_STEPS:-500}
train_limit=${KILN_GPU_TRAIN_LIMIT:-}
eval_limit=${KILN_GPU_EVAL_LIMIT:-}
train_device=${KILN_GPU_TRAIN_DEVICE:-cuda}
force=${KILN_GPU_CHECK_FORCE:-0}

echo "unpacking the binaries..."
rm -rf "${here:?}/bin"
mkdir -p "$here/bin"
if ! tar -xJf "$here/bin.tar.xz" -C "$here/bin" 2>/dev/null; then
    python3 -W ignore -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
        "$here/bin.tar.xz" "$here/bin" || {
        echo "cannot unpack $here/bin.tar.xz" >&2
        exit 1
    }
fi
# Unpacked they take 21 MiB: removed at exit so that .gpu/ stays small to carry.
trap 'rm -rf "${here:?}/bin"' EXIT

has_gpu=0
case $(timeout 30 nvidia-smi -L 2>/dev/null) in *GPU*) has_gpu=1 ;; esac
# The bench, compare and train parts need a GPU (or KILN_GPU_CHECK_FORCE=1).
gpu_ready() { [ "$has_gpu" = 1 ] || [ "$force" = 1 ]; }

# Libraries: the GPU machine's own NVRTC first (PTX from an NVRTC newer than
# the driver is refused), then cuBLAS and cuDNN for the benches' baselines,
# from the toolkit or PyTorch's nvidia wheels. PyTorch itself runs with the
# caller's LD_LIBRARY_PATH, so that it loads the libraries it was built with.
base_ld=${LD_LIBRARY_PATH:-}
lib_dirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
while IFS= read -r dir; do
    [ -n "$dir" ] && lib_dirs+=("$dir"/cu13/lib "$dir"/cuda_nvrtc/lib "$dir"/cublas/lib "$dir"/cudnn/lib)
done < <(python3 -c 'import nvidia; print("\n".join(nvidia.__path__))' 2>/dev/null)
find_lib() { # first directory holding a file matching the pattern $1
    local dir
    for dir in "${lib_dirs[@]}"; do
        if compgen -G "$dir/$1" >/dev/null; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}
nvrtc_dir=$(find_lib 'libnvrtc.so.13*' || find_lib 'libnvrtc.so.*') || nvrtc_dir=
cublas_dir=$(find_lib 'libcublas.so.13*') || cublas_dir=
cudnn_dir=$(find_lib 'libcudnn.so.9*') || cudnn_dir=
kiln_ld=$base_ld
for dir in "$cudnn_dir" "$cublas_dir" "$nvrtc_dir"; do
    case ":$kiln_ld:" in *":$dir:"*) ;; *) [ -n "$dir" ] && kiln_ld=$dir${kiln_ld:+:$kiln_ld} ;; esac
done
export LD_LIBRARY_PATH=$kiln_ld
if [ -n "$base_ld" ]; then
    python_env=(env LD_LIBRARY_PATH="$base_ld")
else
    python_env=(env -u LD_LIBRARY_PATH)
fi
# Without a GPU the NVRTC test may skip visibly; on a GPU machine it must run.
[ "$has_gpu" = 1 ] && export KILN_REQUIRE_NVRTC=1
export KILN_CACHE_DIR="$here/ptx-cache"
# The real GPU, never the emulator, whatever the caller's environment says.
unset KILN_CUDA
export NVIDIA_TF32_OVERRIDE=0
kiln=$here/bin/kiln

library() { # "dir/file" of the library matching $2 in directory $1, or a note
    local file
    file=$(compgen -G "${1:-/nonexistent}/$2" | head -n 1)
    if [ -n "$file" ]; then echo "$file"; else echo "not found${3:-}"; fi
}
{
    echo "# kiln GPU check"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- commit: $(head -n 1 "$here/commit")$(grep -q dirty "$here/commit" && echo ' (with uncommitted changes)')"
    echo "- built with: $(head -n 1 "$here/build-info")"
    echo "- GPU: $(timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'none (nvidia-smi unavailable)')"
    echo "- CUDA (nvidia-smi): $(timeout 30 nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' || echo unknown)"
    echo "- NVRTC: $(library "$nvrtc_dir" 'libnvrtc.so.*')"
    echo "- cuBLAS: $(library "$cublas_dir" 'libcublas.so.13*' ' (no cuBLAS baseline)')"
    echo "- cuDNN: $(library "$cudnn_dir" 'libcudnn.so.9*' ' (no cuDNN baselines)')"
    echo "- parts: $parts; deadline ${deadline}s; KILN_BENCH_QUICK=$bench_quick${bench_filter:+; bench filter $bench_filter}"
    echo
    echo '```'
    if command -v nvidia-smi >/dev/null; then timeout 30 nvidia-smi 2>&1 | head -n 20; else echo "nvidia-smi not found"; fi
    echo '```'
} >"$report"

status=0
steps=""
reserve=10 # seconds kept back from the deadline for the report and the copies

section() {
    echo "=== $1"
    printf '\n## %s\n\n' "$1" >>"$report"
}
note() { # a line for the console and the report
    echo "$1"
    printf '%s\n\n' "$1" >>"$report"
}
record() { steps+="| $1 | $2 | $3 |"$'\n'; }

# run_step NAME BUDGET LOG COMMAND...: runs COMMAND under timeout, its output
# to the console and LOG; sets step_status (ok, "exit N", "timed out after
# Ns" or "skipped: out of time") and step_seconds (wall).
run_step() {
    local name=$1 budget=$2 log=$3
    shift 3
    local left=$((deadline - SECONDS - reserve))
    ((budget > left)) && budget=$left
    if ((budget < 5)); then
        step_status="skipped: out of time (deadline ${deadline}s)"
        step_seconds=0
        echo "$step_status" | tee "$log"
    else
        echo "== $name (budget ${budget}s)"
        local start rc
        start=$(date +%s.%N)
        timeout -k 10 "$budget" "$@" </dev/null 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
        step_seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
        case $rc in
            0) step_status=ok ;;
            124 | 137) step_status="timed out after ${budget}s" ;;
            *) step_status="exit $rc" ;;
        esac
    fi
    [ "$step_status" = ok ] || status=1
    record "$name" "$step_status" "$step_seconds"
}

skip_step() { # NAME REASON [table]: a step that does not apply here (not a
    # failure); with "table", the part's own table shows it, not a line of its own.
    if [ "${3:-}" = table ]; then echo "$1: skipped: $2"; else note "$1: skipped: $2"; fi
    record "$1" "skipped: $2" 0
}

# The results of a libtest binary run with --nocapture, one row per test:
# ok / FAILED / skipped, and what the test printed (max errors, skips, panics).
test_table() {
    echo "| test | result | output |"
    echo "|---|---|---|"
    awk '
        function flush() {
            if (name != "") {
                if (result == "") result = "did not finish"
                if (length(detail) > 400) detail = substr(detail, 1, 400) "..."
                printf "| %s | %s | %s |\n", name, result, detail
            }
            name = ""
        }
        function take(text) {
            if (text ~ /^(ok|FAILED|ignored)$/) {
                result = (text == "ok" && skipped) ? "skipped" : text
                flush()
                return
            }
            if (text == "" || text ~ /^note: /) return
            if (text ~ /^skipped: /) skipped = 1
            gsub(/\|/, "\\|", text)
            detail = detail (detail == "" ? "" : "; ") text
        }
        /^failures:$/ { flush(); exit }
        /^test [^ ]+ \.\.\. / {
            flush()
            name = $2; result = ""; detail = ""; skipped = 0
            rest = $0
            sub(/^test [^ ]+ \.\.\. /, "", rest)
            take(rest)
            next
        }
        name != "" { take($0) }
        END { flush() }
    ' "$1"
}

# The last row of a metrics.csv as "column=value" pairs.
last_metrics() {
    [ -f "$1" ] || {
        echo "-"
        return
    }
    awk -F, '
        NR == 1 { n = split($0, header, ","); next }
        { last = $0 }
        END {
            if (last == "") { print "-"; exit }
            split(last, value, ",")
            for (i = 1; i <= n; i++) {
                v = value[i]
                if (v ~ /\./ && v + 0 == v) v = sprintf("%.5g", v)
                printf "%s%s=%s", (i > 1 ? " " : ""), header[i], v
            }
            print ""
        }
    ' "$1"
}

# Copies the results to $OUT (the device tool fetches what is written there).
publish() {
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    local file
    for file in "$report" "${report%.md}"-*-metrics.csv; do
        [ -f "$file" ] && ! [ "$file" -ef "$OUT/$(basename "$file")" ] && cp -f "$file" "$OUT/"
    done
    if compgen -G "$here/bench/*" >/dev/null; then
        mkdir -p "$OUT/bench"
        cp -f "$here"/bench/*.json "$here"/bench/summary.md "$OUT/bench/" 2>/dev/null
    fi
    cp -rf "$here/logs" "$OUT/"
    local run
    for run in "$here"/runs/*/; do
        [ -f "$run/metrics.csv" ] || continue
        mkdir -p "$OUT/runs/$(basename "$run")"
        cp -f "$run"/metrics.csv "$run"/*.png "$OUT/runs/$(basename "$run")/" 2>/dev/null
    done
}

part_parity() {
    section "Parity: NVRTC compile test and CUDA parity tests"
    local test budget
    for test in nvrtc cuda_parity; do
        budget=$budget_nvrtc
        [ "$test" = cuda_parity ] && budget=$budget_parity
        run_step "$test" "$budget" "$here/logs/$test.log" "$here/bin/$test" --test-threads=1 --nocapture
        {
            echo "### $test: $step_status (${step_seconds}s)"
            echo
            test_table "$here/logs/$test.log"
            echo
            echo "<details><summary>output</summary>"
            echo
            echo '```'
            cat "$here/logs/$test.log"
            echo '```'
            echo
            echo "</details>"
            echo
        } >>"$report"
    done
}

part_bench() {
    section "Benchmarks"
    if ! gpu_ready; then
        skip_step "kernels bench" "no CUDA device (KILN_GPU_CHECK_FORCE=1 runs its CPU half)"
        skip_step "train_step bench" "no CUDA device"
        return
    fi
    rm -rf "${here:?}/bench"
    mkdir -p "$here/bench"
    local args=(--bench --noplot) bench budget
    [ -n "$bench_filter" ] && args+=("$bench_filter")
    for bench in kernels train_step; do
        budget=$budget_kernels
        [ "$bench" = train_step ] && budget=$budget_train_step
        run_step "$bench bench" "$budget" "$here/logs/bench-$bench.log" \
            env KILN_BENCH_DIR="$here/bench" CRITERION_HOME="$here/criterion" KILN_BENCH_QUICK="$bench_quick" \
            "$here/bin/$bench" "${args[@]}"
        echo "- $bench bench: $step_status (${step_seconds}s); log in .gpu/logs/bench-$bench.log" >>"$report"
        # What the summary does not show: skipped devices, unused baselines, wrong results.
        grep -E 'CUDA skipped|not used|WRONG|panicked' "$here/logs/bench-$bench.log" |
            sed -E 's/^[ -]*/    - /' >>"$report"
        publish
    done
    echo >>"$report"
    if [ -f "$here/bench/summary.md" ]; then
        sed 's/^\(#\+\) /\1## /' "$here/bench/summary.md" >>"$report"
    else
        note "no bench/summary.md was written"
    fi
}

part_compare() {
    section "kiln vs PyTorch (CUDA)"
    if ! gpu_ready; then
        skip_step "compare-pytorch" "no CUDA device"
        return
    fi
    if ! compgen -G "$here/bench/*.json" >/dev/null; then
        note "compare-pytorch: no bench results in .gpu/bench (run the bench part first)"
        record "compare-pytorch" "no bench results" 0
        status=1
        return
    fi
    run_step "compare-pytorch" "$budget_compare" "$here/logs/compare-pytorch.log" \
        "${python_env[@]}" python3 "$here/compare-pytorch.py" --device cuda --bench-dir "$here/bench"
    note "compare-pytorch.py --device cuda: $step_status (${step_seconds}s)"
    if [ "$step_status" = ok ]; then
        cat "$here/logs/compare-pytorch.log" >>"$report"
    else
        {
            echo '```'
            cat "$here/logs/compare-pytorch.log"
            echo '```'
        } >>"$report"
    fi
}

part_train() {
    section "Training runs ($train_device)"
    if [ "$train_device" = cuda ] && ! gpu_ready; then
        skip_step "train vae, gpt, gan; eval vae, gpt" "no CUDA device"
        return
    fi
    local rows="" model args out csv shown
    for model in vae gpt gan; do
        out=$here/runs/$model
        args=(train "$model" --device "$train_device" --data "$root/data" --out "$out")
        if [ "$model" = gpt ]; then
            args+=(--steps "$gpt_steps")
        else
            args+=(--epochs "$train_epochs")
            [ -n "$train_limit" ] && args+=(--limit "$train_limit")
        fi
        shown="kiln ${args[*]}"
        shown=${shown//"$root/"/}
        if [ "$model" = gpt ] && [ ! -f data/shakespeare.txt ]; then
            skip_step "train $model" "data/shakespeare.txt not found" table
            rows+="| \`$shown\` | skipped: no data | - | - |"$'\n'
            continue
        fi
        if [ "$model" != gpt ] && ! compgen -G "data/fashion-mnist/*.gz" >/dev/null; then
            skip_step "train $model" "data/fashion-mnist/*.gz not found" table
            rows+="| \`$shown\` | skipped: no data | - | - |"$'\n'
            continue
        fi
        rm -rf "$out"
        run_step "train $model" "$budget_train" "$here/logs/train-$model.log" "$kiln" "${args[@]}"
        rows+="| \`$shown\` | $step_status | $step_seconds | $(last_metrics "$out/metrics.csv") |"$'\n'
        csv=${report%.md}-$model-metrics.csv
        if [ -f "$out/metrics.csv" ]; then cp -f "$out/metrics.csv" "$csv"; else rm -f "$csv"; fi
        publish
    done
    for model in vae gpt; do
        out=$here/runs/$model
        args=(eval "$model" --checkpoint "$out" --device "$train_device" --data "$root/data")
        [ "$model" = gpt ] && args+=(--full)
        [ -n "$eval_limit" ] && args+=(--limit "$eval_limit")
        shown="kiln ${args[*]}"
        shown=${shown//"$root/"/}
        if [ ! -f "$out/checkpoint.json" ]; then
            skip_step "eval $model" "no checkpoint from the training run" table
            rows+="| \`$shown\` | skipped: no checkpoint | - | - |"$'\n'
            continue
        fi
        run_step "eval $model" "$budget_eval" "$here/logs/eval-$model.log" "$kiln" "${args[@]}"
        rows+="| \`$shown\` | $step_status | $step_seconds | $(grep . "$here/logs/eval-$model.log" | tail -n 1 | sed 's/|/\\|/g') |"$'\n'
    done
    {
        echo "| command | result | wall s | last metrics / output |"
        echo "|---|---|---|---|"
        printf '%s' "$rows"
        echo
        echo "Each run's metrics.csv is beside this report as $(basename "${report%.md}")-<model>-metrics.csv;"
        echo "logs in .gpu/logs/train-<model>.log and eval-<model>.log."
    } >>"$report"
}

# Each part publishes its results at once, in case a later one is cut off.
if wants parity; then part_parity; publish; fi
if wants bench; then part_bench; publish; fi
if wants compare; then part_compare; publish; fi
if wants train; then part_train; publish; fi

section "Steps"
{
    echo "| step | result | wall s |"
    echo "|---|---|---|"
    printf '%s' "$steps"
    echo
    echo "Total: ${SECONDS}s."
} >>"$report"
publish
echo "report: $report"
exit $status
RUN
chmod +x "$bundle/run.sh"

echo
echo "bundle:"
ls -l "$bundle"
du -sh "$bundle"
[ -d data ] && du -sh data
echo "bundle ready: carry .gpu (and data/ for the training runs) to the GPU machine and run .gpu/run.sh there, from the repository root"
