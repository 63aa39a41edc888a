#!/usr/bin/env bash
# Builds the `cuda` flavour of multivaed on a machine WITHOUT a GPU or a CUDA toolkit (recipe of
# ../shared/GPU.md): nvcc and the CUDA 13.0 libraries come from PyPI wheels into a venv, a toolkit-shaped
# folder is assembled from them, and the driver library is replaced at link time by a stub.
# Output: dist/multivaed-cuda and dist/multivaed-bench (stripped), dist/multivaed-cuda.libs (the
# sonames it needs).
# Takes ~70 minutes on 2 cores the first time (candle-kernels' nvcc work), ~1 minute afterwards.
#   scripts/build-cuda.sh            # CUDA_COMPUTE_CAP defaults to 90 (H100/H200)
# Environment: MULTIVAED_TOOLS (default /var/tmp/multivaed-tools), CARGO_TARGET_DIR
# (default /var/tmp/multivaed-target-cuda, kept apart from the CPU build's), CUDA_COMPUTE_CAP.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${MULTIVAED_TOOLS:-/var/tmp/multivaed-tools}
venv=$tools/cuda-venv
root=$tools/cuda-root
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR_CUDA:-/var/tmp/multivaed-target-cuda}

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85 \
    nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35
fi
cu=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13)
rm -rf "$root" && mkdir -p "$root/lib/stubs"
for d in bin include nvvm; do ln -s "$cu/$d" "$root/$d"; done
for f in "$cu"/lib/*.so*; do ln -s "$f" "$root/lib/"; done
for n in cublas cublasLt curand nvrtc cudart; do
  real=$(ls "$cu"/lib/lib$n.so.* | sort -V | head -n 1)
  ln -sf "$real" "$root/lib/lib$n.so"
done
cargo fetch --quiet
stub=$(dirname "$0")/make-libcuda-stub.sh
[ -x "$stub" ] || stub=../shared/gpu/make-libcuda-stub.sh
bash "$stub" "$root/lib/stubs"

export CUDA_HOME=$root CUDA_ROOT=$root CUDA_PATH=$root PATH=$root/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
cargo build --release --features cuda --bin multivaed
# the benchmarks (`multivaed-cuda bench …` runs the multivaed-bench beside it)
cargo build --release -p multivaed-kit --features cuda --bin multivaed-bench
mkdir -p dist
cp "$CARGO_TARGET_DIR/release/multivaed" dist/multivaed-cuda
cp "$CARGO_TARGET_DIR/release/multivaed-bench" dist/multivaed-bench
strip dist/multivaed-cuda dist/multivaed-bench
ldd dist/multivaed-cuda | awk '{print $1}' > dist/multivaed-cuda.libs || true
ls -la dist/multivaed-cuda
