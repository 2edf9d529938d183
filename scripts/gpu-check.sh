#!/usr/bin/env bash
# One call on the GPU machine (the device tool): build with CUDA, run the GPU op tests against
# the CPU ops, and print the device. Grows with the CUDA backend (benches come with the GPU model).
# NVRTC: the toolkit's, or `pip install nvidia-cuda-nvrtc-cu12` (its lib dir on LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
for d in /usr/local/cuda/lib64 "$(python3 -c 'import nvidia.cuda_nvrtc, os; print(os.path.dirname(nvidia.cuda_nvrtc.__file__) + "/lib")' 2>/dev/null)"; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
cargo test --release --features cuda --test cuda_kernels --test cuda_model -- --nocapture
