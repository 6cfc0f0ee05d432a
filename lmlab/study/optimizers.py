"""`lmlab study optimizers`: the optimizers of Deep Learning ch. 8 (plus AdamW and Muon) on one model, data and
step budget, each at its best learning rate.

Four comparisons, every run through lmlab.training.loop (optimizers from lmlab/training/optim.py, chosen by
TrainConfig.optimizer):
  lr grid     SGD, momentum, Nesterov (8.3), AdaGrad, RMSProp, Adam (8.5), AdamW (Loshchilov & Hutter 2019) and
              Muon (Jordan et al. 2024), each at 3 learning rates (SGD's family needs ~100x Adam's), so that each is
              compared at its best: best val loss, wall time to a target loss, tokens/s. A run whose loss becomes
              NaN or inf is kept as a diverged result, not an error. Weight decay 0.1 is applied only where it is
              decoupled from the gradient (AdamW, Muon); as an L2 term it would fight SGD's large lr.
  batch size  the same token budget at batch B/4, B and 4B (8.1.3: minibatch size trades gradient noise against
              steps; same lr, warmup and evaluations at the same token counts, on the same number of eval windows).
  init        gpt2 (N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers)), xavier, orthogonal (8.4).
  L-BFGS      (8.6.2) full batch on a tiny problem, against AdamW minibatches of the same size and step count: it
              needs the same batch at every step, because its line search and curvature pairs assume a deterministic
              loss; minibatch noise breaks both, and each of its steps costs several forward and backward passes.
The AdamW run at the grid's middle lr is also batch size B and the gpt2 init: one run, reused.
"""

from __future__ import annotations

import dataclasses
import statistics

from lmlab.config import ModelConfig, preset
from lmlab.study import plots
from lmlab.study.core import Context, RunSpec, findings_text, run_all, table, write_outputs
from lmlab.study.dropout_topk import SCALES as DVT

NAME = "optimizers"
GRIDS = {"sgd": (0.3, 1.0, 3.0), "momentum": (0.03, 0.1, 0.3), "nesterov": (0.03, 0.1, 0.3),
         "adagrad": (3e-3, 1e-2, 3e-2), "rmsprop": (3e-4, 1e-3, 3e-3), "adam": (1e-3, 3e-3, 1e-2),
         "adamw": (1e-3, 3e-3, 1e-2), "muon": (3e-3, 1e-2, 3e-2)}
DECOUPLED = ("adamw", "muon")
ADAPTIVE = ("adagrad", "rmsprop", "adam", "adamw")
SGD_FAMILY = ("sgd", "momentum", "nesterov")
BATCH_FACTORS = (4, 1, 0.25)  # steps and evaluation intervals per factor: batch B/4, B, 4B see the same tokens
INITS = ("gpt2", "xavier", "orthogonal")
REF = ("adamw", GRIDS["adamw"][1])  # the run the batch and init comparisons are built around
EXPECTED = {"adaptive_beats_sgd": True, "momentum_beats_sgd": True, "muon_or_adamw_best": True,
            "best_lr_inside_grid": True, "smaller_batches_better_per_token": True, "larger_batches_faster": True,
            "gpt2_init_best": True, "lbfgs_costlier_per_step": True, "lbfgs_overfits_its_batch": True}

TINY_MODEL = DVT["tiny"]["model"]
# Per scale: the model and the budget of every grid run (evaluations at step 0, every eval_interval and the end,
# on eval_batches x batch_size fixed windows), and the L-BFGS problem. Default: 31 runs of 300 steps of 16 x 64
# characters (about 20 s each on 2 quiet cores); the slice is the whole corpus: this study is about optimization,
# not overfitting.
SCALES = {
    # tiny: one thread, as two threads on a model this small spend more time synchronizing than computing
    "tiny": dict(model=TINY_MODEL, train=dict(max_steps=12, batch_size=8, eval_interval=4, eval_batches=2,
                                              warmup_steps=2, log_interval=4, threads=1),
                 lbfgs=dict(model=TINY_MODEL, steps=10, batch_size=16, train_tokens=2000)),
    "default": dict(model=preset("char-cpu").to_dict(),
                    train=dict(max_steps=300, batch_size=16, eval_interval=40, eval_batches=4, warmup_steps=30,
                               log_interval=10),
                    lbfgs=dict(model=TINY_MODEL, steps=50, batch_size=64, train_tokens=4000)),
    "gpu": dict(model=preset("char-baby").to_dict(),
                train=dict(max_steps=1000, batch_size=64, eval_interval=100, eval_batches=4, warmup_steps=100,
                           log_interval=50),
                lbfgs=dict(model=preset("char-cpu").to_dict(), steps=100, batch_size=256, train_tokens=20000)),
}


def run_name(optimizer: str, lr: float) -> str:
    return f"{optimizer}-lr{lr:g}"


def base_train(ctx: Context) -> dict:
    return {**SCALES[ctx.scale]["train"], "max_steps": ctx.steps_for(SCALES[ctx.scale]["train"]["max_steps"])}


def grid_specs(ctx: Context) -> list[RunSpec]:
    data, mc = ctx.data_dir(), ModelConfig.from_dict(SCALES[ctx.scale]["model"])
    return [RunSpec(run_name(o, lr), f"{o}, lr {lr:g}", mc,
                    ctx.train_config(**base_train(ctx), optimizer=o, lr=lr,
                                     weight_decay=0.1 if o in DECOUPLED else 0.0), data,
                    {"group": "lr", "optimizer": o, "lr": lr}) for o, lrs in GRIDS.items() for lr in lrs]


def batch_specs(ctx: Context, ref: RunSpec) -> list[RunSpec]:
    """Batch B/4 and 4B with the reference run's token budget: steps, warmup and eval interval scaled so that
    evaluations fall at the same token counts, eval_batches so that each evaluates as many windows."""
    t = base_train(ctx)
    out = []
    for f in BATCH_FACTORS:
        if f == 1:
            continue
        b = int(t["batch_size"] / f)
        tc = dataclasses.replace(ref.tc, batch_size=b, max_steps=max(1, int(t["max_steps"] * f)),
                            max_tokens=t["max_steps"] * t["batch_size"] * ref.mc.context_length,
                            warmup_steps=int(t["warmup_steps"] * f), eval_interval=max(1, int(t["eval_interval"] * f)),
                            eval_batches=max(1, int(t["eval_batches"] * f)),
                            log_interval=max(1, int(t["log_interval"] * f)))
        out.append(RunSpec(f"batch-{b}", f"adamw, batch {b}", ref.mc, tc, ref.data,
                           {"group": "batch", "batch_size": b}))
    return out


def init_specs(ref: RunSpec) -> list[RunSpec]:
    return [RunSpec(f"init-{i}", f"adamw, {i} init", ref.mc, dataclasses.replace(ref.tc, init=i), ref.data,
                    {"group": "init", "init": i}) for i in INITS if i != "gpt2"]


def lbfgs_specs(ctx: Context) -> list[RunSpec]:
    """L-BFGS on one fixed batch (lr 1 with a strong-Wolfe line search, no warmup, no clipping: a clipped gradient
    is not the loss's gradient, which the line search assumes) and AdamW on minibatches of the same size."""
    lb = SCALES[ctx.scale]["lbfgs"]
    data, mc = ctx.data_dir(train_tokens=lb["train_tokens"]), ModelConfig.from_dict(lb["model"])
    steps = ctx.steps_for(lb["steps"])
    common = dict(max_steps=steps, batch_size=lb["batch_size"], eval_interval=max(1, steps // 5), eval_batches=2,
                  threads=SCALES[ctx.scale]["train"].get("threads", 0),
                  log_interval=max(1, steps // 5), weight_decay=0.0)
    return [RunSpec("lbfgs", "L-BFGS, full batch", mc, ctx.train_config(**common, optimizer="lbfgs", lr=1.0,
                                                                       warmup_steps=0, schedule="constant",
                                                                       grad_clip=0.0), data,
                    {"group": "lbfgs", "optimizer": "lbfgs", "lr": 1.0}),
            RunSpec("lbfgs-adamw", "AdamW, minibatches", mc, ctx.train_config(**common, optimizer="adamw", lr=1e-2,
                                                                              warmup_steps=max(1, steps // 10)),
                    data, {"group": "lbfgs", "optimizer": "adamw", "lr": 1e-2})]


def specs(ctx: Context) -> list[RunSpec]:
    grid = grid_specs(ctx)
    ref = next(s for s in grid if s.name == run_name(*REF))
    return grid + batch_specs(ctx, ref) + init_specs(ref) + lbfgs_specs(ctx)


def to_target(run: dict, target: float) -> tuple[float | None, int | None]:
    """(training seconds, step) of the first evaluation at or below `target`; (None, None) if none was."""
    c = run["curve"]
    hit = next((i for i, v in enumerate(c["val"]) if v <= target), None)
    return (None, None) if hit is None else (c["elapsed_s"][hit], c["step"][hit])


def cell(spec: RunSpec, run_name_: str, run: dict, target: float) -> dict:
    seconds, step = to_target(run, target)
    tc = spec.tc
    return {"group": spec.extra["group"], "setting": spec.name, "run": run_name_, "optimizer": tc.optimizer,
            "lr": tc.lr, "batch_size": tc.batch_size, "init": tc.init, "weight_decay": tc.weight_decay,
            **{k: run[k] for k in ("best_val", "best_step", "final_val", "final_train", "gap", "steps", "tokens_seen",
                                   "elapsed_s", "tok_per_s", "diverged")},
            "time_to_target_s": seconds, "steps_to_target": step}


def best_of(cells: list[dict]) -> dict[str, dict]:
    """Each optimizer's best grid cell: the lowest best val loss among its runs that did not diverge (all of them
    if every one did)."""
    out = {}
    for o in GRIDS:
        mine = [c for c in cells if c["group"] == "lr" and c["optimizer"] == o]
        out[o] = min([c for c in mine if not c["diverged"]] or mine, key=lambda c: c["best_val"])
    return out


def target_loss(runs: dict[str, dict]) -> float:
    """The median of the optimizers' best val losses: a loss half of them reach within the budget."""
    return statistics.median(min(runs[run_name(o, lr)]["best_val"] for lr in lrs) for o, lrs in GRIDS.items())


def build_cells(all_specs: list[RunSpec], runs: dict[str, dict]) -> tuple[list[dict], float]:
    target = target_loss(runs)
    cells = [cell(s, s.name, runs[s.name], target) for s in all_specs]
    ref = next(s for s in all_specs if s.name == run_name(*REF))
    b, i = ref.tc.batch_size, ref.tc.init
    cells.append({**cell(ref, ref.name, runs[ref.name], target), "group": "batch", "setting": f"batch-{b}"})
    cells.append({**cell(ref, ref.name, runs[ref.name], target), "group": "init", "setting": f"init-{i}"})
    order = {"lr": 0, "batch": 1, "init": 2, "lbfgs": 3}
    cells.sort(key=lambda c: (order[c["group"]], -c["batch_size"] if c["group"] == "batch" else 0))
    return cells, target


def findings(cells: list[dict]) -> dict[str, bool]:
    best = best_of(cells)
    val = {o: c["best_val"] for o, c in best.items()}
    batch = sorted((c for c in cells if c["group"] == "batch"), key=lambda c: c["batch_size"])
    init = {c["init"]: c["best_val"] for c in cells if c["group"] == "init"}
    lb = {c["optimizer"]: c for c in cells if c["group"] == "lbfgs"}
    per_step = {o: c["elapsed_s"] / c["steps"] for o, c in lb.items()}
    return {
        "adaptive_beats_sgd": min(val[o] for o in ADAPTIVE) < val["sgd"],
        "momentum_beats_sgd": min(val["momentum"], val["nesterov"]) < val["sgd"],
        "muon_or_adamw_best": min(val, key=val.get) in DECOUPLED,
        "best_lr_inside_grid": all(c["lr"] not in (GRIDS[o][0], GRIDS[o][-1]) for o, c in best.items()),
        "smaller_batches_better_per_token": all(a["best_val"] < b["best_val"] for a, b in zip(batch, batch[1:],
                                                                                               strict=False)),
        "larger_batches_faster": all(a["tok_per_s"] < b["tok_per_s"] for a, b in zip(batch, batch[1:], strict=False)),
        "gpt2_init_best": all(init["gpt2"] < v for k, v in init.items() if k != "gpt2"),
        "lbfgs_costlier_per_step": per_step["lbfgs"] > per_step["adamw"],
        "lbfgs_overfits_its_batch": lb["lbfgs"]["gap"] > lb["adamw"]["gap"],
    }


def run(ctx: Context) -> dict:
    all_specs = specs(ctx)
    runs = run_all(ctx, all_specs, diverged_ok=True)
    cells, target = build_cells(all_specs, runs)
    best = best_of(cells)
    results = {"study": NAME, "cells": cells, "target_loss": target,
               "best": {o: {k: c[k] for k in ("setting", "lr", "best_val", "time_to_target_s", "steps_to_target",
                                              "tok_per_s", "diverged")} for o, c in best.items()},
               "findings": findings(cells),
               "settings": {"scale": ctx.scale, "steps": base_train(ctx)["max_steps"],
                            "batch_size": base_train(ctx)["batch_size"], "grids": GRIDS,
                            "lbfgs": SCALES[ctx.scale]["lbfgs"]},
               "runs": runs}
    plot(ctx, results)
    write_outputs(ctx, results, report(ctx, results))
    return results


def plot(ctx: Context, results: dict) -> None:
    runs, best, cells = results["runs"], results["best"], results["cells"]
    tops = {f"{o} lr {c['lr']:g}": runs[c["setting"]] for o, c in best.items()}
    plots.curves(tops, ctx.out / "curves_step.png", "val loss, each optimizer at its best lr", train=False)
    plots.curves(tops, ctx.out / "curves_time.png", "val loss against training time, each at its best lr",
                 x="elapsed_s", train=False)
    plots.lines({o: (list(lrs), [runs[run_name(o, lr)]["best_val"] for lr in lrs]) for o, lrs in GRIDS.items()},
                ctx.out / "lr_grid.png", "best val loss against learning rate", "learning rate", "best val loss",
                logx=True)
    batch = {f"batch {c['batch_size']}": runs[c["run"]] for c in cells if c["group"] == "batch"}
    plots.lines({k: ([s * r["tokens_seen"] // r["steps"] for s in r["curve"]["step"]], r["curve"]["val"])
                 for k, r in batch.items()},
                ctx.out / "batch.png", "the same token budget at three batch sizes (adamw)", "tokens seen",
                "val loss")
    plots.curves({c["init"]: runs[c["run"]] for c in cells if c["group"] == "init"}, ctx.out / "init.png",
                 "initialization schemes (adamw)")


def fmt(value: float | None, spec: str) -> str:
    return "not reached" if value is None else format(value, spec)


def conclusion(results: dict) -> str:
    f, best, cells = results["findings"], results["best"], results["cells"]
    val = {o: c["best_val"] for o, c in best.items()}
    rank = ", ".join(f"{o} {v:.4f}" for o, v in sorted(val.items(), key=lambda kv: kv[1]))
    top = min(val, key=val.get)
    ad = min(ADAPTIVE, key=val.get)
    mom = min(("momentum", "nesterov"), key=val.get)
    edge = [f"{o} (lr {c['lr']:g})" for o, c in best.items() if c["lr"] in (GRIDS[o][0], GRIDS[o][-1])]
    batch = sorted((c for c in cells if c["group"] == "batch"), key=lambda c: c["batch_size"])
    bv = ", ".join(f"batch {c['batch_size']}: {c['best_val']:.4f} at {c['tok_per_s']:,.0f} tok/s" for c in batch)
    init = {c["init"]: c["best_val"] for c in cells if c["group"] == "init"}
    iv = ", ".join(f"{k} {v:.4f}" for k, v in init.items())
    lb = {c["optimizer"]: c for c in cells if c["group"] == "lbfgs"}
    ps = {o: c["elapsed_s"] / c["steps"] for o, c in lb.items()}
    s = {
        "adaptive_beats_sgd": (f"An adaptive method beat plain SGD: {ad} {val[ad]:.4f} against {val['sgd']:.4f} "
                               f"(best val loss at each one's best lr; ranking: {rank}).",
                               f"No adaptive method beat plain SGD ({val['sgd']:.4f}; ranking: {rank})."),
        "momentum_beats_sgd": (f"Momentum helped SGD: {mom} {val[mom]:.4f} against {val['sgd']:.4f}.",
                               f"Momentum did not help SGD: {mom} {val[mom]:.4f} against {val['sgd']:.4f}."),
        "muon_or_adamw_best": (f"The best optimizer was {top} ({val[top]:.4f}).",
                               f"The best optimizer was {top} ({val[top]:.4f}), neither Muon nor AdamW."),
        "best_lr_inside_grid": ("Every optimizer's best lr lay inside its grid, so each was compared near its optimum.",
                                f"The best lr sat at the edge of its grid for {', '.join(edge)}: a wider grid could "
                                "change that optimizer's place."),
        "smaller_batches_better_per_token": (f"With the same tokens, smaller batches reached lower val loss ({bv}): "
                                             "more, noisier steps beat fewer, exact ones.",
                                             f"With the same tokens, smaller batches did not reach lower val loss at "
                                             f"every size ({bv})."),
        "larger_batches_faster": ("Larger batches processed more tokens per second.",
                                  "Larger batches did not process more tokens per second at every size."),
        "gpt2_init_best": (f"GPT-2's init reached the lowest val loss ({iv}).",
                           f"GPT-2's init did not reach the lowest val loss ({iv})."),
        "lbfgs_costlier_per_step": (f"An L-BFGS step cost {ps['lbfgs'] * 1000:.1f} ms against AdamW's "
                                    f"{ps['adamw'] * 1000:.1f} ms (its line search evaluates the batch several "
                                    "times).",
                                    f"An L-BFGS step cost {ps['lbfgs'] * 1000:.1f} ms, not more than AdamW's "
                                    f"{ps['adamw'] * 1000:.1f} ms."),
        "lbfgs_overfits_its_batch": (f"Stepping on its one batch, L-BFGS ended with a wider train-val gap than AdamW "
                                     f"on fresh minibatches ({lb['lbfgs']['gap']:.4f} against "
                                     f"{lb['adamw']['gap']:.4f}); "
                                     f"its best val loss came at step {lb['lbfgs']['best_step']} "
                                     f"({lb['lbfgs']['best_val']:.4f}) and it ended at a train loss of "
                                     f"{lb['lbfgs']['final_train']:.4f} on the fixed train windows.",
                                     f"L-BFGS did not end with a wider train-val gap than AdamW "
                                     f"({lb['lbfgs']['gap']:.4f} against {lb['adamw']['gap']:.4f})."),
    }
    return findings_text(f, EXPECTED, s)


def rows(cells: list[dict]) -> list[dict]:
    """The cells as table rows: numbers formatted, a target not reached said in words."""
    return [{**c, "lr_s": f"{c['lr']:g}", "ttt": fmt(c["time_to_target_s"], ".1f"),
             "stt": fmt(c["steps_to_target"], "d"), "div": "yes" if c["diverged"] else "no"} for c in cells]


def report(ctx: Context, results: dict) -> str:
    cells, s = results["cells"], results["settings"]
    best = rows([next(c for c in cells if c["setting"] == b["setting"]) for b in results["best"].values()])
    grid = rows([c for c in cells if c["group"] == "lr"])
    loss = [("best_val", "best val", ".4f"), ("best_step", "at step", "d")]
    speed = [("ttt", f"s to {results['target_loss']:.4f}", "s"), ("stt", "steps to it", "s"),
             ("tok_per_s", "tokens/s", ",.0f")]
    lb = rows([c for c in cells if c["group"] == "lbfgs"])
    return (f"# Study: optimizers (Deep Learning ch. 8, plus AdamW and Muon)\n\nCommand: `{ctx.command()}`\n\n"
            f"Every optimizer trains the same model on the same data for {s['steps']} steps of batch "
            f"{s['batch_size']}, at each lr of its grid (lr warmup then cosine decay, gradients clipped at norm 1, "
            "weight decay 0.1 for AdamW and Muon only). Losses in nats/token on the training loop's fixed eval "
            "windows; time is the loop's training time, evaluations excluded. The target loss is the median of the "
            "optimizers' best val losses.\n\n## Each optimizer at its best lr\n\n"
            + table(best, [("optimizer", "optimizer", "s"), ("lr_s", "best lr", "s"), *loss, *speed])
            + "\n![by step](curves_step.png)\n\n![by time](curves_time.png)\n\n## The whole grid\n\n"
            + table(grid, [("optimizer", "optimizer", "s"), ("lr_s", "lr", "s"), *loss,
                           ("final_val", "final val", ".4f"), ("div", "diverged", "s")])
            + "\n![lr grid](lr_grid.png)\n\n## Batch size at a fixed token budget (AdamW)\n\n"
            + table(rows([c for c in cells if c["group"] == "batch"]),
                    [("batch_size", "batch", "d"), ("steps", "steps", "d"), ("tokens_seen", "tokens", ",d"), *loss,
                     ("elapsed_s", "train s", ".1f"), ("tok_per_s", "tokens/s", ",.0f")])
            + "\n![batch](batch.png)\n\n## Initialization (AdamW)\n\n"
            + table(rows([c for c in cells if c["group"] == "init"]), [("init", "init", "s"), *loss,
                                                                       ("final_val", "final val", ".4f")])
            + "\n![init](init.png)\n\n## L-BFGS, full batch on a tiny problem\n\n"
            + table(lb, [("optimizer", "optimizer", "s"), ("lr_s", "lr", "s"), ("steps", "steps", "d"), *loss,
                         ("final_train", "final train", ".4f"), ("gap", "gap", ".4f"), ("elapsed_s", "train s", ".2f")])
            + f"\n{LBFGS_NOTE}\n\n## Conclusion\n\n{conclusion(results)}\n")


LBFGS_NOTE = (
    "L-BFGS steps on one fixed batch; AdamW draws a new minibatch of the same size "
    "each step. L-BFGS builds a curvature model from the differences of successive gradients and picks each step's "
    "length by a line search, and both assume the loss and gradient are the same function at every evaluation. "
    "With minibatches they are not: gradient noise between two batches swamps the curvature signal, and the line "
    "search chases noise. Each step also evaluates the batch several times (up to 5 iterations, more with the line "
    "search), and its history of 20 vector pairs costs 40 copies of the parameters. That is why language models are "
    "trained with first-order minibatch methods (Deep Learning 8.6.2).")
