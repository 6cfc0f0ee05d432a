"""The one engine under every caller: `lmlab generate`, `lmlab chat --prompt`, the Python API and the server give
the same greedy and the same seeded reply, alone and under 8 concurrent requests, also when a reply runs past the
model's context (every path slides its window the same way); the server's compiled decoding step (Inductor on
CPU) gives the plain engine's tokens; a compiled model keeps its engine and cache between calls.

The model is a small char-level GPT trained here for a few seconds on the test corpus (context 64), so its text is
Shakespeare-like and varied; the prompts are the issue's: "KING HENRY" through chat's plain template."""

from __future__ import annotations

import concurrent.futures
import copy
import subprocess

import pytest
import torch

import lmlab
from lmlab.config import CHAT_SAMPLING, ModelConfig, SamplingConfig, TrainConfig
from lmlab.infer.chat import reply
from lmlab.infer.generate import generate_ids
from lmlab.training.loop import train
from tests.conftest import lmlab_cmd, subprocess_env

openai = pytest.importorskip("openai")

TINY = ModelConfig(family="gpt2", vocab_size=65, context_length=64, d_model=48, n_layers=2, n_heads=2, bias=False)
PROMPT, MESSAGE = "ROMEO:\n", "KING HENRY"
N = 100  # tokens per reply: past the 64-token context, so every path slides its window
CASES = {"greedy": dict(temperature=0.0, top_p=1.0, top_k=0), "seeded": dict(temperature=0.9, top_p=0.95, top_k=20,
                                                                            seed=7)}


@pytest.fixture(scope="module")
def run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("engine") / "run"
    train(TINY, TrainConfig(max_steps=400, batch_size=16, lr=3e-3, warmup_steps=20, eval_interval=400,
                            eval_batches=2, device="cpu", seed=1), char_data, out, quiet=True)
    return out


@pytest.fixture(scope="module")
def lm(run):
    return lmlab.load(run, device="cpu")


@pytest.fixture(scope="module")
def server(run):
    from tests.test_serve import _start, _stop

    proc, url = _start(run, "--max-batch", "8", "--prefill-chunk", "16")
    yield url
    _stop(proc)


def _flags(case: dict) -> list[str]:
    out = []
    for name, value in case.items():
        out += ["--" + name.replace("_", "-"), str(value)]
    return out


def _cli(*args: str) -> str:
    p = subprocess.run(lmlab_cmd(*args), capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _solo(lm, case: dict) -> tuple[str, str]:
    """(the continuation of PROMPT, the chat reply to MESSAGE) from the Python API."""
    text = lm.generate(PROMPT, max_new_tokens=N, **case)
    answer = reply(lm, [{"role": "user", "content": MESSAGE}], CHAT_SAMPLING.replace(max_new_tokens=N, **case))
    return text, answer


def _api(client, model: str, kind: str, case: dict) -> tuple[str, str]:
    """(text, finish_reason) of one request through the official client."""
    settings = dict(model=model, max_tokens=N, temperature=case["temperature"], top_p=case["top_p"],
                    seed=case.get("seed"), extra_body={"top_k": case["top_k"]})
    if kind == "completion":
        r = client.completions.create(prompt=PROMPT, **settings)
        return r.choices[0].text, r.choices[0].finish_reason
    r = client.chat.completions.create(messages=[{"role": "user", "content": MESSAGE}], **settings)
    return r.choices[0].message.content, r.choices[0].finish_reason


@pytest.mark.parametrize("name", list(CASES))
def test_one_reply_from_generate_chat_the_api_and_the_server(name, run, lm, server):
    case = CASES[name]
    text, answer = _solo(lm, case)
    assert len(lm.tokenizer.encode(text)) == N and len(set(text)) > 4  # a long reply, past the context
    assert answer and not answer[0].isspace()  # a chat reply's leading whitespace is not part of it, anywhere
    assert len(lm.tokenizer.encode(answer)) > lm.config.context_length  # the chat reply too runs past the context
    assert _cli("generate", "--model", str(run), "--prompt", PROMPT, "--max-new-tokens", str(N), *_flags(case),
                "--device", "cpu") == PROMPT + text + "\n"
    assert _cli("chat", "--model", str(run), "--prompt", MESSAGE, "--max-new-tokens", str(N), *_flags(case),
                "--device", "cpu") == answer + "\n"
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    completion, chat = _api(client, model, "completion", case), _api(client, model, "chat", case)
    assert completion == (text, "length")  # N tokens: max_tokens reached, the context's end slid past
    assert chat == (answer, "length")  # no stop string nor EOS: max_tokens reached, past the context's end
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # 8 at once: 4 completions and 4 chats share steps
        kinds = ["completion", "chat"] * 4
        got = list(pool.map(lambda k: _api(client, model, k, case), kinds))
    assert got == [completion if k == "completion" else chat for k in kinds]


def test_the_servers_compiled_step_gives_the_plain_engines_tokens(lm):
    """The scheduler over a model whose decoding step is compiled (Inductor on CPU, one static shape: every row,
    every slot), ragged prompts queued together, prefilled 8 tokens a step and joining the batch at different
    steps: each prompt gets the greedy tokens the plain engine gives it alone, past the context's end too."""
    import threading

    from lmlab.config import ServeConfig
    from lmlab.infer.engine import Request, compile_decoding
    from lmlab.serve.scheduler import Scheduler

    compiled = copy.deepcopy(lm.model)
    compile_decoding(compiled)
    s = SamplingConfig(max_new_tokens=80, temperature=0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, lm.config.vocab_size, (n,), generator=g).tolist() for n in (5, 23, 11, 40)]
    want = [[t[0] for t in generate_ids(lm.model, [p], s)] for p in prompts]
    scheduler = Scheduler(compiled, lm.tokenizer, ServeConfig(max_batch=4, prefill_chunk=8))
    got: list[list[int]] = [[] for _ in prompts]
    finished = threading.Semaphore(0)

    def collect(i: int):
        def emit(piece) -> None:
            got[i] += [t for t, _, _ in piece.tokens]
            if piece.finish_reason is not None:
                finished.release()
        return emit

    scheduler.start()
    try:
        for i, p in enumerate(prompts):  # logprobs=0: each piece carries its token ids
            scheduler.submit(Request(p, s, emit=collect(i), logprobs=0))
        for _ in prompts:
            assert finished.acquire(timeout=300)
    finally:
        scheduler.stop()
    assert scheduler.engine.compiled is not None
    assert got == want


def test_a_compiled_model_keeps_its_engine_and_cache_between_calls(lm):
    """Also when the model decoded eagerly before it was compiled: the eager engine it kept is not reused."""
    from lmlab.infer.engine import _ENGINES, compile_decoding

    model = copy.deepcopy(lm.model)
    s = SamplingConfig(max_new_tokens=5, temperature=0)
    eager = list(generate_ids(model, [[1, 2, 3]], s.replace(max_new_tokens=61)))[:5]  # a whole context's engine
    assert _ENGINES[model].compiled is None and _ENGINES[model].S == lm.config.context_length
    compile_decoding(model)
    first = list(generate_ids(model, [[1, 2, 3]], s))
    engine, address = _ENGINES[model], _ENGINES[model].main[0].k.data_ptr()
    second = list(generate_ids(model, [[1, 2, 3]], s))
    assert engine.compiled is not None and first == second == eager
    assert _ENGINES[model] is engine and engine.main[0].k.data_ptr() == address


def test_requests_admitted_together_with_n_choices_decode_as_alone(lm):
    """An idle engine without a prefill budget (how generate runs) prefills the waiting requests as one
    left-padded batch straight into its rows, a request's other choices copying its row: every choice's greedy
    tokens are those of its prompt alone."""
    from lmlab.infer.engine import Engine, Request

    s = SamplingConfig(max_new_tokens=12, temperature=0)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, lm.config.vocab_size, (n,), generator=g).tolist() for n in (9, 3, 14)]
    want = [[t[0] for t in generate_ids(lm.model, [p], s)] for p in prompts]
    engine = Engine(lm.model, max_batch=5, slots=64)
    reqs = [Request(prompts[0], s, n=2), Request(prompts[1], s), Request(prompts[2], s, n=2)]
    got = {(id(r), i): [] for r in reqs for i in range(r.n)}
    for r in reqs:
        engine.add(r)
    first = True
    while not engine.idle:
        events = engine.step()
        if first:  # the first step prefilled all three together and sampled every choice's first token
            assert len(events) == 5 and engine.staged_ids == []
            first = False
        for req, i, token, _ in events:
            got[(id(req), i)].append(token)
    assert [got[(id(r), i)] for r in reqs for i in range(r.n)] == [want[0], want[0], want[1], want[2], want[2]]
