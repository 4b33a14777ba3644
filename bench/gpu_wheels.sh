#!/usr/bin/env bash
# Fills the wheels folder that bench/gpu_check.py takes (--wheels) on a GPU machine that has Python, torch,
# transformers, accelerate, peft, safetensors and numpy but no package index: the packages the engine imports besides
# those (gpu_check.py's closure check, `--only-gpu-machine-packages`, lists them), at the versions installed in this
# checkout's venv, for the GPU machine's Python version.
#
#   bash bench/gpu_wheels.sh [folder, default bench/wheels] [Python version there, default 3.12]
#
# Pure-Python wheels are imported from the zip as they are; Pillow is binary: a manylinux x86_64 wheel for that
# Python, which gpu_check.py unpacks at start. The folder's old wheels are replaced. It travels beside the
# repository's tracked files, which together must stay within the device tool's 64 MiB: both sizes are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDER=${1:-bench/wheels}
TARGET=${2:-3.12}
PYTHON=${PYTHON:-.venv/bin/python}
PURE=(diffusers compel pyparsing requests urllib3 certifi charset-normalizer)
BINARY=(pillow)

pinned() {  # name==version as installed here, for each name
    "$PYTHON" -c 'import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "$@"
}

mkdir -p "$FOLDER"
rm -f "$FOLDER"/*.whl
# shellcheck disable=SC2046  # one argument per pinned package
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$FOLDER" \
    --python-version "$TARGET" --implementation py --platform any $(pinned "${PURE[@]}")
# shellcheck disable=SC2046
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$FOLDER" \
    --python-version "$TARGET" --implementation cp --abi "cp${TARGET/./}" --platform manylinux_2_28_x86_64 \
    $(pinned "${BINARY[@]}")

ls -l "$FOLDER"/*.whl | awk '{printf "%10.1f KiB  %s\n", $5 / 1024, $NF}'
wheels=$(cat "$FOLDER"/*.whl | wc -c)
tree=$(git ls-files -z | xargs -0 cat 2>/dev/null | wc -c)
awk -v w="$wheels" -v t="$tree" 'BEGIN {
    printf "wheels: %.1f MiB; tracked files: %.1f MiB; together %.1f MiB of the 64 MiB a device run carries\n",
        w / 1048576, t / 1048576, (w + t) / 1048576 }'
