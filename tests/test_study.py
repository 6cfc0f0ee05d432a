"""lmlab study: each study at its tiny scale on the conftest corpus, checked from its results.json and report.md.

Every finding is recomputed here from the runs' own numbers, not from results.json: the training loop's
metrics.jsonl of each run (read here), and for what sampling decides, samples drawn here from the runs' models with
the study's settings, their diversity and log-probability counted by this file; the issue's definitions are written
out again (not imported). results.json's numbers must be those numbers; the report's conclusion must say what the
findings say; resuming must not redo finished runs, and an interrupted run must continue to exactly the numbers of
an uninterrupted one."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch

from lmlab.cli import main

CELL_KEYS = {"dropout", "sampling", "best_val", "final_train", "final_val", "gap", "distinct_2", "repeated_4gram_rate",
             "distinct_continuations"}
# The expectations, which each report must flag when contradicted.
EXPECTED = {"dropout_narrows_gap": True, "topk_changes_val_loss": False, "topk_raises_diversity": True,
            "eval_deterministic": True, "mc_dropout_varies": True}


def study(capsys, *args: str) -> tuple[int, str]:
    rc = main(["study", *args, "--device", "cpu", "--quiet"])
    return rc, capsys.readouterr().err


def finite_numbers(x, where="results"):
    """Every number in a JSON tree, asserting each is a finite float or int (bools are not numbers here)."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from finite_numbers(v, f"{where}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from finite_numbers(v, f"{where}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        assert math.isfinite(x), where
        yield x


def from_metrics(run_dir: Path) -> dict:
    """A run's numbers from its metrics.jsonl, the training loop's own log: best and final val loss, the final
    train-val gap (at the last evaluation), the median training tokens/s, training seconds per step (at the stop
    event) and whether its loss blew up."""
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [e for e in events if e["event"] == "eval" and math.isfinite(e["val_loss"])]
    stop = [e for e in events if e["event"] == "stop"][-1]
    speeds = [e["tok_per_s"] for e in events if e["event"] == "train" and e.get("tok_per_s")]
    return {"best_val": min(e["val_loss"] for e in evals), "final_val": evals[-1]["val_loss"],
            "gap": evals[-1]["val_loss"] - evals[-1]["train_loss"], "steps": stop["step"],
            "tok_per_s": statistics.median(speeds) if speeds else 0.0,
            "s_per_step": stop.get("elapsed_s", 0.0) / max(stop["step"], 1),
            "diverged": stop["reason"].startswith("loss became")}


def distinct(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all of them, pooled over the texts (Li et al. 2016)."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated(texts: list[str], n: int = 4) -> float:
    """Word n-grams that occurred earlier in the same text, over all of them."""
    hits = total = 0
    for w in (t.split() for t in texts):
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        hits += sum(g in grams[:i] for i, g in enumerate(grams))
        total += len(grams)
    return hits / total if total else 0.0


@torch.no_grad()
def logprob_per_token(model, prompt: list[int], rows: list[list[int]]) -> float:
    """The mean log-probability of the rows' tokens after the prompt, by one plain forward pass a row."""
    lps = []
    for row in rows:
        x = torch.tensor([prompt + row])
        lp = torch.log_softmax(model.eval()(x)[0, :-1].float(), dim=-1)  # (T-1, V): position t predicts t+1
        lps += lp[len(prompt) - 1:].gather(1, x[0, len(prompt):, None]).flatten().tolist()
    return sum(lps) / len(lps)


def check_curve(run: dict, steps: int, interval: int) -> None:
    """An eval at step 0, every `interval`, and at the last step; best and final read off it."""
    c = run["curve"]
    assert c["step"] == sorted(set(range(0, steps + 1, interval)) | {steps})
    assert len(c["val"]) == len(c["train"]) == len(c["elapsed_s"]) == len(c["step"])
    assert run["best_val"] == min(c["val"]) and c["step"][c["val"].index(run["best_val"])] == run["best_step"]
    assert run["final_val"] == c["val"][-1] and run["final_train"] == c["train"][-1]


def conclusion(out: Path) -> str:
    report = (out / "report.md").read_text()
    return report.split("## Conclusion", 1)[1]


def check_flags(text: str, findings: dict) -> None:
    """The conclusion flags exactly the findings that contradict the expectation."""
    against = sorted(n for n, v in findings.items() if v != EXPECTED[n])
    flagged = sorted(re.findall(r"contradicts the expectation \((\w+) = ", text))
    assert flagged == against, (flagged, against, text)
    assert (f"{len(against)} of {len(findings)} findings contradict" in text) == bool(against)


@pytest.fixture(scope="module")
def dvt(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("dvt") / "study"
    assert main(["study", "dropout-vs-topk", "--scale", "tiny", "--data", str(char_data), "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    return out


def test_dropout_vs_topk_results(dvt):
    r = json.loads((dvt / "results.json").read_text())
    assert r["study"] == "dropout-vs-topk"
    assert set(r) >= {"study", "cells", "eval_deterministic", "mc_dropout_logit_std", "findings"}
    assert all(set(c) == CELL_KEYS for c in r["cells"])
    assert sorted((c["dropout"], c["sampling"]) for c in r["cells"]) == [
        (0.0, "greedy"), (0.0, "top_k=40"), (0.2, "greedy"), (0.2, "top_k=40")]
    assert list(finite_numbers(r))
    by = {(c["dropout"], c["sampling"]): c for c in r["cells"]}
    runs = {0.0: r["runs"]["dropout-0"], 0.2: r["runs"]["dropout-0.2"]}
    m = {p: from_metrics(dvt / "runs" / f"dropout-{p:g}") for p in runs}
    for (p, _), c in by.items():
        check_curve(runs[p], 30, 5)
        assert c["best_val"] == runs[p]["best_val"] == m[p]["best_val"] <= c["final_val"] + 1e-9
        # the cell's own measurement, after its sampling, equals the training loop's last evaluation
        assert c["final_val"] == pytest.approx(m[p]["final_val"], abs=1e-5)
        assert c["gap"] == pytest.approx(m[p]["gap"], abs=1e-5)
        assert 0 <= c["distinct_2"] <= 1 and 0 <= c["repeated_4gram_rate"] <= 1
        assert 1 <= c["distinct_continuations"] <= r["settings"]["n_samples"]
    assert by[(0.0, "greedy")]["distinct_continuations"] == 1  # greedy: N identical samples
    texts, same, spread = dvt_samples(dvt, r)
    for key, c in by.items():  # the study's diversity numbers are those of the samples drawn here
        assert (c["distinct_2"], c["distinct_continuations"]) == (distinct(texts[key], 2), len(set(texts[key])))
    f = r["findings"]
    assert f == {
        "dropout_narrows_gap": m[0.2]["gap"] < m[0.0]["gap"],
        "topk_changes_val_loss": any(abs(by[(p, "top_k=40")]["final_val"] - by[(p, "greedy")]["final_val"]) > 1e-6
                                     for p in runs),
        "topk_raises_diversity": all(distinct(texts[(p, "top_k=40")], 2) > distinct(texts[(p, "greedy")], 2)
                                     and len(set(texts[(p, "top_k=40")])) > len(set(texts[(p, "greedy")]))
                                     for p in runs),
        "eval_deterministic": same,
        "mc_dropout_varies": spread > 0,
    }
    assert r["eval_deterministic"] == f["eval_deterministic"]
    # what the tiny runs must find whatever the corpus: eval is deterministic and MC dropout is not, sampling
    # leaves the val loss alone (both cells' equal the loop's last evaluation, above) and (40 tokens to draw from
    # against one) makes the samples more diverse
    assert f["mc_dropout_varies"] and f["eval_deterministic"] and not f["topk_changes_val_loss"]
    assert f["topk_raises_diversity"]


@torch.no_grad()
def dvt_samples(dvt: Path, r: dict) -> tuple[dict, bool, float]:
    """Each cell's samples, drawn here from its run's final model with the study's settings (N rows of the study's
    prompt, row b seeded 0 + b); whether two eval-mode passes of every model agree exactly; and the mean spread of
    the logits over 10 passes of the dropout model with its dropout on."""
    import lmlab

    n, new = r["settings"]["n_samples"], r["settings"]["max_new_tokens"]
    texts, same = {}, True
    for p in (0.0, 0.2):
        lm = lmlab.load(dvt / "runs" / f"dropout-{p:g}" / "last", device="cpu")
        prompt = r["runs"][f"dropout-{p:g}"]["prompt"]
        for name, setting in (("greedy", dict(temperature=0.0)), ("top_k=40", dict(temperature=1.0, top_k=40))):
            texts[(p, name)] = lm.generate([prompt] * n, max_new_tokens=new, seed=0, **setting)
        x = torch.tensor([lm.tokenizer.encode(prompt)])
        lm.model.eval()
        same = same and torch.equal(lm.model(x), lm.model(x))
    lm.model.train()  # the p = 0.2 model: MC dropout
    spread = torch.stack([lm.model(x) for _ in range(10)]).std(dim=0).mean().item()
    return texts, same, spread


def test_dropout_vs_topk_report(dvt):
    r = json.loads((dvt / "results.json").read_text())
    text = conclusion(dvt)
    check_flags(text, r["findings"])
    by = {(c["dropout"], c["sampling"]): c for c in r["cells"]}
    gaps = f"{by[(0.0, 'greedy')]['gap']:.4f}", f"{by[(0.2, 'greedy')]['gap']:.4f}"
    assert all(g in text for g in gaps)
    assert ("left the val loss unchanged" in text) == (not r["findings"]["topk_changes_val_loss"])
    assert ("Top-k raised diversity" in text) == r["findings"]["topk_raises_diversity"]
    assert f"{r['mc_dropout_logit_std']:.4f}" in text
    for png in ("curves.png", "diversity.png"):
        assert (dvt / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (dvt / png).stat().st_size < 100_000


def test_rerun_redoes_nothing(dvt, capsys):
    marks = sorted(dvt.glob("runs/*/study_run.json"))
    assert len(marks) == 2
    before = {p: p.stat().st_mtime_ns for p in marks + sorted(dvt.glob("runs/*/metrics.jsonl"))}
    saved = json.loads((dvt / "results.json").read_text())
    rc, err = study(capsys, "dropout-vs-topk", "--scale", "tiny", "--data", str(json.loads(
        (dvt / "study.json").read_text())["data"]), "--out", str(dvt))
    assert rc == 0, err
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert json.loads((dvt / "results.json").read_text()) == saved


def test_interrupted_run_resumes_exactly(dvt, char_data, tmp_path, capsys, monkeypatch):
    """A Ctrl-C at step 12 of the first run (the loop's own stop path), then the same command: the study picks the
    run up from its last/ checkpoint and ends with the curves of the uninterrupted study."""
    import lmlab.training.loop

    calls = {"n": 0}
    real = lmlab.training.loop.broadcast_flag

    def stop_at_12(flag, info):
        calls["n"] += 1
        return real(flag, info) or calls["n"] == 12

    out = tmp_path / "study"
    args = ("dropout-vs-topk", "--scale", "tiny", "--data", str(char_data), "--out", str(out))
    monkeypatch.setattr(lmlab.training.loop, "broadcast_flag", stop_at_12)
    assert main(["study", *args, "--device", "cpu", "--quiet"]) == 130  # as after a Ctrl-C
    monkeypatch.undo()
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not (out / "runs" / "dropout-0" / "study_run.json").exists()
    meta = json.loads((out / "runs" / "dropout-0" / "last" / "lmlab.json").read_text())
    assert meta["run_state"]["step"] == 12
    rc, err = study(capsys, *args)
    assert rc == 0, err
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, dvt))
    for name in ("dropout-0", "dropout-0.2"):
        assert got["runs"][name]["curve"]["val"] == want["runs"][name]["curve"]["val"]
        assert got["runs"][name]["curve"]["train"] == want["runs"][name]["curve"]["train"]
    assert got["cells"] == want["cells"]


def test_bad_input(dvt, char_data, tmp_path, capsys):
    cases = [
        (("no-such-study", "--out", str(tmp_path / "a")), "unknown study 'no-such-study'"),
        (("dropout-vs-topk", "--scale", "huge", "--out", str(tmp_path / "b")), "unknown scale 'huge'"),
        (("dropout-vs-topk", "--steps", "3", "--out", str(tmp_path / "c")), "too small to evaluate"),
        (("dropout-vs-topk", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "d")), "not found"),
        (("dropout-vs-topk", "--scale", "default", "--data", str(char_data), "--out", str(dvt)), "scale='tiny'"),
        (("dropout-vs-topk", "--scale", "tiny", "--data", str(char_data), "--out", str(char_data)),
         "did not write"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((("dropout", "--scale", "gpu", "--out", str(tmp_path / "g")), "needs a GPU"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "study.json").write_text(json.dumps({"study": "dropout"}))
    cases.append((("dropout-vs-topk", "--scale", "tiny", "--out", str(tmp_path / "other")),
                  "holds the study 'dropout'"))
    for args, message in cases:
        rc, err = study(capsys, *args)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("lmlab: error: ") and message in err, (args, err)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_dropout_study(tmp_path, char_data, capsys):
    out = tmp_path / "study"
    rc, err = study(capsys, "dropout", "--scale", "tiny", "--data", str(char_data), "--out", str(out))
    assert rc == 0, err
    r = json.loads((out / "results.json").read_text())
    assert r["study"] == "dropout" and list(finite_numbers(r))
    by = {c["setting"]: c for c in r["cells"]}
    assert sorted(by) == sorted(["p0", "p0.1", "p0.2", "p0.3", "p0.2-early", "p0.2-linear", "p0.2-embed-only",
                                 "p0.2-attn-only", "p0.2-resid-only"])
    m = {name: from_metrics(out / "runs" / name) for name in by}
    for name, c in by.items():
        run = r["runs"][name]
        check_curve(run, 30, 5)
        assert (c["best_val"], c["best_step"], c["final_val"]) == (run["best_val"], run["best_step"], run["final_val"])
        assert (c["best_val"], c["final_val"]) == (m[name]["best_val"], m[name]["final_val"])
        assert c["gap"] == pytest.approx(c["final_val"] - c["final_train"], abs=1e-9)
        assert c["gap"] == pytest.approx(m[name]["gap"], abs=1e-12)
    # the settings really differ where they should: the training loop logged the rates it used
    events = [json.loads(line) for line in (out / "runs" / "p0.2-attn-only" / "metrics.jsonl").read_text().splitlines()]
    assert {tuple(e["dropout"]) for e in events if e["event"] == "train"} == {(0.0, 0.2, 0.0)}
    early = [json.loads(line) for line in (out / "runs" / "p0.2-early" / "metrics.jsonl").read_text().splitlines()]
    rates = [e["dropout"][0] for e in early if e["event"] == "train"]
    assert rates[0] == 0.2 and rates[-1] == 0.0
    gap = {n: m[n]["gap"] for n in by}  # the loop's last evaluation of each run, from its metrics.jsonl
    const = [gap[n] for n in ("p0", "p0.1", "p0.2", "p0.3")]
    assert r["findings"] == {
        "dropout_narrows_gap": all(g < const[0] for g in const[1:]),
        "gap_falls_as_p_rises": const[1] < const[0] and const[2] < const[1] and const[3] < const[2],
        "dropout_lowers_best_val": min(m[n]["best_val"] for n in ("p0.1", "p0.2", "p0.3")) < m["p0"]["best_val"],
        "every_site_narrows_gap": all(gap[f"p0.2-{s}-only"] < gap["p0"] for s in ("embed", "attn", "resid")),
        "all_sites_narrow_most": gap["p0.2"] < min(gap[f"p0.2-{s}-only"] for s in ("embed", "attn", "resid")),
        "early_ends_like_no_dropout": abs(gap["p0.2-early"] - gap["p0"]) < abs(gap["p0.2-early"] - gap["p0.2"]),
    }
    expected = {k: True for k in r["findings"]}
    text = conclusion(out)
    against = sorted(n for n, v in r["findings"].items() if v != expected[n])
    assert sorted(re.findall(r"contradicts the expectation \((\w+) = ", text)) == against
    for png in ("curves_rate.png", "curves_schedule.png", "curves_site.png", "gap.png"):
        assert (out / png).stat().st_size < 100_000


def test_sampling_study(tmp_path, char_run, capsys):
    out = tmp_path / "study"
    rc, err = study(capsys, "sampling", "--scale", "tiny", "--model", str(char_run), "--out", str(out))
    assert rc == 0, err
    r = json.loads((out / "results.json").read_text())
    assert r["study"] == "sampling" and list(finite_numbers(r))
    by = {c["strategy"]: c for c in r["cells"]}
    assert sorted(by) == sorted(["greedy", "temperature=0.7", "temperature=1.0", "temperature=1.3", "top_k=1",
                                 "top_k=10", "top_k=50", "top_k=full", "top_p=0.9", "top_p=0.95", "min_p=0.05",
                                 "repetition_penalty=1.2"])
    n = r["settings"]["n_samples"]
    for c in by.values():
        assert 0 <= c["distinct_1"] <= 1 and 0 <= c["distinct_2"] <= 1 and c["mean_logprob"] < 0
        assert c["prompts"] <= c["distinct_continuations"] <= c["prompts"] * n
    assert by["greedy"]["distinct_continuations"] == by["greedy"]["prompts"]  # N identical samples per prompt
    # top-k 1 at temperature 1 and greedy pick the same tokens: the same text, the same log-probability
    assert by["top_k=1"]["mean_logprob"] == pytest.approx(by["greedy"]["mean_logprob"], abs=1e-6)
    got = sampled(char_run, r["settings"])  # the samples drawn here, counted here
    for name, c in by.items():
        for key in ("distinct_2", "repeated_4gram_rate", "mean_logprob"):
            assert c[key] == pytest.approx(got[name][key], abs=1e-5), (name, key)
    temps = [got[f"temperature={t}"] for t in ("0.7", "1.0", "1.3")]
    full = got["temperature=1.0"]
    assert r["findings"] == {
        "greedy_least_diverse": all(got["greedy"]["distinct_2"] <= c["distinct_2"] for c in got.values()),
        "top_k1_is_greedy": got["top_k=1"]["texts"] == got["greedy"]["texts"],
        "temperature_trades_logprob_for_diversity": all(a["distinct_2"] <= b["distinct_2"]
                                                        and a["mean_logprob"] > b["mean_logprob"]
                                                        for a, b in ((temps[0], temps[1]), (temps[1], temps[2]))),
        "truncation_raises_logprob": all(got[s]["mean_logprob"] > full["mean_logprob"]
                                         for s in ("top_k=10", "top_p=0.9", "min_p=0.05")),
        "repetition_penalty_cuts_repeats": got["repetition_penalty=1.2"]["repeated_4gram_rate"]
        <= full["repeated_4gram_rate"],
    }
    # the findings the settings decide whatever the model: top-k 1 is greedy, and nothing is less diverse
    assert r["findings"]["top_k1_is_greedy"] and r["findings"]["greedy_least_diverse"]
    text = conclusion(out)
    against = sorted(n for n, v in r["findings"].items() if not v)
    assert sorted(re.findall(r"contradicts the expectation \((\w+) = ", text)) == against
    assert (out / "diversity.png").stat().st_size < 100_000
    marks = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/study_run.json")}
    assert len(marks) == 12
    rc, err = study(capsys, "sampling", "--scale", "tiny", "--model", str(char_run), "--out", str(out))
    assert rc == 0 and {p: p.stat().st_mtime_ns for p in marks} == marks


# The sampling study's strategies and prompts, written out again (not imported).
STRATEGIES = {"greedy": dict(temperature=0.0), "temperature=0.7": dict(temperature=0.7),
              "temperature=1.0": dict(temperature=1.0), "temperature=1.3": dict(temperature=1.3),
              "top_k=1": dict(temperature=1.0, top_k=1), "top_k=10": dict(temperature=1.0, top_k=10),
              "top_k=50": dict(temperature=1.0, top_k=50), "top_k=full": dict(temperature=1.0, top_k=0),
              "top_p=0.9": dict(temperature=1.0, top_p=0.9), "top_p=0.95": dict(temperature=1.0, top_p=0.95),
              "min_p=0.05": dict(temperature=1.0, min_p=0.05),
              "repetition_penalty=1.2": dict(temperature=1.0, repetition_penalty=1.2)}
PROMPTS = ("ROMEO:\n", "The king said", "Once upon a time")


def sampled(model_dir: Path, settings: dict) -> dict[str, dict]:
    """Per strategy: N samples of each prompt drawn here (seed 0, row b seeded b), their distinct-2 and repeated
    4-gram rate averaged over the prompts, and the mean over prompts of their tokens' log-probability under the
    unfiltered model (one plain forward pass a sample)."""
    import lmlab

    lm = lmlab.load(model_dir, device="cpu")
    n, new, tok = settings["n_samples"], settings["new_tokens"], lm.tokenizer
    out = {}
    for name, strategy in STRATEGIES.items():
        texts = [lm.generate([p] * n, max_new_tokens=new, seed=0, **strategy) for p in PROMPTS]
        out[name] = {"texts": texts, "distinct_2": statistics.mean(distinct(t, 2) for t in texts),
                     "repeated_4gram_rate": statistics.mean(repeated(t) for t in texts),
                     "mean_logprob": statistics.mean(logprob_per_token(lm.model, tok.encode(p), [tok.encode(x)
                                                                                                for x in t])
                                                     for p, t in zip(PROMPTS, texts, strict=True))}
    return out


def test_sampling_model_that_cannot_load(tmp_path, char_data, capsys):
    for model in (str(tmp_path / "missing"), str(char_data), "no-such-model"):
        rc, err = study(capsys, "sampling", "--scale", "tiny", "--model", model, "--out", str(tmp_path / "s"))
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("lmlab: error: "), err
    rc, err = study(capsys, "dropout", "--scale", "tiny", "--model", str(tmp_path), "--out", str(tmp_path / "s"))
    assert rc == 2 and "--model is for the sampling study" in err
    assert not (tmp_path / "s").exists()


# The optimizer study's grid, written out again (not imported): an entry per optimizer and lr, batch and init.
OPT_GRIDS = {"sgd": (0.3, 1.0, 3.0), "momentum": (0.03, 0.1, 0.3), "nesterov": (0.03, 0.1, 0.3),
             "adagrad": (3e-3, 1e-2, 3e-2), "rmsprop": (3e-4, 1e-3, 3e-3), "adam": (1e-3, 3e-3, 1e-2),
             "adamw": (1e-3, 3e-3, 1e-2), "muon": (3e-3, 1e-2, 3e-2)}


@pytest.fixture(scope="module")
def opt_study(tmp_path_factory, char_data):
    import torch

    threads = torch.get_num_threads()  # the tiny scale trains on one thread; give the other tests theirs back
    out = tmp_path_factory.mktemp("opt") / "study"
    try:
        assert main(["study", "optimizers", "--scale", "tiny", "--data", str(char_data), "--out", str(out),
                     "--device", "cpu", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_optimizers_study(opt_study):
    r = json.loads((opt_study / "results.json").read_text())
    assert r["study"] == "optimizers" and list(finite_numbers(r))
    cells = r["cells"]
    grid = {(c["optimizer"], c["lr"]): c for c in cells if c["group"] == "lr"}
    assert sorted(grid) == sorted((o, lr) for o, lrs in OPT_GRIDS.items() for lr in lrs)
    batch = sorted((c for c in cells if c["group"] == "batch"), key=lambda c: c["batch_size"])
    assert [c["batch_size"] for c in batch] == [2, 8, 32]
    assert len({c["tokens_seen"] for c in batch}) == 1  # one token budget
    init = {c["init"]: c for c in cells if c["group"] == "init"}
    lb = {c["optimizer"]: c for c in cells if c["group"] == "lbfgs"}
    assert sorted(init) == ["gpt2", "orthogonal", "xavier"] and sorted(lb) == ["adamw", "lbfgs"]
    for c in cells:  # tiny: 12 steps, eval every 4; batch b: 12 * 8 / b steps, eval every 4 * 8 / b; L-BFGS 10, 2
        run = r["runs"][c["run"]]
        steps, every = {"lbfgs": (10, 2), "batch": (96 // c["batch_size"], 32 // c["batch_size"])}.get(c["group"],
                                                                                                        (12, 4))
        if not run["diverged"]:
            check_curve(run, steps, every)
        assert (c["best_val"], c["best_step"], c["tok_per_s"]) == (run["best_val"], run["best_step"], run["tok_per_s"])
    # the settings really differ where they should: the runs' saved train configs
    for c in cells:
        tc = json.loads((opt_study / "runs" / c["run"] / "last" / "lmlab.json").read_text())["train_config"]
        assert (tc["optimizer"], tc["lr"], tc["batch_size"], tc["init"]) == (c["optimizer"], c["lr"], c["batch_size"],
                                                                            c["init"])
    m = {c["run"]: from_metrics(opt_study / "runs" / c["run"]) for c in cells}  # the loop's own numbers
    for c in cells:
        run = m[c["run"]]
        assert (c["best_val"], c["diverged"], c["steps"]) == (run["best_val"], run["diverged"], run["steps"])
        assert c["gap"] == pytest.approx(run["gap"], abs=1e-12)
    # the target and each time to it, from the curves
    best = {o: min((grid[(o, lr)] for lr in lrs if not m[grid[(o, lr)]["run"]]["diverged"]),
                   key=lambda c: m[c["run"]]["best_val"]) for o, lrs in OPT_GRIDS.items()}
    vals = sorted(c["best_val"] for c in best.values())
    assert r["target_loss"] == pytest.approx((vals[3] + vals[4]) / 2)
    for c in cells:
        curve = r["runs"][c["run"]]["curve"]
        hits = [i for i, v in enumerate(curve["val"]) if v <= r["target_loss"]]
        assert c["time_to_target_s"] == (curve["elapsed_s"][hits[0]] if hits else None)
    assert {o: b["setting"] for o, b in r["best"].items()} == {o: c["setting"] for o, c in best.items()}
    v = {o: m[c["run"]]["best_val"] for o, c in best.items()}
    bv, speed = ([m[c["run"]][k] for c in batch] for k in ("best_val", "tok_per_s"))
    iv = {i: m[c["run"]]["best_val"] for i, c in init.items()}
    lbm = {o: m[c["run"]] for o, c in lb.items()}
    assert r["findings"] == {
        "adaptive_beats_sgd": min(v["adagrad"], v["rmsprop"], v["adam"], v["adamw"]) < v["sgd"],
        "momentum_beats_sgd": min(v["momentum"], v["nesterov"]) < v["sgd"],
        "muon_or_adamw_best": min(v, key=v.get) in ("muon", "adamw"),
        "best_lr_inside_grid": all(c["lr"] == OPT_GRIDS[o][1] for o, c in best.items()),
        "smaller_batches_better_per_token": bv[0] < bv[1] < bv[2],
        "larger_batches_faster": speed[0] < speed[1] < speed[2],
        "gpt2_init_best": iv["gpt2"] < min(iv["xavier"], iv["orthogonal"]),
        "lbfgs_costlier_per_step": lbm["lbfgs"]["s_per_step"] > lbm["adamw"]["s_per_step"],
        "lbfgs_overfits_its_batch": lbm["lbfgs"]["gap"] > lbm["adamw"]["gap"],
    }
    assert r["findings"]["lbfgs_costlier_per_step"]  # 5 evaluations of its batch a step against AdamW's one
    text = conclusion(opt_study)
    against = sorted(n for n, val in r["findings"].items() if not val)
    assert sorted(re.findall(r"contradicts the expectation \((\w+) = ", text)) == against
    assert f"{v['sgd']:.4f}" in text and all(f"{c['best_val']:.4f}" in text for c in batch)
    for png in ("curves_step.png", "curves_time.png", "lr_grid.png", "batch.png", "init.png"):
        assert (opt_study / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (opt_study / png).stat().st_size < 100_000


def test_optimizers_rerun_redoes_nothing(opt_study, capsys):
    marks = sorted(opt_study.glob("runs/*/study_run.json"))
    assert len(marks) == 24 + 2 + 2 + 2  # the batch-8 and gpt2-init cells reuse the adamw lr 0.003 run
    before = {p: p.stat().st_mtime_ns for p in marks}
    saved = json.loads((opt_study / "results.json").read_text())
    data = json.loads((opt_study / "study.json").read_text())["data"]
    rc, err = study(capsys, "optimizers", "--scale", "tiny", "--data", data, "--out", str(opt_study))
    assert rc == 0, err
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert json.loads((opt_study / "results.json").read_text()) == saved


def test_diverged_run_is_a_result(tmp_path, char_data):
    """In a learning-rate sweep a NaN loss is an outcome: the run is marked finished and diverged, with the curve
    up to the blow-up; anywhere else it stays the training loop's error."""
    from lmlab.config import ModelConfig, TrainConfig
    from lmlab.errors import TrainingDiverged
    from lmlab.study.core import Context, RunSpec, run_all

    mc = ModelConfig(family="gpt2", vocab_size=65, context_length=16, d_model=16, n_layers=1, n_heads=2)
    tc = TrainConfig(optimizer="sgd", lr=1e30, grad_clip=0.0, warmup_steps=0, max_steps=10, batch_size=4,
                     eval_interval=5, eval_batches=1, device="cpu")
    spec = RunSpec("blowup", "sgd lr 1e30", mc, tc, char_data)
    with pytest.raises(TrainingDiverged):
        run_all(Context("t", tmp_path / "a", "tiny", "cpu", None, None, quiet=True), [spec])
    ctx = Context("t", tmp_path / "b", "tiny", "cpu", None, None, quiet=True)
    run = run_all(ctx, [spec], diverged_ok=True)["blowup"]
    assert run["diverged"] and run["curve"]["step"] == [0] and math.isfinite(run["best_val"])
    assert (tmp_path / "b" / "runs" / "blowup" / "study_run.json").is_file()
    assert run_all(ctx, [spec], diverged_ok=True)["blowup"] == run  # not redone
