#!/usr/bin/env bash
# Build here (no CUDA needed) what scripts/gpu-check.sh runs on a GPU machine, stripped so it
# fits the device tool's carry limit: gpu-bin/{gated-lm,cuda_kernels-*,cuda_bf16-*,cuda_attn_bf16-*,
# cuda_stacked-*,cuda_model-*,cuda_graph-*,cuda_norm_grads-*,cuda_recompute-*,cuda_probes-*}.
# Then, with the device tool: carry ["gpu-bin"], run `GATED_LM_BIN=gpu-bin bash scripts/gpu-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu-bin && mkdir gpu-bin
cargo build --release --features cuda -q
cp target/release/gated-lm gpu-bin/
tests="cuda_kernels cuda_bf16 cuda_attn_bf16 cuda_stacked cuda_model cuda_graph cuda_norm_grads cuda_recompute cuda_probes"  # cuda_casts counts launches on the emulator: CI covers it
cargo test --release --features cuda $(printf -- '--test %s ' $tests) --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in sys.argv[1:]:
        print(m["executable"])' $tests | xargs -I{} cp {} gpu-bin/
strip gpu-bin/*
du -sh gpu-bin/* gpu-bin
