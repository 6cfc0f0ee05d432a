"""`lmlab study sampling [--model SOURCE]`: what each decoding strategy does to the text of one model.

For fixed prompts and N samples per strategy (greedy; temperature 0.7/1.0/1.3; top-k 1/10/50/full; top-p
0.9/0.95; min-p 0.05; repetition penalty 1.2), all through lmlab.infer.generate's engine: distinct-1/2, the repeated
4-gram rate and the distinct continuations (diversity), and the mean per-token log-probability of the samples
under the model's own unfiltered distribution (a quality proxy). The filters act on the logits at inference
only (lmlab/infer/generate.py, in HF's order); the model's weights are the same in every cell.
"""

from __future__ import annotations

from lmlab.config import SamplingConfig
from lmlab.study import plots
from lmlab.study.core import Context, findings_text, once, table, write_outputs
from lmlab.study.text import diversity, mean_logprob, sample_ids

NAME = "sampling"
DEFAULT_MODEL = "smollm2-135m-instruct"
PROMPTS = ("ROMEO:\n", "The king said", "Once upon a time")
STRATEGIES: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "temperature=0.7": dict(temperature=0.7),
    "temperature=1.0": dict(temperature=1.0),
    "temperature=1.3": dict(temperature=1.3),
    "top_k=1": dict(temperature=1.0, top_k=1),
    "top_k=10": dict(temperature=1.0, top_k=10),
    "top_k=50": dict(temperature=1.0, top_k=50),
    "top_k=full": dict(temperature=1.0, top_k=0),
    "top_p=0.9": dict(temperature=1.0, top_p=0.9),
    "top_p=0.95": dict(temperature=1.0, top_p=0.95),
    "min_p=0.05": dict(temperature=1.0, min_p=0.05),
    "repetition_penalty=1.2": dict(temperature=1.0, repetition_penalty=1.2),
}
SCALES = {"tiny": dict(n_samples=3, new_tokens=16), "default": dict(n_samples=10, new_tokens=64),
          "gpu": dict(n_samples=50, new_tokens=128)}
EXPECTED = {"greedy_least_diverse": True, "top_k1_is_greedy": True, "temperature_trades_logprob_for_diversity": True,
            "truncation_raises_logprob": True, "repetition_penalty_cuts_repeats": True}


def check_model(ctx: Context):
    """Load the model (a clear error if it cannot be), before anything is written."""
    import lmlab

    lm = lmlab.load(ctx.model or DEFAULT_MODEL, device=ctx.device)
    if lm.tokenizer is None:
        from lmlab.errors import LmlabError

        raise LmlabError(f"{lm.source} has no tokenizer, so it cannot be prompted; give a model with one")
    return lm


def measure(lm, strategy: dict, n: int, new_tokens: int) -> dict:
    """One strategy's numbers over every prompt: diversity pooled per prompt and averaged, log-prob over all."""
    from lmlab.errors import LmlabError

    per_prompt, logps = [], []
    for prompt in PROMPTS:
        try:
            ids, rows = sample_ids(lm, prompt, SamplingConfig(max_new_tokens=new_tokens, seed=0, **strategy), n)
        except LmlabError:  # a char model without these characters: the prompt is skipped for every strategy
            continue
        per_prompt.append(diversity([lm.tokenizer.decode(r) for r in rows]))
        logps.append(mean_logprob(lm.model, ids, rows))
    if not per_prompt:
        raise LmlabError(f"none of the prompts {list(PROMPTS)} can be encoded by {lm.source}'s tokenizer")
    out = {k: sum(d[k] for d in per_prompt) / len(per_prompt) for k in ("distinct_1", "distinct_2",
                                                                          "repeated_4gram_rate")}
    return {**out, "distinct_continuations": sum(d["distinct_continuations"] for d in per_prompt),
            "mean_logprob": sum(logps) / len(logps), "prompts": len(per_prompt)}


def findings(cells: list[dict]) -> dict[str, bool]:
    by = {c["strategy"]: c for c in cells}
    temps = [by[f"temperature={t}"] for t in ("0.7", "1.0", "1.3")]
    full = by["temperature=1.0"]
    return {
        "greedy_least_diverse": all(by["greedy"]["distinct_2"] <= c["distinct_2"] for c in cells),
        "top_k1_is_greedy": by["top_k=1"]["distinct_2"] == by["greedy"]["distinct_2"]
        and abs(by["top_k=1"]["mean_logprob"] - by["greedy"]["mean_logprob"]) < 1e-6,
        "temperature_trades_logprob_for_diversity": all(
            a["distinct_2"] <= b["distinct_2"] and a["mean_logprob"] > b["mean_logprob"]
            for a, b in zip(temps, temps[1:], strict=False)),
        "truncation_raises_logprob": all(by[s]["mean_logprob"] > full["mean_logprob"]
                                         for s in ("top_k=10", "top_p=0.9", "min_p=0.05")),
        "repetition_penalty_cuts_repeats": by["repetition_penalty=1.2"]["repeated_4gram_rate"]
        <= full["repeated_4gram_rate"],
    }


def run(ctx: Context) -> dict:
    from tqdm.auto import tqdm

    lm = ctx.loaded or check_model(ctx)
    sc = SCALES[ctx.scale]
    cells = []
    for name, strategy in tqdm(STRATEGIES.items(), desc="study sampling", unit="strategy", disable=ctx.quiet):
        settings = {"model": ctx.model or DEFAULT_MODEL, "strategy": strategy, **sc, "prompts": list(PROMPTS)}
        measured = once(ctx, name, settings, lambda s=strategy: measure(lm, s, sc["n_samples"], sc["new_tokens"]))
        cells.append({"strategy": name, **strategy, **measured})
    results = {"study": NAME, "cells": cells, "findings": findings(cells),
               "settings": {"scale": ctx.scale, "model": ctx.model or DEFAULT_MODEL, **sc, "prompts": list(PROMPTS)}}
    plots.scatter({c["strategy"]: (c["distinct_2"], c["mean_logprob"]) for c in cells}, ctx.out / "diversity.png",
                  "diversity against log-probability, per strategy", "distinct-2 (word bigrams)",
                  "mean log-prob per token under the model")
    write_outputs(ctx, results, report(ctx, results))
    return results


def conclusion(results: dict) -> str:
    by = {c["strategy"]: c for c in results["cells"]}
    g, k1, full, rp = by["greedy"], by["top_k=1"], by["temperature=1.0"], by["repetition_penalty=1.2"]
    temps = "; ".join(f"T={t}: distinct-2 {by[f'temperature={t}']['distinct_2']:.3f}, log-prob "
                      f"{by[f'temperature={t}']['mean_logprob']:.3f}" for t in ("0.7", "1.0", "1.3"))
    trunc = ", ".join(f"{s} {by[s]['mean_logprob']:.3f}" for s in ("top_k=10", "top_p=0.9", "min_p=0.05"))
    s = {
        "greedy_least_diverse": (f"Greedy decoding was the least diverse (distinct-2 {g['distinct_2']:.3f}).",
                                 f"Greedy decoding (distinct-2 {g['distinct_2']:.3f}) was not the least diverse."),
        "top_k1_is_greedy": ("Top-k 1 gave greedy's text exactly, as it must.",
                             f"Top-k 1 differed from greedy (log-prob {k1['mean_logprob']:.4f} vs "
                             f"{g['mean_logprob']:.4f})."),
        "temperature_trades_logprob_for_diversity": (
            f"Raising the temperature bought diversity with log-probability ({temps}).",
            f"Temperature did not trade log-probability for diversity at every step ({temps})."),
        "truncation_raises_logprob": (
            f"Truncating the tail raised the samples' log-probability above the full distribution's "
            f"({full['mean_logprob']:.3f}): {trunc}.",
            f"Truncating the tail did not always raise the log-probability above the full distribution's "
            f"({full['mean_logprob']:.3f}): {trunc}."),
        "repetition_penalty_cuts_repeats": (
            f"The repetition penalty cut the repeated 4-gram rate ({full['repeated_4gram_rate']:.3f} -> "
            f"{rp['repeated_4gram_rate']:.3f}).",
            f"The repetition penalty did not cut the repeated 4-gram rate ({full['repeated_4gram_rate']:.3f} -> "
            f"{rp['repeated_4gram_rate']:.3f})."),
    }
    return findings_text(results["findings"], EXPECTED, s)


def report(ctx: Context, results: dict) -> str:
    cols = [("strategy", "strategy", "s"), ("distinct_1", "distinct-1", ".3f"), ("distinct_2", "distinct-2", ".3f"),
            ("repeated_4gram_rate", "rep. 4-gram", ".3f"), ("mean_logprob", "log-prob/token", ".3f"),
            ("distinct_continuations", "distinct cont.", "d")]
    s = results["settings"]
    return (f"# Study: sampling strategies\n\nCommand: `{ctx.command()}`\n\nModel `{s['model']}`; "
            f"{s['n_samples']} samples of {s['new_tokens']} tokens for each of {len(s['prompts'])} prompts per "
            "strategy (seed 0). Diversity over word n-grams, averaged over prompts; distinct continuations summed "
            "over prompts; log-probability per generated token under the unfiltered model.\n\n"
            + table(results["cells"], cols) + "\n![diversity vs log-prob](diversity.png)\n\n"
            f"## Conclusion\n\n{conclusion(results)}\n")
