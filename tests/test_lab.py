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
import os
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


ODD = 'odd "name" #?&% <b>\u00fc'  # a run folder's name that a URL, a CSS selector and HTML must each escape


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, char_data) -> Path:
    """runs/pre (finished), runs/broken (a damaged metrics.jsonl), runs/ODD (pre's log under an odd name),
    runs/linked (a symlink to a run outside runs/), runs/study-x/report.md with its PNG, runs/study-y/report.md
    (a table of only |---|, a picture that links out of its folder, a link), and a report inside pre/best/ (not
    one to list)."""
    from PIL import Image

    from lmlab.config import ModelConfig, TrainConfig
    from lmlab.training.loop import train

    root = tmp_path_factory.mktemp("lab") / "runs"
    mc = ModelConfig(family="gpt2", vocab_size=64, context_length=32, d_model=32, n_layers=1, n_heads=2, dropout=0.1)
    tc = TrainConfig(max_steps=40, eval_interval=20, eval_batches=2, log_interval=5, batch_size=4, warmup_steps=0,
                     device="cpu", threads=1)
    train(mc, tc, char_data, root / "pre", quiet=True)
    log = (root / "pre" / "metrics.jsonl").read_text()
    lines = log.splitlines(keepends=True)
    (root / "broken").mkdir()
    (root / "broken" / "metrics.jsonl").write_text("".join(lines[:2]) + "{not json\n" + "".join(lines[2:]))
    (root / ODD).mkdir()
    (root / ODD / "metrics.jsonl").write_text(log)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "run").mkdir()
    (outside / "run" / "metrics.jsonl").write_text("".join(lines[:7]))
    (root / "linked").symlink_to(outside / "run", target_is_directory=True)
    (root / "study-x").mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(root / "study-x" / "dot.png")
    (root / "study-x" / "report.md").write_text("# Study: x\n\n| a | b |\n|---|---|\n| 1 | <b>2</b> |\n\n"
                                                 "Some `code` and **bold**.\n\n![dot](dot.png)\n")
    Image.new("RGB", (4, 4)).save(outside / "secret.png")
    (root / "study-y").mkdir()
    (root / "study-y" / "away.png").symlink_to(outside / "secret.png")
    (root / "study-y" / "report.md").write_text("# y\n\n|---|---|\n\n![away](away.png)\n\n"
                                                 "[a link](https://example.com/x)\n")
    (root / "pre" / "best" / "report.md").write_text("# not a study\n")
    return root


def _start_lab(runs: Path, port: int, *flags: str) -> subprocess.Popen:
    """The real command on `port`, once it answers /health."""
    proc = subprocess.Popen(lmlab_cmd("lab", "--runs", str(runs), "--port", str(port), "--device", "cpu", *flags),
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail(proc.communicate()[0])


@pytest.fixture(scope="module")
def lab(runs_root):
    """The lab server: the real command, with an API key and the finished run's model loading at start."""
    port = free_port()
    proc = _start_lab(runs_root, port, "--api-key", KEY, "--model", str(runs_root / "pre"))
    yield f"http://127.0.0.1:{port}"
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
    new = [{"event": "train", "step": i, "elapsed_s": 0.25} for i in (1, 2, 3)]
    path.write_text("".join(json.dumps(e) + "\n" for e in new))  # the same inode, grown past what was read
    assert tail.read() == (new, True)
    with open(path, "a") as f:
        f.write("{damaged\n")
    with pytest.raises(LmlabError, match="line 4 is not a JSON event"):
        tail.read()


def test_run_status_says_running_finished_stopped_or_unknown_and_why(runs_root, tmp_path):
    from lmlab.training.runs import RUNNING, Progress, describe_run, run_status, running_marker

    pre = describe_run(runs_root / "pre", runs_root)
    assert pre["status"] == {"state": "finished", "reason": "finished 40 steps"}
    assert pre["settings"]["dropout"] == {"embed": 0.1, "attn": 0.1, "resid": 0.1}
    assert pre["settings"]["model"]["d_model"] == 32 and pre["settings"]["optimizer"]["optimizer"] == "adamw"
    assert pre["tokens_seen"] == 40 * 4 * 32 and pre["step"] == 40
    assert pre["best_val"] == min(e["val_loss"] for e in map(json.loads, (runs_root / "pre" / "metrics.jsonl")
                                                             .read_text().splitlines()) if e["event"] == "eval")
    broken = describe_run(runs_root / "broken", runs_root)
    assert "line 3 is not a JSON event" in broken["error"]
    assert broken["status"] == {"state": "unknown", "reason": broken["error"]}  # not "killed": nobody knows

    run = tmp_path / "run"
    run.mkdir()
    logged = Progress().add([{"event": "train", "step": 10}])
    with running_marker(run):
        assert run_status(run, logged)["state"] == "running"
        marker = json.loads((run / RUNNING).read_text())
    assert not (run / RUNNING).exists()
    stop = {"event": "stop", "step": 12, "reason": "interrupted at step 12"}
    assert run_status(run, Progress().add([{"event": "train", "step": 10}, stop])) == {
        "state": "stopped", "reason": "interrupted at step 12"}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / RUNNING).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    status = run_status(run, logged)  # a SIGKILL leaves the marker and no stop record
    assert status["state"] == "stopped" and "after step 10" in status["reason"] and "killed or crashed" in \
        status["reason"], status
    # The pid given to another process since (here: this one, started at another time) is not the run.
    assert marker["pid"] == os.getpid() and isinstance(marker["start_ticks"], int)
    (run / RUNNING).write_text(json.dumps({**marker, "start_ticks": marker["start_ticks"] - 1}))
    assert run_status(run, logged)["state"] == "stopped"
    (run / RUNNING).write_text(json.dumps(marker))
    assert run_status(run, logged)["state"] == "running"


def test_the_run_index_reads_only_what_changed(tmp_path):
    """RunIndex follows each log: an append is read (a damaged line before it, already read, is not read again);
    a rewritten log starts over; a damaged new line makes the status unknown until the log is rewritten."""
    from lmlab.training.runs import RunIndex

    run = tmp_path / "r"
    run.mkdir()
    log = run / "metrics.jsonl"
    events = [{"event": "train", "step": s, "loss": 3.0, "tokens_seen": 64 * s} for s in (1, 2, 3)]
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    index = RunIndex(tmp_path)
    assert [(d["name"], d["step"], d["status"]["state"]) for d in index.describe()] == [("r", 3, "stopped")]
    with open(log, "r+") as f:  # damage line 2 in place; a full re-read would refuse the file
        f.seek(len(json.dumps(events[0])) + 1)
        f.write("#")
    with open(log, "a") as f:
        f.write(json.dumps({"event": "eval", "step": 4, "val_loss": 2.5, "tokens_seen": 256}) + "\n")
    (run_info,) = index.describe()
    assert (run_info["step"], run_info["tokens_seen"], run_info["best_val"], run_info["error"]) == (4, 256, 2.5, None)
    with open(log, "a") as f:
        f.write("{damaged\n")
    (run_info,) = index.describe()
    assert "line 5 is not a JSON event" in run_info["error"] and run_info["status"]["state"] == "unknown"
    log.write_text(json.dumps({"event": "stop", "step": 9, "reason": "finished 9 steps"}) + "\n")
    (run_info,) = index.describe()
    assert run_info["error"] is None and run_info["status"] == {"state": "finished", "reason": "finished 9 steps"}
    assert run_info["best_val"] is None  # the old log's val loss went with it


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


def test_kept_is_what_the_filters_kept_even_where_its_probability_underflows(lm):
    """At a low temperature no filter cuts anything: every token is kept, though at 0.001 most probabilities are
    0 in float32 (this 40-step model's logits span about 1, so 0.01 leaves them all above 0); with top-k 5 as
    well exactly 5 are kept; greedy keeps one."""
    from lmlab.config import SamplingConfig
    from lmlab.infer.distribution import next_token

    vocab = lm.model.cfg.vocab_size
    for t in (0.01, 0.001):
        cold = next_token(lm.model, lm.tokenizer, "ROMEO:", SamplingConfig(temperature=t), top=vocab)
        assert cold["kept"] == vocab and all(row["kept"] for row in cold["tokens"]), t
    assert sum(row["q"] == 0.0 for row in cold["tokens"]) > vocab // 2  # the underflow this is about
    cold5 = next_token(lm.model, lm.tokenizer, "ROMEO:", SamplingConfig(temperature=0.001, top_k=5), top=vocab)
    assert cold5["kept"] == 5 and [row["kept"] for row in cold5["tokens"]] == [True] * 5 + [False] * (vocab - 5)
    greedy = next_token(lm.model, lm.tokenizer, "ROMEO:", SamplingConfig(temperature=0), top=vocab)
    assert greedy["kept"] == 1 and [row["kept"] for row in greedy["tokens"]][:2] == [True, False]


def test_a_view_stops_when_its_client_has_gone(lm):
    """The dropout view and the step-through look whether their asker is still there before each pass."""
    from lmlab.config import SamplingConfig
    from lmlab.errors import LmlabError
    from lmlab.infer.distribution import EVAL_PASSES, dropout_spread, step_through

    asked = []

    def gone_after(n: int):
        return lambda: asked.append(1) or len(asked) > n

    with pytest.raises(LmlabError, match="went away"):
        dropout_spread(lm.model, lm.tokenizer, "ROMEO:", 200, gone=gone_after(EVAL_PASSES + 2))
    assert len(asked) == EVAL_PASSES + 3 and not lm.model.training  # stopped in train mode's third pass, reset
    asked.clear()
    with pytest.raises(LmlabError, match="went away"):
        step_through(lm.model, lm.tokenizer, "ROMEO:", SamplingConfig(), 20, gone=gone_after(4))
    assert len(asked) == 5


def test_study_reports_stay_in_their_folder(runs_root):
    """A table of only |---| renders as nothing, a picture that links out of its folder is not inlined, a link
    opens a new tab without telling the other site where from; a report inside a run's best/ is not listed."""
    from lmlab.serve.reports import find_studies, render_report

    html = render_report(runs_root / "study-y")
    assert "<table" not in html and "<img" not in html and "image away.png not found" in html
    assert '<a href="https://example.com/x" target="_blank" rel="noopener noreferrer">a link</a>' in html
    assert set(find_studies({"runs": runs_root})) == {"runs/study-x", "runs/study-y"}


def test_loads_key_paths_once_and_keep_the_models_used_last(runs_root, char_run, tmp_path, monkeypatch):
    from lmlab.errors import LmlabError
    from lmlab.serve.loads import MAX_FAILED, Loads
    from lmlab.serve.protocol import APIError

    monkeypatch.chdir(runs_root)
    loads = Loads({"device": "cpu"}, keep=1)
    first = loads.load_now("pre")
    assert loads.start(str(runs_root / "pre") + "/") is first  # a relative and an absolute path: one model
    assert loads.get("./pre").lm is first.lm
    loads.load_now(str(char_run))
    with pytest.raises(APIError, match="not loaded") as e:  # keep=1: the one used longer ago was unloaded
        loads.get("pre")
    assert e.value.status == 404 and first.lm is None and loads.get(str(char_run)).lm is not None
    for i in range(MAX_FAILED + 2):
        (tmp_path / f"empty{i}").mkdir()
        with pytest.raises(LmlabError):
            loads.load_now(str(tmp_path / f"empty{i}"))
    states = [m["state"] for m in loads.statuses()]
    assert states.count("failed") == MAX_FAILED and states.count("ready") == 1


def test_a_load_reports_its_loaders_progress(monkeypatch):
    """A GGUF packed on its first load reports its tensors as it goes (lmlab.utils.progress, listened to on the
    load's own thread): the status the page polls carries what is done of how many."""
    from lmlab.serve.loads import Loads
    from tests.test_gguf import _fetch_or_skip

    path = _fetch_or_skip("smollm2-135m-instruct")
    monkeypatch.setenv("LMLAB_PACKED_CACHE", "0")  # packed anew: the long part of a first load
    entry = Loads({"device": "cpu"}, keep=1).load_now(str(path))
    progress = entry.status()["progress"]
    assert progress["what"] == f"packing {path.name}" and progress["done"] == progress["total"] > 200
    assert entry.status()["state"] == "ready"


def test_host_header_and_unexpected_errors_in_the_app(runs_root):
    """In the app itself (httpx's ASGI transport): bound to 127.0.0.1, a foreign Host is refused and localhost's
    names pass; bound to every address, any name passes; an exception nobody expected is a one-line 500 in
    OpenAI's error JSON."""
    import asyncio

    from lmlab.config import LabConfig
    from lmlab.serve.lab import create_lab_app

    async def get(app, path: str, host: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await client.get(path, headers={"Host": host})

    local = create_lab_app(LabConfig(runs=str(runs_root)))
    r = asyncio.run(get(local, "/health", "evil.example:8000"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host" and "--host 0.0.0.0" in r.text
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST."):
        assert asyncio.run(get(local, "/health", host)).status_code == 200, host
    assert asyncio.run(get(create_lab_app(LabConfig(runs=str(runs_root), host="0.0.0.0")), "/health",
                           "evil.example")).status_code == 200

    @local.get("/fail")
    async def fail():
        raise RuntimeError("a bug\nover two lines")

    r = asyncio.run(get(local, "/fail", "localhost"))
    assert r.status_code == 500 and r.json()["error"] == {
        "message": "GET /fail failed on the server (RuntimeError: a bug over two lines); its log has the details",
        "type": "server_error", "param": None, "code": "internal_error"}


def test_cli_refuses_bad_input_in_one_line(runs_root, capsys):
    for argv, says in ((["--runs", str(runs_root / "missing")], "does not exist"),
                       (["--runs", str(runs_root / "pre" / "metrics.jsonl")], "is a file"),
                       (["--runs", str(runs_root), "--model", "no-such-model"], "model not found"),
                       (["--runs", str(runs_root), "--port", "70000"], "--port must be"),
                       (["--runs", str(runs_root), "--max-models", "0"], "--max-models must be"),
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

    def events(*names: str) -> httpx.Response:
        return httpx.get(lab + "/lab/events", params=[("run", n) for n in names], headers=AUTH)

    assert httpx.get(lab + "/lab/runs").status_code == 401  # the key guards every route but / and /health
    assert httpx.get(lab + "/").status_code == 200
    source = _wait_ready(lab)
    cases = [  # (response, status, words of the message, param)
        (post("/lab/next", {"model": source, "prompt": "x" * 40}), 400, "context is 32", "prompt"),
        (post("/lab/next", {"model": source, "prompt": "ROMEO", "top_p": 0}), 400, "top_p must be", "top_p"),
        (post("/lab/next", {"model": source, "prompt": "ROMEO", "top_k": -1}), 400, "top_k must be", "top_k"),
        (post("/lab/next", {"model": source, "prompt": "ROMEO", "topk": 5}), 400, "topk", "topk"),
        (post("/lab/next", {"model": "elsewhere", "prompt": "ROMEO"}), 404, "not loaded", "model"),
        (post("/lab/models", {"source": "no-such-model"}), 404, "model not found", "source"),
        (post("/lab/models", {"source": " "}), 400, "give a model", "source"),
        (post("/lab/dropout", {"model": source, "prompt": "ROMEO", "rate": 1.5}), 400, "rate must be", "rate"),
        (post("/lab/dropout", {"model": source, "prompt": "ROMEO", "passes": 1}), 400, "passes must be", "passes"),
        (post("/lab/steps", {"model": source, "prompt": "ROMEO", "steps": 30}), 400, "context is 32", "prompt"),
        (post("/lab/steps", {"model": source, "prompt": "ROMEO", "steps": 0}), 400, "steps must be", "steps"),
        (events("../etc"), 404, "no run", "run"),
        (events("\x00"), 404, "no run", "run"),
        (events("pre", "pre/\x00/x"), 404, "no run", "run"),
        (httpx.post(lab + "/lab/models", content=json.dumps({"source": source}), headers=AUTH), 415, "as JSON", None),
        (httpx.get(lab + "/health", headers={"Host": "evil.example"}), 400, "Host header", "host"),
    ]
    for r, status, says, param in cases:
        assert r.status_code == status and says in r.json()["error"]["message"], (r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"} and r.json()["error"]["param"] == \
            param, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    names = [run["name"] for run in httpx.get(lab + "/lab/runs", headers=AUTH).json()["runs"]]
    assert {"pre", "broken", ODD, "linked"} <= set(names), names
    study = httpx.get(lab + "/lab/study", params={"id": "runs/study-y"}, headers=AUTH)
    assert study.status_code == 200 and "<img" not in study.json()["html"]
    got = {}  # one stream follows the runs: the damaged log's error, the others' events and status
    with httpx.stream("GET", lab + "/lab/events", params=[("run", "broken"), ("run", "pre"), ("run", ODD),
                                                          ("run", "linked")], headers=AUTH, timeout=30) as s:
        lines = s.iter_lines()
        while len(got) < 8:
            kind, data = next(lines), json.loads(next(lines).removeprefix("data: "))
            assert next(lines) == ""
            got[kind.removeprefix("event: "), data["run"]] = data["data"]
    assert "line 3 is not a JSON event" in got["error", "broken"]["message"]
    assert got["status", "broken"]["state"] == "unknown"
    logged = len((runs_root / "pre" / "metrics.jsonl").read_text().splitlines())
    assert len(got["events", "pre"]) == len(got["events", ODD]) == logged and len(got["events", "linked"]) == 7
    assert got["status", "pre"] == got["status", ODD] == {"state": "finished", "reason": "finished 40 steps"}


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
    script = "const g = document.querySelector(`#${arguments[0]} g.curve[data-run=\"${CSS.escape(arguments[1])}\"]`);"
    return driver.execute_script(script + "return g ? Number(g.dataset.points) : 0;", chart, run)


def _row(driver, run: str, state: str = ""):
    """The runs list's row of `run` (in `state`, if given), or None."""
    script = ("return document.querySelector(`tr.run[data-run=\"${CSS.escape(arguments[0])}\"]` + "
              "(arguments[1] ? `[data-state=\"${arguments[1]}\"]` : ''));")
    return driver.execute_script(script, run, state)


def _tick(driver, run: str) -> None:
    driver.execute_script("document.querySelector(`input.pick[data-run=\"${CSS.escape(arguments[0])}\"]`).click();",
                          run)


def _logged(run_dir: Path, kinds=("train", "eval")) -> int:
    return sum(json.loads(line)["event"] in kinds for line in (run_dir / "metrics.jsonl").read_text().splitlines())


def test_runs_list_curves_and_a_run_training_live(page, runs_root, char_data):
    """Before any run is ticked the charts say to tick one; the runs list shows each run's status (a damaged log
    as its error, status unknown); a ticked run's curve has one point per logged train and eval event, an odd
    name's too; a real `lmlab train` appears, gains points while the page watches, and shows "stopped" with its
    reason once interrupted."""
    from selenium.webdriver.common.by import By

    _tab(page, "runs")
    assert page.find_element(By.ID, "loss-chart").text == "no points yet: tick a run"
    row = _wait(page, lambda d: _row(d, "pre", "finished"), what="pre listed as finished")
    assert "finished 40 steps" in row.text
    assert "line 3 is not a JSON event" in _row(page, "broken", "unknown").text
    _tick(page, "pre")
    _tick(page, ODD)
    logged = _logged(runs_root / "pre")
    _wait(page, lambda d: _points(d, "pre") == logged and _points(d, ODD) == logged, what=f"{logged} points each")
    page.find_element(By.CSS_SELECTOR, "tr.run[data-run='pre'] .name").click()
    assert "dropout per site: embed 0.1, attn 0.1, resid 0.1" in page.find_element(By.ID, "settings").text
    assert _points(page, "pre", "lr-chart") == _logged(runs_root / "pre", ("train",))
    _tick(page, ODD)

    proc = subprocess.Popen(lmlab_cmd("train", "--data", str(char_data), "--out", str(runs_root / "live"),
                                      "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "16",
                                      "--batch-size", "4", "--max-steps", "1000000", "--log-interval", "25",
                                      "--eval-interval", "100000", "--eval-batches", "2", "--warmup-steps", "0",
                                      "--device", "cpu", "--threads", "1", "--quiet"),
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(page, lambda d: _row(d, "live", "running"), what="the training run listed as running")
        _tick(page, "live")
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
    row = _wait(page, lambda d: _row(d, "live", "stopped"), what="the interrupted run shown as stopped")
    assert "interrupted at step" in row.text
    page.find_element(By.ID, "log-scale").click()
    page.find_element(By.CSS_SELECTOR, "#x-axis option[value='step']").click()


def test_a_rewritten_log_starts_its_curve_over(page, runs_root):
    """A log replaced while the page follows it (a resumed run rewrites its log) is drawn again from its start:
    the page gets "restart" and then the new log's points, not the old ones plus the new."""
    run = runs_root / "rewritten"
    run.mkdir()
    events = [json.loads(line) for line in (runs_root / "pre" / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    _wait(page, lambda d: _row(d, "rewritten"), what="the new run listed")
    _tick(page, "rewritten")
    _wait(page, lambda d: _points(d, "rewritten") == _logged(run), what="its points")
    kept = events[:5]
    (run / "new.jsonl").write_text("".join(json.dumps(e) + "\n" for e in kept))
    (run / "new.jsonl").replace(run / "metrics.jsonl")
    _wait(page, lambda d: _points(d, "rewritten") == _logged(run) == 5, what="the rewritten log's 5 points")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(events[5]) + "\n")
    _wait(page, lambda d: _points(d, "rewritten") == 6, what="a point appended after the rewrite")
    _tick(page, "rewritten")


def test_a_long_curve_is_drawn_thinned(page):
    """300k points (past where Math.min(...points) throws) are counted in full and drawn as at most the first,
    lowest, highest and last point of each pixel column, the spike included."""
    drawn = page.execute_script("""
        const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
        svg.setAttribute("width", 620); svg.setAttribute("height", 300);
        const points = Array.from({length: 300000}, (_, i) => [i, i === 123456 ? 50 : 3 + Math.sin(i / 1000)]);
        drawChart(svg, [{run: "r", kind: "train", color: "#000", points}], {xLabel: "step", yLabel: "loss"});
        const line = svg.querySelector("polyline");
        const ys = line.getAttribute("points").split(" ").map((p) => Number(p.split(",")[1]));
        return [Number(line.dataset.points), Number(line.dataset.drawn), Math.min(...ys)];""")
    points, shown, top = drawn
    assert points == 300_000 and 550 < shown <= 4 * 620 and top == pytest.approx(8, abs=0.1)  # the spike: y=50


def test_sampling_view_on_the_page(page, lm, lab):
    """top-k 5 leaves exactly 5 bars, their renormalised probabilities those of lmlab's filters computed here;
    temperature and top-p likewise; at temperature 0.001 no filter cuts anything, so no bar is struck out though
    most probabilities are 0; the page names the model its views use."""
    from selenium.webdriver.common.by import By

    from lmlab.config import SamplingConfig
    from lmlab.infer.sampling import apply_top_k, process_logits

    source = _wait_ready(lab)
    _tab(page, "sampling")
    _wait(page, lambda d: d.find_element(By.ID, "load-status").get_attribute("data-state") == "ready")
    assert page.find_element(By.ID, "model-used").get_attribute("data-source") == source
    logits = lm.model(torch.tensor([lm.tokenizer.encode("ROMEO:")]))[0, -1:].detach().float()
    _set(page, "prompt", "ROMEO:")
    _set(page, "top_k", "5")
    _shown(page, temperature=1, top_k=5, top_p=1)
    assert len(page.find_elements(By.CSS_SELECTOR, "#bars .bar-row[data-kept='1']")) == 5
    _check_bars(page, logits, SamplingConfig(top_k=5), torch.softmax(apply_top_k(logits, 5), -1)[0])

    _set(page, "top_k", "0")
    _set(page, "temperature", "0.7")
    _set(page, "top_p", "0.6")
    s = SamplingConfig(temperature=0.7, top_p=0.6)
    _shown(page, temperature=0.7, top_k=0, top_p=0.6)
    assert page.find_element(By.ID, "next-summary").get_attribute("data-kept") == str(
        int((process_logits(logits, s) > float("-inf")).sum()))
    _check_bars(page, logits, s)

    _set(page, "top_p", "1")
    _set(page, "temperature", "0.001")
    _shown(page, temperature=0.001, top_k=0, top_p=1)
    assert page.find_element(By.ID, "next-summary").get_attribute("data-kept") == str(lm.model.cfg.vocab_size)
    assert page.find_elements(By.CSS_SELECTOR, "#bars .bar-row.cut") == []
    assert len(page.find_elements(By.CSS_SELECTOR, "#bars .bar-row[data-q='0']")) > 25
    _check_bars(page, logits, SamplingConfig(temperature=0.001))
    _set(page, "temperature", "0.7")
    _set(page, "top_p", "0.6")


def test_step_through_and_dropout_on_the_page(page, lm, lab):
    """The step-through draws what generate draws; dropout spreads the distribution in train mode only."""
    from selenium.webdriver.common.by import By

    from lmlab.config import SamplingConfig

    _wait_ready(lab)
    _tab(page, "sampling")
    _set(page, "prompt", "ROMEO:")
    _set(page, "steps-n", "8")
    page.find_element(By.ID, "step-run").click()
    chips = _wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#step-tokens .chip"))
    knobs = {k: float(page.find_element(By.ID, k).get_attribute("value")) for k in ("temperature", "top_p")}
    generated = lm.generate("ROMEO:", SamplingConfig(**knobs, seed=0, max_new_tokens=8))
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


def test_errors_studies_and_a_screenshot_on_the_page(page, lab, tmp_path):
    """Bad input shows its one line on the page; a study report renders (escaped, its picture inlined); the
    screenshot is not blank."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    _wait_ready(lab)
    _tab(page, "dropout")
    _set(page, "prompt", "x" * 40)
    page.find_element(By.ID, "dropout-run").click()
    _wait(page, lambda d: "context is 32" in d.find_element(By.ID, "error").text, what="the long prompt's error")
    _set(page, "model-source", "no-such-model")
    page.find_element(By.ID, "load-model").click()
    _wait(page, lambda d: "model not found" in d.find_element(By.ID, "error").text, what="the unknown model's error")
    _set(page, "model-source", "")
    _set(page, "prompt", "ROMEO:")

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


def test_live_updates_say_they_stopped_and_come_back(runs_root, tmp_path):
    """The first view follows the runs that are training (here one whose running.json names this process); the
    server goes away: the page says live updates stopped, keeps trying, and follows the runs again once a server
    is back on the same port. Its own server (no key), runs and browser."""
    from lmlab.training.runs import RUNNING

    runs = tmp_path / "runs"
    for name, lines in (("pre", None), ("training", 6)):
        (runs / name).mkdir(parents=True)
        log = (runs_root / "pre" / "metrics.jsonl").read_text().splitlines(keepends=True)
        (runs / name / "metrics.jsonl").write_text("".join(log[:lines]))
    with open(f"/proc/{os.getpid()}/stat") as f:  # this process, as running_marker names it
        started = int(f.read().rsplit(")", 1)[1].split()[19])
    (runs / "training" / RUNNING).write_text(json.dumps({"pid": os.getpid(), "start_ticks": started,
                                                         "host": socket.gethostname()}))
    port = free_port()
    proc = _start_lab(runs, port)
    driver = browser(1000, 700)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        early = _logged(runs / "training")
        _wait(driver, lambda d: _points(d, "training") == early, what="the training run followed from the first view")
        assert driver.execute_script("return Object.keys(runs).filter((n) => runs[n].on)") == ["training"]
        _tick(driver, "pre")
        logged = _logged(runs_root / "pre")
        _wait(driver, lambda d: _points(d, "pre") == logged, what="pre's points")
        stop_process(proc)
        _wait(driver, lambda d: d.find_element("id", "live").get_attribute("data-state") == "stopped",
              what="live updates said to be stopped")
        assert "live updates stopped" in driver.find_element("id", "live").text
        proc = _start_lab(runs, port)
        _wait(driver, lambda d: d.find_element("id", "live").get_attribute("data-state") == "live", timeout=40,
              what="the stream opened again")
        _wait(driver, lambda d: _points(d, "pre") == logged and _points(d, "training") == early,
              what="the points, once, after the reconnection")
    finally:
        driver.quit()
        stop_process(proc)


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


def _check_bars(driver, logits: torch.Tensor, s, q: torch.Tensor | None = None) -> None:
    """Every bar's data-p and data-q equal the reference probabilities within 1e-6 (q: the filtered softmax, or
    `s`'s filters applied here), and a bar is marked kept exactly where those filters left its logit finite."""
    from selenium.webdriver.common.by import By

    from lmlab.infer.sampling import process_logits

    filtered = process_logits(logits, s)[0]
    p, q = torch.softmax(logits, -1)[0], torch.softmax(filtered, -1) if q is None else q
    rows = driver.find_elements(By.CSS_SELECTOR, "#bars .bar-row")
    assert len(rows) == 50
    for row in rows:
        token = int(row.get_attribute("data-token-id"))
        assert abs(float(row.get_attribute("data-p")) - float(p[token])) < 1e-6
        assert abs(float(row.get_attribute("data-q")) - float(q[token])) < 1e-6
        assert (row.get_attribute("data-kept") == "1") == bool(torch.isfinite(filtered[token]))
