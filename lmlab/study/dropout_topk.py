"""`lmlab study dropout-vs-topk`: if top-k sampling already adds randomness, why dropout?

A 2x2 experiment. The same model is trained on the same small slice of the corpus (small, so that without
dropout it overfits within the budget) with dropout 0 and dropout 0.2; each trained model is then sampled
greedily and with top-k 40 (temperature 1). Per cell: best and final val loss, final train loss and the
train-val gap (properties of the *model*, measured in eval mode on the training loop's fixed windows, after the
cell's sampling), and distinct-2, the repeated 4-gram rate and the distinct continuations over N samples
(properties of the *sampling*). Then, on each model: two eval-mode passes over one batch (identical logits:
dropout is off at inference) and passes with dropout forced on (MC dropout, Gal & Ghahramani 2016): how much
the logits vary. Dropout is training-time noise that regularizes the weights; top-k is inference-time randomness
that diversifies the text without touching them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.config import ModelConfig, SamplingConfig, preset
from lmlab.study import plots
from lmlab.study.core import Context, RunSpec, findings_text, run_all, table, write_outputs
from lmlab.study.text import diversity, sample_ids

NAME = "dropout-vs-topk"
RATES = (0.0, 0.2)
SAMPLINGS = {"greedy": SamplingConfig(temperature=0.0), "top_k=40": SamplingConfig(temperature=1.0, top_k=40)}
EXPECTED = {"dropout_narrows_gap": True, "topk_changes_val_loss": False, "topk_raises_diversity": True,
            "eval_deterministic": True, "mc_dropout_varies": True}
MC_PASSES = 10

# Per scale: the model, the training budget, the training slice (tokens) and the sampling budget. The slice is
# small on purpose: at the default scale 1500 steps of 16 x 64 tokens are 30 passes over 50,000 characters, which a
# 0.8M-parameter model memorizes without dropout.
SCALES = {
    "tiny": dict(model=dict(family="gpt2", vocab_size=65, context_length=32, d_model=32, n_layers=1, n_heads=2,
                            bias=False),
                 train=dict(max_steps=30, batch_size=8, eval_interval=5, eval_batches=2, warmup_steps=3, lr=3e-3,
                            min_lr=3e-4, log_interval=5),
                 train_tokens=3000, n_samples=4, new_tokens=40),
    "default": dict(model=preset("char-cpu").to_dict(),
                    train=dict(max_steps=1500, batch_size=16, eval_interval=100, eval_batches=20, warmup_steps=100,
                               lr=2e-3, min_lr=2e-4, log_interval=50),
                    train_tokens=50_000, n_samples=20, new_tokens=200),
    "gpu": dict(model=preset("char-baby").to_dict(),
                train=dict(max_steps=3000, batch_size=64, eval_interval=100, eval_batches=20, warmup_steps=100,
                           lr=1e-3, min_lr=1e-4, log_interval=50),
                train_tokens=300_000, n_samples=50, new_tokens=300),
}


def specs(ctx: Context) -> list[RunSpec]:
    sc = SCALES[ctx.scale]
    data = ctx.data_dir(train_tokens=sc["train_tokens"])
    base = ModelConfig.from_dict(sc["model"])
    tc = ctx.train_config(**{**sc["train"], "max_steps": ctx.steps_for(sc["train"]["max_steps"])})
    return [RunSpec(f"dropout-{p:g}", f"dropout {p:g}", base.replace(dropout=p), tc, data, {"dropout": p})
            for p in RATES]


def measure(ctx: Context, spec: RunSpec, run_dir: Path) -> dict:
    """The two cells of this model (one per sampling), then its determinism and MC-dropout spread."""
    import lmlab
    from lmlab.data.tokens import TokenData

    sc = SCALES[ctx.scale]
    lm = lmlab.load(run_dir / "last", device=spec.tc.device)  # the final model: the one that may have overfit
    data = TokenData(spec.data)
    prompt = lm.tokenizer.decode([int(t) for t in data.split("val")[:16]])
    cells, texts = [], {}
    for sampling, s in SAMPLINGS.items():
        _, rows = sample_ids(lm, prompt, s.replace(max_new_tokens=sc["new_tokens"], seed=0), sc["n_samples"])
        decoded = [lm.tokenizer.decode(r) for r in rows]
        d = diversity(decoded)
        val, trn = loop_losses(lm, spec, data)  # measured after this cell's sampling, in eval mode
        cells.append({"dropout": spec.extra["dropout"], "sampling": sampling, "final_train": trn, "final_val": val,
                      "gap": val - trn, "distinct_2": d["distinct_2"], "repeated_4gram_rate": d["repeated_4gram_rate"],
                      "distinct_continuations": d["distinct_continuations"]})
        texts[sampling] = decoded[:2]
    diff, std = logit_spread(lm.model, spec, data)
    return {"cells": cells, "prompt": prompt, "samples": texts, "eval_max_abs_logit_diff": diff,
            "mc_dropout_logit_std": std}


def loop_losses(lm, spec: RunSpec, data) -> tuple[float, float]:
    """(val, train) loss on the training loop's own fixed evaluation windows, with its own function."""
    from lmlab.data.tokens import eval_windows
    from lmlab.infer.evaluate import mean_loss

    T, B, tc = spec.mc.context_length, spec.tc.batch_size, spec.tc
    val, trn = data.split("val"), data.split("train")
    return (mean_loss(lm.model, val, eval_windows(val, T, B, tc.eval_batches, tc.seed), T, lm.device),
            mean_loss(lm.model, trn, eval_windows(trn, T, B, tc.eval_batches, tc.seed + 1), T, lm.device))


@torch.no_grad()
def logit_spread(model: torch.nn.Module, spec: RunSpec, data) -> tuple[float, float]:
    """(max |difference| between two eval-mode passes, mean std of the logits over MC_PASSES passes with
    dropout forced on) on one batch of val windows."""
    from lmlab.data.tokens import eval_windows, windows_to_batch

    T = spec.mc.context_length
    x, _ = windows_to_batch(data.split("val"), eval_windows(data.split("val"), T, spec.tc.batch_size, 1, 7)[0], T,
                            model.wte.weight.device)
    model.eval()
    diff = (model(x) - model(x)).abs().max().item()
    model.train()  # dropout on, at the rates the model was trained with (inverted: kept units scaled by 1/(1-p))
    torch.manual_seed(0)
    std = torch.stack([model(x).float() for _ in range(MC_PASSES)]).std(dim=0, correction=0).mean().item()
    model.eval()
    return diff, std


def findings(cells: list[dict], eval_diffs: list[float], mc_std: float) -> dict[str, bool]:
    """Each finding from the numbers alone (tests recompute them from results.json the same way)."""
    by = {(c["dropout"], c["sampling"]): c for c in cells}
    return {
        "dropout_narrows_gap": all(by[(0.2, s)]["gap"] < by[(0.0, s)]["gap"] for s in SAMPLINGS),
        "topk_changes_val_loss": any(abs(by[(p, "top_k=40")]["final_val"] - by[(p, "greedy")]["final_val"]) > 1e-6
                                     for p in RATES),
        "topk_raises_diversity": all(by[(p, "top_k=40")]["distinct_2"] > by[(p, "greedy")]["distinct_2"] and
                                     by[(p, "top_k=40")]["distinct_continuations"]
                                     > by[(p, "greedy")]["distinct_continuations"] for p in RATES),
        "eval_deterministic": all(d == 0.0 for d in eval_diffs),
        "mc_dropout_varies": mc_std > 0.0,
    }


def run(ctx: Context) -> dict:
    runs = run_all(ctx, specs(ctx), after=lambda spec, run_dir: measure(ctx, spec, run_dir))
    cells = []
    for r in runs.values():
        cells += [{**c, "best_val": r["best_val"]} for c in r["cells"]]
    keys = ("dropout", "sampling", "best_val", "final_train", "final_val", "gap", "distinct_2", "repeated_4gram_rate",
            "distinct_continuations")
    cells = [{k: c[k] for k in keys} for c in cells]
    diffs = [r["eval_max_abs_logit_diff"] for r in runs.values()]
    mc_std = runs[f"dropout-{max(RATES):g}"]["mc_dropout_logit_std"]
    found = findings(cells, diffs, mc_std)
    results = {"study": NAME, "cells": cells, "eval_deterministic": found["eval_deterministic"],
               "mc_dropout_logit_std": mc_std, "findings": found, "eval_max_abs_logit_diff": max(diffs),
               "settings": {"scale": ctx.scale, "n_samples": SCALES[ctx.scale]["n_samples"],
                            "max_new_tokens": SCALES[ctx.scale]["new_tokens"], "mc_passes": MC_PASSES,
                            "train_tokens": SCALES[ctx.scale]["train_tokens"]},
               "runs": {name: {k: v for k, v in r.items() if k != "cells"} for name, r in runs.items()}}
    plots.curves({f"dropout {n.split('-', 1)[1]}": r for n, r in runs.items()}, ctx.out / "curves.png",
                 "train and val loss: dropout 0 vs 0.2")
    labels = [f"p={c['dropout']:g}\n{c['sampling']}" for c in cells]
    n = SCALES[ctx.scale]["n_samples"]
    plots.bars(labels, {"distinct-2": [c["distinct_2"] for c in cells],
                        "repeated 4-gram rate": [c["repeated_4gram_rate"] for c in cells],
                        f"distinct continuations / {n}": [c["distinct_continuations"] / n for c in cells]},
               ctx.out / "diversity.png", "what sampling changes: diversity of N samples", "fraction")
    write_outputs(ctx, results, report(ctx, results))
    return results


def conclusion(results: dict) -> str:
    """The paragraph, written from the numbers in `results`."""
    by = {(c["dropout"], c["sampling"]): c for c in results["cells"]}
    g0, g2 = by[(0.0, "greedy")]["gap"], by[(0.2, "greedy")]["gap"]
    v = {p: (by[(p, "greedy")]["final_val"], by[(p, "top_k=40")]["final_val"]) for p in RATES}
    d2 = {p: (by[(p, "greedy")]["distinct_2"], by[(p, "top_k=40")]["distinct_2"]) for p in RATES}
    dc = {p: (by[(p, "greedy")]["distinct_continuations"], by[(p, "top_k=40")]["distinct_continuations"])
          for p in RATES}
    diff, std = results["eval_max_abs_logit_diff"], results["mc_dropout_logit_std"]
    r0 = results["runs"]["dropout-0"]
    overfit = (f"Without dropout the val loss bottomed at {r0['best_val']:.4f} (step {r0['best_step']}) and ended at "
               f"{r0['final_val']:.4f}: the model overfit within the budget." if r0["final_val"] > r0["best_val"]
               else f"Without dropout the val loss was still at its best at the end ({r0['final_val']:.4f}): this "
                    "budget did not make the model overfit, so the gap comparison is weaker than intended.")
    sentences = {
        "dropout_narrows_gap": (f"Dropout 0.2 narrowed the train-val gap from {g0:.4f} to {g2:.4f} nats.",
                                f"Dropout 0.2 did not narrow the train-val gap ({g0:.4f} without, {g2:.4f} with)."),
        "topk_changes_val_loss": (
            "Top-k changed the val loss ("
            + "; ".join(f"p={p:g}: {a:.6f} greedy vs {b:.6f} top-k" for p, (a, b) in v.items()) + ").",
            "Top-k left the val loss unchanged (" + "; ".join(f"p={p:g}: {a:.4f} in both cells" for p, (a, _)
                                                                in v.items()) + "): it is not applied in evaluation."),
        "topk_raises_diversity": (
            "Top-k raised diversity (" + "; ".join(f"p={p:g}: distinct-2 {a:.3f} -> {b:.3f}, distinct continuations "
                                                  f"{dc[p][0]} -> {dc[p][1]}" for p, (a, b) in d2.items()) + ").",
            "Top-k did not raise diversity in every model (" + "; ".join(
                f"p={p:g}: distinct-2 {a:.3f} -> {b:.3f}, distinct continuations {dc[p][0]} -> {dc[p][1]}"
                for p, (a, b) in d2.items()) + ")."),
        "eval_deterministic": (f"In eval mode the model is deterministic: two passes gave identical logits (max "
                               f"difference {diff:g}).",
                               f"In eval mode two passes gave different logits (max difference {diff:g})."),
        "mc_dropout_varies": (f"With dropout forced on at inference (MC dropout) the logits varied, by a mean std of "
                              f"{std:.4f} over {MC_PASSES} passes.",
                              f"With dropout forced on at inference the logits did not vary (std {std:g})."),
    }
    return overfit + " " + findings_text(results["findings"], EXPECTED, sentences)


def report(ctx: Context, results: dict) -> str:
    cols = [("dropout", "dropout", "g"), ("sampling", "sampling", "s"), ("best_val", "best val", ".4f"),
            ("final_train", "final train", ".4f"), ("final_val", "final val", ".4f"), ("gap", "gap", ".4f"),
            ("distinct_2", "distinct-2", ".3f"), ("repeated_4gram_rate", "rep. 4-gram", ".3f"),
            ("distinct_continuations", "distinct cont.", "d")]
    s = results["settings"]
    return (f"# Study: dropout vs top-k\n\nCommand: `{ctx.command()}`\n\n"
            f"Two models (dropout 0 and 0.2) trained on the first {s['train_tokens']:,} training tokens, each sampled "
            f"greedily and with top-k 40 ({s['n_samples']} samples of {s['max_new_tokens']} tokens from one prompt, "
            "word n-grams). Losses in nats/token on the training loop's fixed eval windows, in eval mode.\n\n"
            + table(results["cells"], cols)
            + "\nEval-mode determinism: max |logit difference| over two passes = "
            f"{results['eval_max_abs_logit_diff']:g}."
            f" MC dropout (p=0.2 forced on, {s['mc_passes']} passes): mean logit std = "
            f"{results['mc_dropout_logit_std']:.4f}.\n\n![curves](curves.png)\n\n![diversity](diversity.png)\n\n"
            f"## Conclusion\n\n{conclusion(results)}\n")
