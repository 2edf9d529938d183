#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 600), two at a time, seeded from the fixtures.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); on a stable toolchain it runs without a
# sanitizer (RUSTC_BOOTSTRAP lets cargo-fuzz pass its flags). Findings land in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
export RUSTC_BOOTSTRAP=1
mkdir -p fuzz/corpus/{safetensors,gguf,quants,config,tokenizer}
cp tests/fixtures/fuzz/quants/* fuzz/corpus/quants/ 2>/dev/null || true
i=0; for f in tests/fixtures/*/model.safetensors; do cp "$f" "fuzz/corpus/safetensors/m$i"; i=$((i+1)); done
i=0; for f in tests/fixtures/*/config.json; do cp "$f" "fuzz/corpus/config/c$i.json"; i=$((i+1)); done
[ -f fuzz/corpus/gguf/seed-spm.gguf ] || cargo run --release --quiet --example make_fuzz_seeds -- fuzz/corpus
cargo fuzz build -s none --release
run() {
  local rc=0
  cargo fuzz run -s none --release "$1" "fuzz/corpus/$1" -- -max_total_time="$secs" -rss_limit_mb=4096 > "fuzz/$1.log" 2>&1 || rc=$?
  echo "$1: exit $rc; $(grep -E 'Done [0-9]+ runs' "fuzz/$1.log" | tail -1)"
}
run safetensors & run gguf & wait
run config & run tokenizer & wait
run quants
ls fuzz/artifacts/*/ 2>/dev/null || echo "no crashes found"
