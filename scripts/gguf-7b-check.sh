#!/usr/bin/env bash
# Issue 16's memory check: analyse 2,048 tokens of a Llama-2-7B-shaped Q4_K_M GGUF (synthetic
# random weights, ~3.9 GB, written under $DIR and deleted afterwards) and report the peak RSS
# and the wall time. Usage: scripts/gguf-7b-check.sh [TOKENS] [LAYERS]   (defaults 2048 32)
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${1:-2048}
LAYERS=${2:-32}
DIR=${DIR:-/tmp/gguf-7b-check}
mkdir -p "$DIR"
trap 'rm -f "$DIR/model.gguf" "$DIR/ids.safetensors"' EXIT
df -h "$DIR"
cargo build --release --bin gated-lm --example gguf_synth
target/release/examples/gguf_synth "$DIR/model.gguf" "$DIR/ids.safetensors" "$TOKENS" "$LAYERS"
/usr/bin/time -v target/release/gated-lm analyze --model "$DIR/model.gguf" \
    --tokens "$DIR/ids.safetensors" --max-tokens "$TOKENS" --json "$DIR/out.json" 2> "$DIR/time.txt"
grep -E "Maximum resident set size|Elapsed \(wall clock\)|User time|System time" "$DIR/time.txt"
echo "analysis: $DIR/out.json"
