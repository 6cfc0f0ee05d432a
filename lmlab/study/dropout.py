"""`lmlab study dropout`: how much dropout, when, and where.

The model, data slice and budget of dropout-vs-topk (small enough that the model overfits without dropout),
trained nine ways: constant p in {0, 0.1, 0.2, 0.3} at every site; p = 0.2 with the `early` schedule (on for the
first 20% of steps, Liu et al. 2023) and the `linear` one (decaying to 0); and p = 0.2 at one site alone
(embeddings, attention probabilities, or the residual branches; model.py's dropout sites). Per setting: train
and val curves, the best val loss and its step, the final train-val gap. The schedules and sites are the
training loop's own (TrainConfig.dropout_schedule, ModelConfig.dropout_embed/attn/resid).
"""

from __future__ import annotations

from lmlab.config import ModelConfig
from lmlab.study import plots
from lmlab.study.core import Context, RunSpec, findings_text, run_all, table, write_outputs
from lmlab.study.dropout_topk import SCALES as BASE

NAME = "dropout"
RATES = (0.0, 0.1, 0.2, 0.3)
SITES = ("embed", "attn", "resid")
STEPS = {"tiny": 30, "default": 1200, "gpu": 3000}  # default: 9 runs in about 13 minutes on 2 quiet cores
EXPECTED = {"dropout_narrows_gap": True, "gap_falls_as_p_rises": True, "dropout_lowers_best_val": True,
            "every_site_narrows_gap": True, "all_sites_narrow_most": True, "early_ends_like_no_dropout": True}


def settings() -> list[tuple[str, dict, dict, dict]]:
    """(name, ModelConfig changes, TrainConfig changes, description) of each setting."""
    out = [(f"p{p:g}", {"dropout": p}, {}, {"dropout": p, "schedule": "constant", "sites": "all"}) for p in RATES]
    out += [(f"p0.2-{s}", {"dropout": 0.2}, {"dropout_schedule": s}, {"dropout": 0.2, "schedule": s, "sites": "all"})
            for s in ("early", "linear")]
    out += [(f"p0.2-{site}-only", {"dropout": 0.0, f"dropout_{site}": 0.2}, {},
             {"dropout": 0.2, "schedule": "constant", "sites": site}) for site in SITES]
    return out


def specs(ctx: Context) -> list[RunSpec]:
    sc = BASE[ctx.scale]
    data = ctx.data_dir(train_tokens=sc["train_tokens"])
    base = ModelConfig.from_dict(sc["model"])
    train = {**sc["train"], "max_steps": ctx.steps_for(STEPS[ctx.scale])}
    return [RunSpec(name, f"{d['sites']} sites, p={d['dropout']:g}, {d['schedule']}", base.replace(**m),
                    ctx.train_config(**{**train, **t}), data, d) for name, m, t, d in settings()]


def findings(cells: list[dict]) -> dict[str, bool]:
    by = {c["setting"]: c for c in cells}
    gap = {name: by[name]["gap"] for name in by}
    const = [gap[f"p{p:g}"] for p in RATES]
    return {
        "dropout_narrows_gap": all(g < const[0] for g in const[1:]),
        "gap_falls_as_p_rises": all(b < a for a, b in zip(const, const[1:], strict=False)),
        "dropout_lowers_best_val": min(by[f"p{p:g}"]["best_val"] for p in RATES[1:]) < by["p0"]["best_val"],
        "every_site_narrows_gap": all(gap[f"p0.2-{s}-only"] < gap["p0"] for s in SITES),
        "all_sites_narrow_most": gap["p0.2"] < min(gap[f"p0.2-{s}-only"] for s in SITES),
        "early_ends_like_no_dropout": abs(gap["p0.2-early"] - gap["p0"]) < abs(gap["p0.2-early"] - gap["p0.2"]),
    }


def run(ctx: Context) -> dict:
    summaries = run_all(ctx, specs(ctx))
    cells = [{"setting": name, **desc, **{k: summaries[name][k] for k in
                                           ("best_val", "best_step", "final_train", "final_val", "gap")}}
             for name, _, _, desc in settings()]
    results = {"study": NAME, "cells": cells, "findings": findings(cells),
               "settings": {"scale": ctx.scale, "steps": summaries["p0"]["steps"],
                            "train_tokens": BASE[ctx.scale]["train_tokens"]},
               "runs": summaries}
    plots.curves({f"p={p:g}": summaries[f"p{p:g}"] for p in RATES}, ctx.out / "curves_rate.png",
                 "constant dropout at every site")
    plots.curves({name: summaries[name] for name in ("p0", "p0.2", "p0.2-early", "p0.2-linear")},
                 ctx.out / "curves_schedule.png", "dropout schedules at p=0.2")
    plots.curves({name: summaries[name] for name in ("p0", "p0.2", *(f"p0.2-{s}-only" for s in SITES))},
                 ctx.out / "curves_site.png", "dropout sites at p=0.2")
    plots.bars([c["setting"].replace("-only", "").replace("p0.2-", "") for c in cells],
               {"final train-val gap": [c["gap"] for c in cells]}, ctx.out / "gap.png",
               "final train-val gap per setting", "nats/token")
    write_outputs(ctx, results, report(ctx, results))
    return results


def conclusion(results: dict) -> str:
    by = {c["setting"]: c for c in results["cells"]}
    gaps = ", ".join(f"{by[f'p{p:g}']['gap']:.4f} at p={p:g}" for p in RATES)
    best = min((by[f"p{p:g}"] for p in RATES), key=lambda c: c["best_val"])
    sites = ", ".join(f"{s} {by[f'p0.2-{s}-only']['gap']:.4f}" for s in SITES)
    e, z, t = by["p0.2-early"]["gap"], by["p0"]["gap"], by["p0.2"]["gap"]
    s = {
        "dropout_narrows_gap": (f"Every constant rate narrowed the final train-val gap below no dropout's ({gaps}).",
                                f"Not every constant rate narrowed the gap below no dropout's ({gaps})."),
        "gap_falls_as_p_rises": ("The gap fell at each step up in p.",
                                 "The gap did not fall at each step up in p."),
        "dropout_lowers_best_val": (f"Dropout also lowered the best val loss: {best['best_val']:.4f} at p="
                                    f"{best['dropout']:g} against {by['p0']['best_val']:.4f} without.",
                                    f"Dropout did not lower the best val loss ({by['p0']['best_val']:.4f} without, "
                                    f"{best['best_val']:.4f} at best with)."),
        "every_site_narrows_gap": (f"Each site alone at 0.2 narrowed the gap (gaps: {sites}).",
                                   f"Not every site alone narrowed the gap (gaps: {sites}; {z:.4f} without)."),
        "all_sites_narrow_most": (f"All sites together narrowed it most ({t:.4f}).",
                                  f"All sites together ({t:.4f}) did not narrow it more than every single site."),
        "early_ends_like_no_dropout": (f"Early dropout, off after the first fifth of training, ended with a gap "
                                       f"({e:.4f}) nearer no dropout's ({z:.4f}) than constant 0.2's ({t:.4f}): the "
                                       "overfitting happens late, after it is switched off.",
                                       f"Early dropout ended with a gap ({e:.4f}) nearer constant 0.2's ({t:.4f}) "
                                       f"than no dropout's ({z:.4f})."),
    }
    return findings_text(results["findings"], EXPECTED, s)


def report(ctx: Context, results: dict) -> str:
    cols = [("setting", "setting", "s"), ("dropout", "p", "g"), ("schedule", "schedule", "s"), ("sites", "sites", "s"),
            ("best_val", "best val", ".4f"), ("best_step", "at step", "d"), ("final_train", "final train", ".4f"),
            ("final_val", "final val", ".4f"), ("gap", "gap", ".4f")]
    s = results["settings"]
    return (f"# Study: dropout rates, schedules and sites\n\nCommand: `{ctx.command()}`\n\n"
            f"Nine runs of {s['steps']} steps on the first {s['train_tokens']:,} training tokens. Losses in "
            "nats/token on the training loop's fixed eval windows, in eval mode.\n\n" + table(results["cells"], cols)
            + "\n![rates](curves_rate.png)\n\n![schedules](curves_schedule.png)\n\n![sites](curves_site.png)\n\n"
            f"![gap](gap.png)\n\n## Conclusion\n\n{conclusion(results)}\n")
