#!/usr/bin/env bash
# gated-lm vs PyTorch on the CPU, as interleaved pairs: for each gate and round, `gated-lm bench`
# then `torch_ref.py` on the same config, so both see the same machine conditions (shared VMs
# drift by 2× within minutes; only ratios measured back to back mean anything). Prints each
# pair's step times and ratio, then the median ratio per gate.
#   PYTHON=/tmp/torchenv/bin/python   a Python with torch (default: python3)
#   PRESET=tiny  ROUNDS=3  STEPS=6  WARMUP=2  GATES="none elementwise headwise"
#   GATED_LM=path/to/gated-lm         default: cargo build --release, target/release/gated-lm
#   BASELINE=path/to/other/gated-lm   A/B mode: pairs against that gated-lm build instead of torch
#                                     (e.g. the commit before a refactor); no Python needed
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
preset=${PRESET:-tiny}
rounds=${ROUNDS:-3}
steps=${STEPS:-6}
warmup=${WARMUP:-2}
gates=${GATES:-none elementwise headwise}
ref=""
for d in ../shared/bench shared/bench; do [ -f "$d/torch_ref.py" ] && ref="$d/torch_ref.py" && break; done
base=${BASELINE:-}
if [ -z "$base" ]; then
  [ -n "$ref" ] || { echo "torch_ref.py not found in ../shared/bench or shared/bench" >&2; exit 1; }
  "$py" -c 'import torch' 2>/dev/null || { echo "$py has no torch (set PYTHON=...)" >&2; exit 1; }
fi
bin=${GATED_LM:-}
if [ -z "$bin" ]; then
  cargo build --release -q
  bin=target/release/gated-lm
fi
step_ms() { sed -n 's/^RESULT .*"step_ms": *\([0-9.]*\).*/\1/p' | tail -1; }
other_col=torch_ms
[ -z "$base" ] || other_col=base_ms
printf '%-12s %5s %10s %10s %7s\n' gate round ours_ms "$other_col" ratio
for gate in $gates; do
  ratios=()
  for r in $(seq "$rounds"); do
    ours=$("$bin" bench --preset "$preset" --gate "$gate" --steps "$steps" --warmup "$warmup" 2>/dev/null | step_ms)
    if [ -n "$base" ]; then
      theirs=$("$base" bench --preset "$preset" --gate "$gate" --steps "$steps" --warmup "$warmup" 2>/dev/null | step_ms)
    else
      theirs=$("$py" "$ref" --config "$preset" --device cpu --gate "$gate" --steps "$steps" --warmup "$warmup" 2>/dev/null | step_ms)
    fi
    [ -n "$ours" ] && [ -n "$theirs" ] || { echo "no RESULT line from a run (gate $gate, round $r)" >&2; exit 1; }
    ratio=$(python3 -c "print(f'{$theirs / $ours:.3f}')")
    ratios+=("$ratio")
    printf '%-12s %5s %10s %10s %7s\n' "$gate" "$r" "$ours" "$theirs" "$ratio"
  done
  python3 -c "import statistics, sys; print(f'{sys.argv[1]:<12} median ratio {statistics.median(map(float, sys.argv[2:])):.3f}')" "$gate" "${ratios[@]}"
done
