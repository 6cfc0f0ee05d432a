"""`lmlab lab` end to end: the real command serves the page, a headless Chromium drives it, and what the page shows
is checked against references computed here.

References nobody under test computes: the filtered probabilities come from lmlab's filter functions
(lmlab.infer.sampling) called in this file on logits of a plain forward pass; a step-through's tokens are compared
with `LM.generate` (the engine); a run's points with its own metrics.jsonl; a run still training is a real
`lmlab train` process. The runs are a char model of context 32 with dropout 0.1, trained for 40 steps in-process,
one run whose metrics.jsonl is damaged, and a study report with a picture.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from lmlab.cli import main
from tests.conftest import browser, free_port, lmlab_cmd, stop_process, subprocess_env

KEY = "lab-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, char_data) -> Path:
    """runs/pre (finished), runs/broken (a damaged metrics.jsonl), runs/study-x/report.md with its PNG."""
    from PIL import Image

    from lmlab.config import ModelConfig, TrainConfig
    from lmlab.training.loop import train

    root = tmp_path_factory.mktemp("lab") / "runs"
    mc = ModelConfig(family="gpt2", vocab_size=64, context_length=32, d_model=32, n_layers=1, n_heads=2, dropout=0.1)
    tc = TrainConfig(max_steps=40, eval_interval=20, eval_batches=2, log_interval=5, batch_size=4, warmup_steps=0,
                     device="cpu", threads=1)
    train(mc, tc, char_data, root / "pre", quiet=True)
    lines = (root / "pre" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (root / "broken").mkdir()
    (root / "broken" / "metrics.jsonl").write_text("".join(lines[:2]) + "{not json\n" + "".join(lines[2:]))
    (root / "study-x").mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(root / "study-x" / "dot.png")
    (root / "study-x" / "report.md").write_text("# Study: x\n\n| a | b |\n|---|---|\n| 1 | <b>2</b> |\n\n"
                                                 "Some `code` and **bold**.\n\n![dot](dot.png)\n")
    return root


@pytest.fixture(scope="module")
def lab(runs_root):
    """The lab server: the real command, with an API key and the finished run's model loading at start."""
    port = free_port()
    proc = subprocess.Popen(lmlab_cmd("lab", "--runs", str(runs_root), "--port", str(port), "--api-key", KEY,
                                      "--device", "cpu", "--model", str(runs_root / "pre")),
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(proc.communicate()[0])
    yield url
    stop_process(proc)


@pytest.fixture(scope="module")
def lm(runs_root):
    import lmlab

    torch.set_num_threads(1)
    return lmlab.load(runs_root / "pre", device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# The library pieces under the page.

def test_event_tail_waits_for_a_torn_line_and_starts_over_on_a_rewrite(tmp_path):
    from lmlab.errors import LmlabError
    from lmlab.training.metrics import EventTail, read_events

    path = tmp_path / "metrics.jsonl"
    tail = EventTail(path)
    assert tail.read() == ([], False)  # not written yet
    path.write_text('{"event": "train", "step": 1}\n{"event": "tra')  # the second line is being written
    assert tail.read() == ([{"event": "train", "step": 1}], False)
    assert read_events(path) == [{"event": "train", "step": 1}]  # --resume's reader drops it the same way
    with open(path, "a") as f:
        f.write('in", "step": 2}\n')
    assert tail.read() == ([{"event": "train", "step": 2}], False)
    assert tail.read() == ([], False)
    path.unlink()
    path.write_text('{"event": "eval", "step": 0}\n')  # a new log (a new run, or a resume's rewrite)
    assert tail.read() == ([{"event": "eval", "step": 0}], True)
    with open(path, "a") as f:
        f.write("{damaged\n")
    with pytest.raises(LmlabError, match="line 2 is not a JSON event"):
        tail.read()


def test_run_status_says_running_finished_or_stopped_and_why(runs_root, tmp_path):
    from lmlab.training.runs import RUNNING, describe_run, run_status, running_marker

    pre = describe_run(runs_root / "pre", runs_root)
    assert pre["status"] == {"state": "finished", "reason": "finished 40 steps"}
    assert pre["settings"]["dropout"] == {"embed": 0.1, "attn": 0.1, "resid": 0.1}
    assert pre["settings"]["model"]["d_model"] == 32 and pre["settings"]["optimizer"]["optimizer"] == "adamw"
    assert pre["tokens_seen"] == 40 * 4 * 32 and pre["step"] == 40
    assert pre["best_val"] == min(e["val_loss"] for e in map(json.loads, (runs_root / "pre" / "metrics.jsonl")
                                                             .read_text().splitlines()) if e["event"] == "eval")
    broken = describe_run(runs_root / "broken", runs_root)
    assert "line 3 is not a JSON event" in broken["error"]

    run = tmp_path / "run"
    run.mkdir()
    events = [{"event": "train", "step": 10}]
    with running_marker(run):
        assert run_status(run, events)["state"] == "running"
    assert not (run / RUNNING).exists()
    stop = {"event": "stop", "step": 12, "reason": "interrupted at step 12"}
    assert run_status(run, events + [stop]) == {"state": "stopped", "reason": "interrupted at step 12"}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / RUNNING).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    status = run_status(run, events)  # a SIGKILL leaves the marker and no stop record
    assert status["state"] == "stopped" and "after step 10" in status["reason"] and "killed or crashed" in \
        status["reason"], status


def test_a_run_holds_its_marker_only_while_it_trains(tmp_path, char_data, monkeypatch):
    """The loop writes running.json when it starts (seen at each evaluation) and removes it when it stops."""
    from lmlab.config import ModelConfig, TrainConfig
    from lmlab.training import loop
    from lmlab.training.runs import RUNNING

    seen, real = [], loop.Run.evaluate_and_save

    def looking(self, progress):
        seen.append((self.run_dir / RUNNING).is_file())
        return real(self, progress)

    monkeypatch.setattr(loop.Run, "evaluate_and_save", looking)
    mc = ModelConfig(family="gpt2", vocab_size=64, context_length=16, d_model=16, n_layers=1, n_heads=2)
    tc = TrainConfig(max_steps=2, eval_interval=1, eval_batches=1, batch_size=2, warmup_steps=0, device="cpu")
    loop.train(mc, tc, char_data, tmp_path / "r", quiet=True)
    assert seen == [True, True, True] and not (tmp_path / "r" / RUNNING).exists()


def test_step_through_draws_what_generate_draws(lm):
    """Each step's token is the one lmlab.generate (the engine) draws for the same prompt and settings, and each
    step's filtered distribution is lmlab's filters on a plain forward pass."""
    from lmlab.config import SamplingConfig
    from lmlab.infer.distribution import step_through
    from lmlab.infer.sampling import process_logits

    for s in (SamplingConfig(temperature=0), SamplingConfig(temperature=1.0, top_k=10, repetition_penalty=1.3, seed=3),
              SamplingConfig(temperature=0.9, top_p=0.8, min_p=0.02, seed=11)):
        steps = step_through(lm.model, lm.tokenizer, "ROMEO:", s, 12)
        text = "".join(step["chosen"]["text"] for step in steps)
        assert text == lm.generate("ROMEO:", s.replace(max_new_tokens=12)), s
    ids = lm.tokenizer.encode("ROMEO:" + steps[0]["chosen"]["text"])
    logits = lm.model(torch.tensor([ids]))[0, -1:].detach()
    seen = torch.zeros_like(logits, dtype=torch.bool)
    expected = torch.softmax(process_logits(logits, s, seen), dim=-1)[0]
    for row in steps[1]["tokens"]:
        assert abs(row["q"] - float(expected[row["id"]])) < 1e-6


def test_cli_refuses_bad_input_in_one_line(runs_root, capsys):
    for argv, says in ((["--runs", str(runs_root / "missing")], "does not exist"),
                       (["--runs", str(runs_root / "pre" / "metrics.jsonl")], "is a file"),
                       (["--runs", str(runs_root), "--model", "no-such-model"], "model not found"),
                       (["--runs", str(runs_root), "--port", "70000"], "--port must be"),
                       (["--runs", str(runs_root), "--quantize", "int3"], "int3")):
        assert main(["lab", *argv, "--check", "--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lmlab: error: ") and err.count("\n") == 1 and says in err, (argv, err)
    assert main(["lab", "--runs", str(runs_root), "--model", str(runs_root / "pre"), "--check", "--device", "cpu",
                 "--port", "0"]) == 0
    assert "would be shown" in capsys.readouterr().out


def test_http_errors_are_openai_error_json(lab, runs_root):
    def post(path, body, headers=AUTH):
        return httpx.post(lab + path, json=body, headers=headers, timeout=30)

    assert httpx.get(lab + "/lab/runs").status_code == 401  # the key guards every route but / and /health
    assert httpx.get(lab + "/").status_code == 200
    source = _wait_ready(lab)
    cases = [
        (post("/lab/next", {"model": source, "prompt": "x" * 40}), 400, "context is 32"),
        (post("/lab/next", {"model": source, "prompt": "ROMEO", "top_p": 0}), 400, "top_p must be"),
        (post("/lab/next", {"model": source, "prompt": "ROMEO", "topk": 5}), 400, "topk"),
        (post("/lab/next", {"model": "elsewhere", "prompt": "ROMEO"}), 404, "not loaded"),
        (post("/lab/models", {"source": "no-such-model"}), 404, "model not found"),
        (post("/lab/dropout", {"model": source, "prompt": "ROMEO", "rate": 1.5}), 400, "rate must be"),
        (post("/lab/steps", {"model": source, "prompt": "ROMEO", "steps": 30}), 400, "context is 32"),
        (httpx.get(lab + "/lab/events", params={"run": "../etc"}, headers=AUTH), 404, "no run"),
        (httpx.post(lab + "/lab/models", content=json.dumps({"source": source}), headers=AUTH), 415, "as JSON"),
    ]
    for r, status, says in cases:
        assert r.status_code == status and says in r.json()["error"]["message"], (r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    got = {}  # one stream follows both runs: the damaged log's error, the other's events and status
    with httpx.stream("GET", lab + "/lab/events", params=[("run", "broken"), ("run", "pre")], headers=AUTH,
                      timeout=30) as s:
        lines = s.iter_lines()
        while len(got) < 3:
            kind, data = next(lines), json.loads(next(lines).removeprefix("data: "))
            assert next(lines) == ""
            got[kind.removeprefix("event: "), data["run"]] = data["data"]
    assert "line 3 is not a JSON event" in got["error", "broken"]["message"]
    assert len(got["events", "pre"]) == len((runs_root / "pre" / "metrics.jsonl").read_text().splitlines())
    assert got["status", "pre"] == {"state": "finished", "reason": "finished 40 steps"}


def _wait_ready(url: str) -> str:
    for _ in range(300):
        models = httpx.get(url + "/lab/models", headers=AUTH, timeout=10).json()["models"]
        if models and models[0]["state"] == "ready":
            return models[0]["source"]
        assert not models or models[0]["state"] == "loading", models
        time.sleep(0.1)
    raise AssertionError("the model did not load")


# ---------------------------------------------------------------------------------------------------------------
# The page, in a real browser.

@pytest.fixture(scope="module")
def page(lab):
    from selenium.webdriver.common.by import By

    driver = browser(1300, 1000)
    try:
        driver.get(lab + "/")
        driver.find_element(By.ID, "key").send_keys(KEY)
        yield driver
    finally:
        driver.quit()


def _wait(driver, check, timeout: float = 30, what: str = ""):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
                         ).until(lambda d: check(d), message=what)


def _tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"header button[data-tab='{name}']").click()


def _points(driver, run: str, chart: str = "loss-chart") -> int:
    """The points a chart draws for a run (read in one script: the chart is redrawn as events arrive)."""
    script = "const g = document.querySelector(`#${arguments[0]} g.curve[data-run='${arguments[1]}']`);"
    return driver.execute_script(script + "return g ? Number(g.dataset.points) : 0;", chart, run)


def test_runs_list_curves_and_a_run_training_live(page, runs_root, char_data):
    """The runs list shows each run's status (a damaged log as its error); a ticked run's curve has one point per
    logged train and eval event; a real `lmlab train` appears, gains points while the page watches, and shows
    "stopped" with its reason once interrupted."""
    from selenium.webdriver.common.by import By

    _tab(page, "runs")
    row = _wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.run[data-run='pre'][data-state='finished']"))[0]
    assert "finished 40 steps" in row.text
    assert "line 3 is not a JSON event" in page.find_element(By.CSS_SELECTOR, "tr.run[data-run='broken']").text
    page.find_element(By.CSS_SELECTOR, "input.pick[data-run='pre']").click()
    events = [json.loads(line) for line in (runs_root / "pre" / "metrics.jsonl").read_text().splitlines()]
    logged = sum(e["event"] in ("train", "eval") for e in events)
    _wait(page, lambda d: _points(d, "pre") == logged, what=f"{logged} points for pre")
    page.find_element(By.CSS_SELECTOR, "tr.run[data-run='pre'] .name").click()
    assert "dropout per site: embed 0.1, attn 0.1, resid 0.1" in page.find_element(By.ID, "settings").text
    assert _points(page, "pre", "lr-chart") == sum(e["event"] == "train" for e in events)

    proc = subprocess.Popen(lmlab_cmd("train", "--data", str(char_data), "--out", str(runs_root / "live"),
                                      "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "16",
                                      "--batch-size", "4", "--max-steps", "1000000", "--log-interval", "25",
                                      "--eval-interval", "100000", "--eval-batches", "2", "--warmup-steps", "0",
                                      "--device", "cpu", "--threads", "1", "--quiet"),
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.run[data-run='live'][data-state='running']"),
              what="the training run listed as running")
        page.find_element(By.CSS_SELECTOR, "input.pick[data-run='live']").click()
        before = _wait(page, lambda d: _points(d, "live") >= 2 and _points(d, "live"), what="its first points")
        _wait(page, lambda d: _points(d, "live") >= before + 3, timeout=20, what="points arriving while it trains")
        assert _points(page, "pre") == logged  # overlaid: both runs drawn
        page.find_element(By.ID, "log-scale").click()
        page.find_element(By.CSS_SELECTOR, "#x-axis option[value='tokens_seen']").click()
        assert _points(page, "pre") == logged
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the loop stops after the step in flight and logs why
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    row = _wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.run[data-run='live'][data-state='stopped']"),
                what="the interrupted run shown as stopped")[0]
    assert "interrupted at step" in row.text


def test_sampling_dropout_studies_and_errors_on_the_page(page, lm, lab, tmp_path):
    """top-k 5 leaves exactly 5 bars, their renormalised probabilities those of lmlab's filters computed here;
    the step-through draws what generate draws; dropout spreads the distribution in train mode only; bad input
    shows its one line on the page; a study report renders; the screenshot is not blank."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    from lmlab.config import SamplingConfig
    from lmlab.infer.sampling import apply_top_k, process_logits

    _wait_ready(lab)
    _tab(page, "sampling")
    _wait(page, lambda d: d.find_element(By.ID, "load-status").get_attribute("data-state") == "ready")
    logits = lm.model(torch.tensor([lm.tokenizer.encode("ROMEO:")]))[0, -1:].detach().float()
    _set(page, "prompt", "ROMEO:")
    _set(page, "top_k", "5")
    _shown(page, temperature=1, top_k=5, top_p=1)
    kept = page.find_elements(By.CSS_SELECTOR, "#bars .bar-row[data-kept='1']")
    assert len(kept) == 5
    _check_bars(page, torch.softmax(logits, -1)[0], torch.softmax(apply_top_k(logits, 5), -1)[0])

    _set(page, "top_k", "0")
    _set(page, "temperature", "0.7")
    _set(page, "top_p", "0.6")
    s = SamplingConfig(temperature=0.7, top_p=0.6)
    _shown(page, temperature=0.7, top_k=0, top_p=0.6)
    assert page.find_element(By.ID, "next-summary").get_attribute("data-kept") == str(
        int((process_logits(logits, s) > float("-inf")).sum()))
    _check_bars(page, torch.softmax(logits, -1)[0], torch.softmax(process_logits(logits, s), -1)[0])

    _set(page, "steps-n", "8")
    page.find_element(By.ID, "step-run").click()
    chips = _wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#step-tokens .chip"))
    generated = lm.generate("ROMEO:", s.replace(seed=0, max_new_tokens=8))
    assert [lm.tokenizer.decode([int(c.get_attribute("data-token-id"))]) for c in chips] == list(generated)
    page.find_element(By.ID, "step-next").click()
    assert page.find_element(By.CSS_SELECTOR, "#step-bars .bar-row.chosen").get_attribute("data-token-id") == \
        chips[1].get_attribute("data-token-id")

    _tab(page, "dropout")
    _set(page, "passes", "8")
    page.find_element(By.ID, "dropout-run").click()
    summary = _wait(page, lambda d: d.find_element(By.ID, "dropout-summary").get_attribute("data-passes") and
                    d.find_element(By.ID, "dropout-summary"))
    number = lambda name: float(summary.get_attribute(name))  # noqa: E731
    assert number("data-eval-distinct") == 1 and number("data-eval-spread") == 0  # eval mode: one distribution
    assert number("data-train-distinct") > 1 and number("data-train-spread") > 0  # train mode: masks move it
    dots = page.find_elements(By.CSS_SELECTOR, "#dropout-view g.token")[0].find_elements(By.TAG_NAME, "circle")
    assert len(dots) == 8

    _set(page, "prompt", "x" * 40)
    page.find_element(By.ID, "dropout-run").click()
    _wait(page, lambda d: "context is 32" in d.find_element(By.ID, "error").text, what="the long prompt's error")
    _set(page, "model-source", "no-such-model")
    page.find_element(By.ID, "load-model").click()
    _wait(page, lambda d: "model not found" in d.find_element(By.ID, "error").text, what="the unknown model's error")

    _tab(page, "studies")
    _wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "button[data-study='runs/study-x']"))[0].click()
    body = _wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#study-body h1"))[0].find_element(By.XPATH, "..")
    assert body.find_element(By.TAG_NAME, "h1").text == "Study: x" and body.find_elements(By.CSS_SELECTOR, "td b") == []
    assert "<b>2</b>" in body.find_element(By.TAG_NAME, "table").text  # escaped: a report is text, not markup
    assert body.find_element(By.TAG_NAME, "img").get_attribute("naturalWidth") == "8"

    _tab(page, "sampling")
    page.save_screenshot(str(tmp_path / "lab.png"))
    colors = Image.open(tmp_path / "lab.png").convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, len(colors or [])


def _set(driver, field: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, field)
    element.clear()
    element.send_keys(value)


def _shown(driver, **settings) -> None:
    """Wait until the bars drawn are the answer for these settings (typing passes through others on its way)."""
    from selenium.webdriver.common.by import By

    def drawn(d):
        shown = json.loads(d.find_element(By.ID, "bars").get_attribute("data-settings") or "{}")
        return all(shown.get(k) == v for k, v in settings.items())

    _wait(driver, drawn, what=f"bars for {settings}")


def _check_bars(driver, p: torch.Tensor, q: torch.Tensor) -> None:
    """Every bar's data-p and data-q equal the reference probabilities within 1e-6, the cut ones at exactly 0."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#bars .bar-row")
    assert len(rows) == 50
    for row in rows:
        token = int(row.get_attribute("data-token-id"))
        assert abs(float(row.get_attribute("data-p")) - float(p[token])) < 1e-6
        assert abs(float(row.get_attribute("data-q")) - float(q[token])) < 1e-6
        assert (row.get_attribute("data-kept") == "1") == (float(q[token]) > 0)
