#!/usr/bin/env bash
# Download the wheels tools/gpu_check.py needs on a GPU machine that reaches no package index:
# tools/gpu_requirements.txt (pydantic and its parts, tqdm, hjson, pytest-timeout), for that machine's
# Python (default 3.12) on manylinux x86_64, into one folder that travels with the checkout.
#
#   tools/make_gpu_wheelhouse.sh [DIR] [--python-version 3.12] [--with-nox]
#
# DIR defaults to build/gpu-wheelhouse (git-ignored). --with-nox adds nox and its dependencies so that
# `nox -s gpu` works there too (otherwise run `python tools/gpu_check.py`, which is what the session runs).
# Needs pip and the network here, nothing on the GPU machine; about 3 MB (10 MB with nox).
set -euo pipefail
cd "$(dirname "$0")/.."

dir="build/gpu-wheelhouse"
pyver="3.12"
nox=0
while (($#)); do
  case "$1" in
    --python-version) pyver="$2"; shift 2 ;;
    --with-nox) nox=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "make_gpu_wheelhouse.sh: unknown option $1 (accepted: --python-version X.Y, --with-nox)" >&2; exit 2 ;;
    *) dir="$1"; shift ;;
  esac
done
abi="cp${pyver/./}"
pip=(python3 -m pip)
if ! "${pip[@]}" --version >/dev/null 2>&1; then
  echo "make_gpu_wheelhouse.sh: needs pip (python3 -m pip)" >&2
  exit 2
fi
mkdir -p "$dir"
# --platform/--python-version/--abi: the GPU machine's wheels, whatever this machine is. Several manylinux
# tags, so that pip takes the newest each project publishes that the target's glibc accepts.
target=(--only-binary=:all: --implementation cp --python-version "$pyver" --abi "$abi" --abi abi3 --abi none
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
# --no-deps: the list is complete (pytest-timeout's pytest is on the GPU machine already).
"${pip[@]}" download --disable-pip-version-check --quiet --dest "$dir" "${target[@]}" --no-deps \
  -r tools/gpu_requirements.txt
if ((nox)); then
  "${pip[@]}" download --disable-pip-version-check --quiet --dest "$dir" "${target[@]}" "nox>=2024.10"
fi
echo "make_gpu_wheelhouse.sh: $(ls "$dir"/*.whl | wc -l) wheels for CPython $pyver in $dir ($(du -sh "$dir" | cut -f1))"
