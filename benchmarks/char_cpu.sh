#!/usr/bin/env bash
# The char-cpu acceptance run (val <= 1.89): nanoGPT's CPU "baby GPT" model on tinyshakespeare, by character.
# Usage: [RECIPE=nanogpt|muon] bash benchmarks/char_cpu.sh [SEED ...]   (from the repo root, with the venv active)
#   nanogpt (default): nanoGPT's README CPU recipe, AdamW lr 1e-3 for 2000 steps, evaluating every 250.
#   muon: the same model, batch and data; Muon (AdamW for embeddings, head and norms) at lr 1e-2 for 600 steps,
#         evaluating every 200: the same val loss in under a third of the steps (benchmarks/char_cpu.md).
# Writes runs/bench/char_cpu_<recipe>_<seed>/ and prints val loss and wall time per seed.
set -euo pipefail
corpus=${CORPUS:-../shared/data/tinyshakespeare.txt}
recipe=${RECIPE:-nanogpt}
data=runs/bench/tiny_char
case $recipe in
  nanogpt) steps=(--optimizer adamw --lr 1e-3 --max-steps 2000 --warmup-steps 100 --eval-interval 250) ;;
  muon) steps=(--optimizer muon --lr 1e-2 --max-steps 600 --warmup-steps 50 --eval-interval 200) ;;
  *) echo "char_cpu.sh: unknown RECIPE=$recipe; use nanogpt or muon" >&2; exit 2 ;;
esac
[ -f "$data/meta.json" ] || lmlab prepare "$corpus" --out "$data" --tokenizer char --quiet
for seed in "${@:-1337}"; do
  run=runs/bench/char_cpu_${recipe}_$seed
  rm -rf "$run"
  start=$EPOCHREALTIME
  lmlab train --data "$data" --out "$run" --preset char-cpu --seed "$seed" --device cpu --quiet \
    --batch-size 12 --dropout 0 --schedule cosine --min-lr 1e-4 --beta2 0.99 --eval-batches 20 "${steps[@]}"
  end=$EPOCHREALTIME
  wall=$(python -c "print(f'{$end - $start:.1f}')")
  val=$(python -c "import json,sys; e=[json.loads(l) for l in open('$run/metrics.jsonl')]; print(round([x for x in e if x['event']=='eval'][-1]['val_loss'],4))")
  full=$(lmlab eval --model "$run" --data "$data" --batch-size 64 2>/dev/null | awk '{print $2}')
  echo "seed $seed: val loss $val (fixed val subset), $full (all of val), wall $wall s"
done
