#!/usr/bin/env bash
# One call on the GPU machine (the device tool), < 8 minutes: `gated-lm bench --device cuda` for
# baseline / elementwise / headwise beside torch_ref.py --compile on the same configs, as a
# ratio table; the GPU time of one step by kernel (ncu); the 1p7b preset beside torch.compile;
# then the GPU op and model tests against the CPU; last 1p7b again with --recompute.
#   GATED_LM_BIN=dir   prebuilt, stripped binaries (scripts/gpu-bundle.sh: gated-lm and the CUDA
#                      test binaries) instead of cargo
#   PRESET=small       bench preset (torch_ref.py --config of the same name)
#   STEPS=10           timed steps per bench
# NVRTC: the toolkit's, or `pip install nvidia-cuda-nvrtc-cu12` (its lib dir on LD_LIBRARY_PATH).
set -uo pipefail
cd "$(dirname "$0")/.."
preset=${PRESET:-small}
steps=${STEPS:-10}
# The whole check must fit one 8-minute call: the most telling measurement first (the ratio
# table, then the per-kernel table, then 1p7b, then the GPU tests, then 1p7b --recompute), each given at most what
# is left of BUDGET seconds, and skipped (saying so) when too little is.
budget=${BUDGET:-450}
within() {  # within SECONDS: the timeout for the next step, or fail when under 20 s are left
  local left=$((budget - SECONDS))
  [ "$left" -lt 20 ] && { echo "(skipped: ${left}s of the ${budget}s budget left)" >&2; return 1; }
  echo $(( $1 < left ? $1 : left ))
}
# Each measurement's full output goes to $LOGS; one that yields no RESULT line prints its exit
# status and last lines, so a failure on the GPU machine still says why (one call, no second look).
LOGS=${LOGS:-$(mktemp -d)}
echo "== logs in $LOGS"
measure() {  # measure NAME SECONDS CMD...: the command's RESULT line (empty on failure, reported)
  local name=$1 t=$2 rc; shift 2
  timeout "$t" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  if ! grep -m1 '^RESULT ' "$LOGS/$name.log"; then
    { echo "($name: no RESULT, exit $rc$([ $rc = 124 ] && echo ", timed out after ${t}s"); its last lines:)"
      grep -v '^\s*$' "$LOGS/$name.log" | tail -6 | sed 's/^/    /'; } >&2
  fi
  echo "$name ${SECONDS}s" >>"$LOGS/elapsed"
}
field() { sed -n 's/^RESULT //p' | python3 -c "import json,sys; r=json.load(sys.stdin); print(r.get('$1'))" 2>/dev/null || echo nan; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
for d in /usr/local/cuda/lib64 "$(python3 -c 'import nvidia.cuda_nvrtc, os; print(os.path.dirname(nvidia.cuda_nvrtc.__file__) + "/lib")' 2>/dev/null)" \
  "$(python3 -c 'import nvidia.cublas, os; print(os.path.dirname(nvidia.cublas.__file__) + "/lib")' 2>/dev/null)"; do
  [ -n "$d" ] && [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done

if [ -n "${GATED_LM_BIN:-}" ]; then
  bin="$GATED_LM_BIN/gated-lm"
  export GATED_LM_EXE="$bin"
else
  cargo build --release --features cuda -q
  bin=target/release/gated-lm
fi
torch_ref=""
for p in ../shared/bench/torch_ref.py shared/bench/torch_ref.py; do [ -f "$p" ] && torch_ref=$p && break; done
echo "== bench: $preset, $steps steps (both bf16 mixed precision; torch compiled)"
printf "%-12s %14s %14s %8s\n" gate gated-lm torch ratio
for gate in none elementwise headwise; do
  t=$(within 120) || break
  ours=$(measure "bench-$gate" "$t" "$bin" bench --device cuda --precision bf16 --preset "$preset" --gate "$gate" \
    --steps "$steps" --warmup 2 | field tokens_per_s)
  theirs=nan
  if [ -n "$torch_ref" ]; then
    t=$(within 150) && theirs=$(measure "torch-$gate" "$t" python3 "$torch_ref" --config "$preset" --gate "$gate" \
      --compile --steps "$steps" | field tokens_per_s)
  fi
  ratio=$(python3 -c "a,b=float('$ours'),float('$theirs'); print(f'{a/b:.3f}' if b==b and b>0 else 'n/a')")
  printf "%-12s %14s %14s %8s\n" "$gate" "$ours" "$theirs" "$ratio"
done
# the same elementwise step with its kernels launched one by one instead of one CUDA graph
t=$(within 60) && nograph=$(GATED_LM_CUDA_GRAPH=0 measure bench-nograph "$t" "$bin" bench --device cuda --precision bf16 \
  --preset "$preset" --gate elementwise --steps "$steps" --warmup 2 | field tokens_per_s) &&
  printf "%-12s %14s   (elementwise, no CUDA graph)\n" no-graph "$nograph"

# GPU time per kernel over one training step (the README's predictions are per kernel).
# --cache-control none: ncu would otherwise flush the caches before every kernel, and a kernel
# that reads what the one before it wrote (an L2 hit in a real step) would be timed cold.
if command -v ncu >/dev/null; then
  echo "== GPU time by kernel, one elementwise step of $preset (ncu gpu__time_duration.sum)"
  t=$(within 240) && { timeout "$t" ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
    "$bin" bench --device cuda --precision bf16 --preset "$preset" --gate elementwise --steps 1 --warmup 0 \
    >"$LOGS/ncu.csv" 2>"$LOGS/ncu.err"; echo "ncu ${SECONDS}s" >>"$LOGS/elapsed"; } &&
    python3 - "$LOGS/ncu.csv" <<'PY' || { echo "(ncu: no kernel rows; its last lines:)"; tail -6 "$LOGS/ncu.err" "$LOGS/ncu.csv"; }

import csv, sys, collections
scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith("\""))]
ms, n = collections.Counter(), collections.Counter()
for r in rows:
    if r.get("Metric Name") == "gpu__time_duration.sum":
        k = r["Kernel Name"].split("(")[0]
        ms[k] += float(r["Metric Value"].replace(",", "")) * scale.get(r["Metric Unit"], 1e-6)
        n[k] += 1
total = sum(ms.values())
print(f"{total:.1f} ms over {sum(n.values())} launches")
for k, v in ms.most_common(25):
    print(f"{v:9.2f} ms {100 * v / max(total, 1e-9):5.1f}%  {n[k]:5d}×  {k}")
sys.exit(0 if n else 1)
PY
else
  echo "== (ncu not found: no per-kernel table)"
fi

echo "== 1p7b (vocabulary 151,936, seq 2048 × batch 8, head_dim 128), elementwise: tokens/s, peak device GiB"
ours=""
t=$(within 200) && ours=$(measure bench-1p7b "$t" "$bin" bench --device cuda --precision bf16 --preset 1p7b \
  --gate elementwise --steps 3 --warmup 1)
theirs=""
if [ -n "$torch_ref" ]; then
  t=$(within 200) && theirs=$(measure torch-1p7b "$t" python3 "$torch_ref" --config 1p7b --gate elementwise --compile --steps 3)
fi
ot=$(echo "$ours" | field tokens_per_s); tt=$(echo "$theirs" | field tokens_per_s)
om=$(echo "$ours" | field device_peak_gib); tm=$(echo "$theirs" | field max_mem_gib)
ratio=$(python3 -c "a,b=float('$ot'),float('$tt'); print(f'{a/b:.3f}' if b==b and b>0 else 'n/a')" 2>/dev/null || echo n/a)
printf "%-12s %14s %14s %8s   peak GiB %s (torch %s)\n" 1p7b "$ot" "$tt" "$ratio" "$om" "$tm"

echo "== GPU tests (ops and model against the CPU; the emulator's share runs in CI already)"
export GATED_LM_SKIP_EMU=1
if [ -n "${GATED_LM_BIN:-}" ]; then
  for exe in "$GATED_LM_BIN"/cuda_kernels-* "$GATED_LM_BIN"/cuda_bf16-* "$GATED_LM_BIN"/cuda_attn_bf16-* \
    "$GATED_LM_BIN"/cuda_stacked-* "$GATED_LM_BIN"/cuda_norm_grads-* "$GATED_LM_BIN"/cuda_graph-* \
    "$GATED_LM_BIN"/cuda_recompute-* "$GATED_LM_BIN"/cuda_probes-* "$GATED_LM_BIN"/cuda_model-*; do
    t=$(within 180) || break
    out=$(timeout "$t" "$exe" --nocapture 2>&1 | grep -vE "^\s*$")
    # the tensor-core kernels' registers, local memory and blocks per SM as the driver compiled them
    echo "$out" | grep "^resources " || true
    echo "$out" | tail -25
  done
elif t=$(within 300); then
  out=$(timeout "$t" cargo test --release --features cuda --test cuda_kernels --test cuda_bf16 --test cuda_attn_bf16 \
    --test cuda_stacked --test cuda_model --test cuda_graph --test cuda_norm_grads --test cuda_recompute --test cuda_probes -- --nocapture 2>&1)
  echo "$out" | grep "^resources " || true
  echo "$out" | tail -40
fi

# last, in what is left of the budget: 1p7b with the norms' outputs and the rotated q, k recomputed
# in the backward (its memory is exactly 5.97 GiB less by the plan; this measures its time)
echo "== 1p7b with --recompute"
ours=""
t=$(within 120) && ours=$(measure bench-1p7b-recompute "$t" "$bin" bench --device cuda --precision bf16 --preset 1p7b \
  --gate elementwise --recompute --steps 3 --warmup 1)
ot=$(echo "$ours" | field tokens_per_s); om=$(echo "$ours" | field device_peak_gib)
ratio=$(python3 -c "a,b=float('$ot'),float('$tt'); print(f'{a/b:.3f}' if b==b and b>0 else 'n/a')" 2>/dev/null || echo n/a)
printf "%-12s %14s %14s %8s   peak GiB %s (torch %s)\n" "1p7b recomp" "$ot" "$tt" "$ratio" "$om" "$tm"
echo "== done in ${SECONDS}s (budget ${budget}s); seconds elapsed at the end of each measurement:"
tr '\n' ' ' <"$LOGS/elapsed"; echo
