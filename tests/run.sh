#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian/Ubuntu machine, then run them.
#   bash tests/run.sh [pytest args...]
# apt packages: the aarch64 cross toolchain and qemu-user-static (ARM artifacts are executed
# here), qemu-user (its dynamic qemu-aarch64 loads the profiler's TCG plugin),
# debootstrap (an aarch64 Python root, cached under .cache/), PoCL (OpenCL kernels on the CPU),
# the Fashion-MNIST test set (accuracy check of the bundled example).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(g++ gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross
              qemu-user-static qemu-user debootstrap binutils
              pocl-opencl-icd ocl-icd-libopencl1 ocl-icd-opencl-dev clinfo
              dataset-fashion-mnist)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "tests/run.sh: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# finetune: torch==2.13.0 (a CPU build that pip takes from local disk on this project's machines);
# pipelines, olive, plot: onnx-ir, onnxscript, NNCF, Olive, matplotlib (tests/test_pipelines.py)
# strict editable mode: a tree of links under build/ that static tools resolve (new modules
# need this line again)
python3 -m pip install -q -e '.[test,finetune,pipelines,olive,plot]' --config-settings editable_mode=strict
# Real OCR and detector models (ddddocr's files only: --no-deps keeps OpenCV out; nothing of
# ddddocr is imported) and the renderer and font of bench/ddddocr_ocr.py.
python3 -m pip install -q --no-deps ddddocr==1.6.1 captcha==0.7.1
python3 -m pip install -q Pillow

# The aarch64 Python root with the aarch64 TVM runtime wheel (built once, cached in .cache/).
export DWSEP_CACHE_DIR="${DWSEP_CACHE_DIR:-$PWD/.cache}"
if python3 -c "import dwsep_compiler.device.emulate" 2>/dev/null; then
  python3 -m dwsep_compiler.device.emulate --prepare
fi

exec python3 -m pytest "$@"
