#!/usr/bin/env bash
# The GPU training rows of issue 10, lmlab and nanoGPT back to back on the same GPU (never copy nanoGPT's code in).
# Usage: bash benchmarks/gpu_train.sh NANOGPT_CHECKOUT [CORPUS]   (repo root, venv active, one CUDA GPU)
#   NANOGPT_CHECKOUT  a clone of github.com/karpathy/nanoGPT (its train.py, bench.py, config/, data/)
#   CORPUS            tinyshakespeare as text (default ../shared/data/tinyshakespeare.txt); nanoGPT's prepare.py
#                     reads it as its input.txt, so neither side downloads anything.
# Row 1: char-baby (6L/6H/384, ctx 256, batch 64, dropout 0.2) to val <= 1.465: wall seconds, compile included.
# Row 2: GPT-2 124M, batch 16 x 1024, bf16, compiled, random token ids: ms/step, tokens/s, MFU (lmlab bench train
#        against the bf16 matmul peak it measures; nanoGPT bench.py against its own 312 TFLOP/s A100 constant, so
#        compare tokens/s, and MFU only through lmlab's measured peak). nanoGPT's bench model has no biases and
#        pads its vocabulary to 50304; lmlab's gpt2-124m preset keeps GPT-2's biases (a little more work).
# Writes runs/bench/gpu_*/ and prints one line per row; paste them into benchmarks/results.md with the GPU model.
set -euo pipefail
nanogpt=${1:?usage: gpu_train.sh NANOGPT_CHECKOUT [CORPUS]}
corpus=$(realpath "${2:-../shared/data/tinyshakespeare.txt}")
out=runs/bench
mkdir -p "$out"
python -c "import torch; print('GPU', torch.cuda.get_device_name(), 'torch', torch.__version__)"

# --- row 1, nanoGPT: its shakespeare_char config as published (batch 64, ctx 256, 5000 steps, eval every 250)
cp "$corpus" "$nanogpt/data/shakespeare_char/input.txt"
(cd "$nanogpt" && python data/shakespeare_char/prepare.py > /dev/null)
start=$EPOCHREALTIME
(cd "$nanogpt" && python train.py config/train_shakespeare_char.py --out_dir=out-gpu-bench) > "$out/gpu_nanogpt_char.log" 2>&1
end=$EPOCHREALTIME
python - "$out/gpu_nanogpt_char.log" "$start" "$end" <<'PY'
import re, sys
rows = [(int(s), float(v)) for s, v in re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", open(sys.argv[1]).read())]
step, val = min(rows, key=lambda r: r[1])
print(f"nanoGPT char-baby: best val {val:.4f} at step {step}; whole run {float(sys.argv[3]) - float(sys.argv[2]):.1f} s wall")
PY

# --- row 1, lmlab: the same model and batch, bf16 + compile + padded vocab (automatic on CUDA), early stop
data=$out/gpu_char_data
[ -f "$data/meta.json" ] || lmlab prepare "$corpus" --out "$data" --tokenizer char --quiet
run=$out/gpu_lmlab_char
rm -rf "$run"
start=$EPOCHREALTIME
lmlab train --data "$data" --out "$run" --preset char-baby --device cuda --dtype bfloat16 --compile --quiet \
  --batch-size 64 --lr 1e-3 --min-lr 1e-4 --beta2 0.99 --warmup-steps 100 --max-steps 5000 --eval-interval 250 \
  --eval-batches 200 --log-interval 50 --patience 2
end=$EPOCHREALTIME
python - "$run/metrics.jsonl" "$start" "$end" <<'PY'
import json, sys
ev = [e for e in map(json.loads, open(sys.argv[1])) if e["event"] == "eval"]
hit = next((e for e in ev if e["val_loss"] <= 1.465), None)
best = min(ev, key=lambda e: e["val_loss"])
print(f"lmlab char-baby: best val {best['val_loss']:.4f} at step {best['step']}; "
      + (f"val <= 1.465 at step {hit['step']} after {hit['elapsed_s']:.1f} s of steps" if hit else "never reached 1.465")
      + f"; whole run {float(sys.argv[3]) - float(sys.argv[2]):.1f} s wall (compile included)")
PY

# --- row 2: GPT-2 124M training speed
(cd "$nanogpt" && python bench.py --real_data=False --batch_size=16 --block_size=1024 --compile=True) \
  > "$out/gpu_nanogpt_gpt2.log" 2>&1
grep -E "time per iteration" "$out/gpu_nanogpt_gpt2.log" | tail -n 1 | sed 's/^/nanoGPT gpt2-124m: /'
lmlab bench train --preset gpt2-124m --batch-size 16 --context 1024 --dtype bfloat16 --compile --device cuda \
  --steps 30 --warmup 5 --json "$out/gpu_lmlab_gpt2.json"
