#!/usr/bin/env bash
# The char-cpu acceptance run: nanoGPT's CPU "baby GPT" configuration on tinyshakespeare, by character.
# Usage: bash benchmarks/char_cpu.sh [SEED ...]   (from the repo root, with the venv active)
# Writes runs/bench/char_cpu_<seed>/ and prints val loss and wall time per seed.
set -euo pipefail
corpus=${CORPUS:-../shared/data/tinyshakespeare.txt}
data=runs/bench/tiny_char
[ -f "$data/meta.json" ] || lmlab prepare "$corpus" --out "$data" --tokenizer char --quiet
for seed in "${@:-1337}"; do
  run=runs/bench/char_cpu_$seed
  rm -rf "$run"
  start=$EPOCHREALTIME
  lmlab train --data "$data" --out "$run" --preset char-cpu --seed "$seed" --device cpu --quiet \
    --batch-size 12 --max-steps 2000 --dropout 0 --optimizer adamw --lr 1e-3 --schedule cosine --min-lr 1e-4 \
    --warmup-steps 100 --beta2 0.99 --eval-interval 250 --eval-batches 20
  end=$EPOCHREALTIME
  wall=$(python -c "print(f'{$end - $start:.1f}')")
  val=$(python -c "import json,sys; e=[json.loads(l) for l in open('$run/metrics.jsonl')]; print(round([x for x in e if x['event']=='eval'][-1]['val_loss'],4))")
  full=$(lmlab eval --model "$run" --data "$data" --batch-size 64 | awk '{print $2}')
  echo "seed $seed: val loss $val (fixed val subset), $full (all of val), wall $wall s"
done
