"""`lmlab serve` end to end: a real server process on 127.0.0.1, spoken to by the official `openai` client and httpx.

References nobody here wrote: the openai client parses every response; greedy text is compared with
`LM.generate` and `lmlab.infer.chat.reply` (the batch engine of lmlab.infer.generate, not the server's scheduler);
logprobs with log_softmax of a plain full forward pass in this file. The model is a tiny random Llama (grouped-query
attention) with a byte-level BPE tokenizer and a sharpened head, so its greedy choices are clear-cut; its context
of 64 makes the scheduler move rows within the cache often, and --prefill-chunk 8 splits every prompt.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import httpx
import pytest
import torch

from tests.conftest import browser, corpus_text, lmlab_cmd, subprocess_env
from tests.conftest import free_port as _free_port
from tests.conftest import stop_process as _stop

openai = pytest.importorskip("openai")
KEY = "test-key"


def _tiny_model(path, context: int, endless: bool = False):
    """The tiny model; `endless`: its EOS logit is always 0, below the sharpened head's top logits, so its
    replies run to max_tokens."""
    from lmlab.checkpoint import save_model
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer
    from lmlab.tokenizer import BPETokenizer

    torch.manual_seed(0)
    tok = BPETokenizer.train([corpus_text(20_000) + " héllo wörld"], vocab_size=400)
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, context_length=context, d_model=32, n_layers=2,
                      n_heads=4, n_kv_heads=2, d_ff=64)
    model = Transformer(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked distributions: greedy picks with clear margins
        if endless:
            model.lm_head.weight[list(tok.eos_ids)] = 0
    return save_model(path, model, tok)


def _start(model, *flags: str):
    port = _free_port()
    proc = subprocess.Popen(lmlab_cmd("serve", "--model", str(model), "--port", str(port), "--device", "cpu", *flags),
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server did not start: {proc.stdout.read()}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _tiny_model(tmp_path_factory.mktemp("serve") / "ckpt", context=64)


@pytest.fixture(scope="module")
def server(model_dir):
    proc, url = _start(model_dir, "--max-batch", "4", "--prefill-chunk", "8", "--api-key", KEY)
    yield url
    _stop(proc)
    assert proc.returncode is not None


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lm(model_dir):
    import lmlab

    return lmlab.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


PROMPT = "First Citizen:\nBefore we proceed"


def test_greedy_completion_equals_generate(client, model_id, lm):
    expected = lm.generate(PROMPT, temperature=0, max_new_tokens=20)
    r = client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=20)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(lm.tokenizer.encode(PROMPT))
    streamed = client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=20, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_greedy_chat_equals_lmlab_chat(client, model_id, lm):
    from lmlab.infer.chat import CHAT_SAMPLING, reply

    messages = [{"role": "system", "content": "Speak."}, {"role": "user", "content": "Hello there"}]
    expected = reply(lm, messages, CHAT_SAMPLING.replace(temperature=0, max_new_tokens=16))
    r = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=16)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=model_id, messages=messages, temperature=0,
                                            max_completion_tokens=16, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_logprobs_equal_log_softmax(client, model_id, lm):
    r = client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=8, logprobs=3)
    lp = r.choices[0].logprobs
    ids = lm.tokenizer.encode(PROMPT)
    for k in range(len(lp.tokens)):
        with torch.no_grad():
            ref = torch.log_softmax(lm.model(torch.tensor([ids]))[0, -1].double(), dim=-1)  # plain full forward
        token = int(ref.argmax())
        assert lp.tokens[k] == lm.tokenizer.decode([token])
        assert lp.token_logprobs[k] == pytest.approx(float(ref[token]), abs=1e-4)
        top = ref.topk(3).values.tolist()  # the legacy dict is keyed by text: tokens of equal text share a key
        assert all(any(abs(v - t) < 1e-4 for t in top) for v in lp.top_logprobs[k].values())
        ids.append(token)


def test_chat_logprobs_equal_log_softmax(client, model_id, lm):
    from lmlab.templates import chat_prompt_ids

    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=model_id, messages=messages, max_tokens=6, logprobs=True,
                                          top_logprobs=3, temperature=1.0, seed=3)
    ids = chat_prompt_ids(lm.tokenizer, messages)
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte <-> character table

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab = {tuple(to_byte[c] for c in piece): i for piece, i in lm.tokenizer.tok.get_vocab().items()
             if all(c in to_byte for c in piece)}
    for entry in chat.choices[0].logprobs.content:
        with torch.no_grad():
            ref = torch.log_softmax(lm.model(torch.tensor([ids]))[0, -1].double(), dim=-1)
        token = vocab[tuple(entry.bytes)]
        assert entry.logprob == pytest.approx(float(ref[token]), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(ref.topk(3).values.tolist(), abs=1e-4)
        ids.append(token)



def test_n2_seed_and_usage(client, model_id):
    r = client.completions.create(model=model_id, prompt=PROMPT, n=2, seed=11, temperature=1.0, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens <= 24 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    alone = client.completions.create(model=model_id, prompt=PROMPT, seed=11, temperature=1.0, max_tokens=12)
    assert alone.choices[0].text == r.choices[0].text  # choice 0 draws with the request's seed
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=5, stream=True)
    indices = {c.choices[0].index for c in chat if c.choices}
    assert indices == {0, 1}


def test_prompt_cache_reuses_a_shared_prefix(client, model_id, lm):
    """A prompt that begins like the previous one is prefilled from where they part, and says so in usage
    (OpenAI's prompt_tokens_details.cached_tokens); its reply is still the model's own greedy one."""
    longer = PROMPT + " any further, hear me speak."
    a, b = lm.tokenizer.encode(PROMPT), lm.tokenizer.encode(longer)
    shared = next(i for i, (x, y) in enumerate(zip(a + [-1], b, strict=False)) if x != y)
    assert shared > 3
    client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=4)  # fills the cache
    second = client.completions.create(model=model_id, prompt=longer, temperature=0, max_tokens=12)
    assert second.usage.prompt_tokens_details.cached_tokens == shared
    assert second.choices[0].text == lm.generate(longer, temperature=0, max_new_tokens=12)
    again = client.completions.create(model=model_id, prompt=longer, temperature=0, max_tokens=12)
    assert again.usage.prompt_tokens_details.cached_tokens == len(b) - 1  # the last token runs for its logits
    assert again.choices[0].text == second.choices[0].text


def test_a_window_below_the_models_context(tmp_path):
    """The server decodes in its window: the model's context, or --context where smaller (a memory knob). A reply
    that fills the window slides it as generate slides the model's context, so a server with a 96-token window
    gives, greedy or seeded, the reply generate gives with a 96-token context; generate's own 256-token context
    gives another reply past the first slide, and the server says so in one line when it starts."""
    import lmlab
    from lmlab.config import SamplingConfig, ServeConfig
    from lmlab.infer.generate import generate_text
    from lmlab.model import Transformer
    from lmlab.serve import window_note

    model = _tiny_model(tmp_path / "ckpt", context=256, endless=True)
    lm = lmlab.load(model, device="cpu")
    narrow = Transformer(lm.config.replace(context_length=96)).eval()  # the same weights, a 96-token context
    narrow.load_state_dict(lm.model.state_dict())
    proc, url = _start(model, "--context", "96")
    try:
        for case in (dict(temperature=0), dict(temperature=1.0, seed=5)):
            body = {"prompt": PROMPT, "max_tokens": 200, **case}
            r = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
            assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 200, r
            s = SamplingConfig(max_new_tokens=200, **case)
            assert r["choices"][0]["text"] == generate_text(narrow, lm.tokenizer, [PROMPT], s)[0]
            assert r["choices"][0]["text"] != lm.generate(PROMPT, s)
    finally:
        _stop(proc)
    lines = [line for line in proc.stdout.read().splitlines() if "decode in a window" in line]
    assert lines == [window_note(ServeConfig(context=96), 256)]  # one line
    assert lines[0].startswith("lmlab serve: requests decode in a window of 96 tokens, less than the model's "
                               "context of 256") and "--context 256" in lines[0]
    assert window_note(ServeConfig(), 256) is None and window_note(ServeConfig(context=4096), 256) is None
    assert window_note(ServeConfig(), 8192) is not None  # the default window is at most 2048 tokens


def _clean_window(text: str, size: int = 3) -> str | None:
    for i in range(3, len(text) - size):
        window = text[i:i + size]
        if "\ufffd" not in window and window.strip():
            return window
    return None


def test_stop_strings(client, model_id):
    full = client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=30).choices[0].text
    stop = _clean_window(full)
    assert stop is not None, full
    r = client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=30, stop=[stop, "@@"])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model_id, prompt=PROMPT, temperature=0, max_tokens=30, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[:full.find(stop)]


def test_seeded_requests_alone_equal_concurrent(client, model_id):
    """Different prompt lengths, output lengths and settings at once: each matches its run alone (no mixed-up
    rows), through rows joining, leaving and moving in the 64-slot cache."""
    jobs = [dict(prompt=PROMPT, seed=1, max_tokens=40, temperature=1.0),
            dict(prompt="Hello", seed=2, max_tokens=10, temperature=0.8, top_k=20),
            dict(prompt=PROMPT * 2, seed=3, max_tokens=25, temperature=1.2, top_p=0.9, presence_penalty=1.0),
            dict(prompt="All:\nSpeak, speak.", seed=4, max_tokens=50, temperature=1.0, min_p=0.05,
                 repetition_penalty=1.3, frequency_penalty=0.5),
            dict(prompt="The king", seed=5, max_tokens=30, temperature=0.7, logit_bias={"10": 5.0}),
            dict(prompt="my lord", seed=6, max_tokens=20, temperature=1.0)]

    def run(job):
        return client.completions.create(model=model_id, prompt=job["prompt"], max_tokens=job["max_tokens"],
                                         temperature=job["temperature"], seed=job["seed"],
                                         presence_penalty=job.get("presence_penalty", 0),
                                         frequency_penalty=job.get("frequency_penalty", 0),
                                         logit_bias=job.get("logit_bias"),
                                         extra_body={k: job[k] for k in ("top_k", "top_p", "min_p",
                                                                         "repetition_penalty") if k in job}
                                         ).choices[0].text

    alone = [run(job) for job in jobs]
    together: list[str | None] = [None] * len(jobs)

    def worker(i):
        time.sleep(0.01 * i)
        together[i] = run(jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))] * 1
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


BAD = [
    ("/v1/completions", {"prompt": PROMPT, "temperature": -0.1}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": PROMPT, "n": 0}, "n"),
    ("/v1/completions", {"prompt": PROMPT, "n": 99}, "n"),
    ("/v1/completions", {"prompt": PROMPT, "n": True}, "n"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["a"] * 17}, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": PROMPT, "seed": "x"}, "seed"),
    ("/v1/completions", {"prompt": PROMPT, "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": PROMPT, "stream_options": {"include_usage": 3}}, "stream_options.include_usage"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"prompt": PROMPT, "frequency_penalty": -2.5}, "frequency_penalty"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"99999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": PROMPT, "top_k": -2}, "top_k"),
    ("/v1/completions", {"prompt": PROMPT, "min_p": 1.5}, "min_p"),
    ("/v1/completions", {"prompt": PROMPT, "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": PROMPT, "model": "gpt-4"}, "model"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [99999]}, "prompt"),
    ("/v1/completions", {"prompt": "word " * 200}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 100}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 30,
                              "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, "logprobs"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p.rsplit('/', 1)[1]}-{param}-{i}" for i, (p, _, param)
                                                      in enumerate(BAD)])
def test_malformed_request_is_a_4xx_with_openai_error(server, path, body, param):
    r = httpx.post(server + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error


@pytest.mark.parametrize("content", [b"{", b"[1, 2]", b"", b"\xff\xfe", b'{"prompt": NaN}', b"[" * 100_000])
def test_malformed_json_is_a_400(server, content):
    r = httpx.post(server + "/v1/completions", content=content, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def _metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    """/metrics as {name: value} (Prometheus text: one "name value" line per series, "#" lines are comments)."""
    text = httpx.get(url + "/metrics", headers=headers).text
    return {k: float(v) for k, v in (line.split(" ") for line in text.splitlines() if not line.startswith("#"))}


def test_api_key_cors_routes_and_metrics(server, client):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.options(server + "/v1/chat/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "http://example.com")
    r = httpx.get(server + "/nowhere", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert "<title>lmlab chat</title>" in httpx.get(server + "/").text
    client.completions.create(model=client.models.list().data[0].id, prompt="Hi", max_tokens=2)
    values = _metrics(server, headers={"Authorization": f"Bearer {KEY}"})
    assert values["lmlab_requests_total"] >= 1 and values["lmlab_generated_tokens_total"] >= 2
    assert values["lmlab_queue_length"] == 0 and values["lmlab_batch_rows"] == 4
    assert values["lmlab_time_to_first_token_seconds_count"] >= 1


def test_a_foreign_host_header_is_refused(server):
    """Against DNS rebinding (another site's name pointed at 127.0.0.1): a server on 127.0.0.1 answers only to
    localhost's names and its own address."""
    auth = {"Authorization": f"Bearer {KEY}"}
    for host in ("evil.example", "evil.example:8000", "0.0.0.0"):
        r = httpx.get(server + "/v1/models", headers={**auth, "Host": host})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
        assert r.json()["error"]["code"] == "invalid_host" and "--host 0.0.0.0" in r.json()["error"]["message"]
    port = server.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.get(server + "/v1/models", headers={**auth, "Host": host}).status_code == 200, host


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """One row, one queue place, a long context: a request that runs for seconds unless its client leaves."""
    proc, url = _start(_tiny_model(tmp_path_factory.mktemp("long") / "ckpt", context=4096), "--max-batch", "1",
                       "--max-queue", "1", "--context", "4096")
    yield url
    _stop(proc)


def _long_stream(url: str, client: httpx.Client):
    body = {"prompt": "Hello", "max_tokens": 4000, "stream": True, "logit_bias": {"0": -100}}
    return client.stream("POST", url + "/v1/completions", json=body, timeout=30)


def test_disconnect_frees_the_row_and_full_queue_is_503(slow_server):
    """A 4000-token stream (seconds of decoding) holds the one row; a second request waits in the one queue
    place; a third is refused with 503. When the first client leaves, the other two are served at once."""
    small = {"prompt": "Hi", "max_tokens": 2}
    answers = []
    with httpx.Client(timeout=30) as first, httpx.Client(timeout=30) as second:
        waiting = threading.Thread(target=lambda: answers.append(second.post(slow_server + "/v1/completions",
                                                                              json=small)))
        with _long_stream(slow_server, first) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the row is busy decoding
            waiting.start()
            time.sleep(0.5)
            full = httpx.post(slow_server + "/v1/completions", json=small)
            assert full.status_code == 503 and full.headers["retry-after"] == "1", full.text
            assert set(full.json()["error"]) == {"message", "type", "param", "code"}
        start = time.perf_counter()  # the first client has gone
        waiting.join(timeout=30)
        r = httpx.post(slow_server + "/v1/completions", json=small, timeout=30)
        assert r.status_code == 200 and answers[0].status_code == 200
        assert time.perf_counter() - start < 2
    metrics = httpx.get(slow_server + "/metrics").text
    assert "lmlab_batch_rows_busy 0" in metrics and "lmlab_queue_length 0" in metrics


def test_cache_view_writes_through():
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer

    model = Transformer(ModelConfig(family="llama", vocab_size=50, context_length=16, d_model=16, n_layers=1,
                                    n_heads=2, n_kv_heads=1, d_ff=32)).eval()
    ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        reference = model(ids)[0, -1]  # no cache at all
        caches = model.make_cache(3, 16)
        model.use_cache([c.view(slice(1, 2), slice(4, 10)) for c in caches])  # row 1, slots 4..9 of the cache
        out = model(ids, torch.arange(6), last_only=True)[0, -1]
    model.clear_cache()
    torch.testing.assert_close(out, reference)
    assert caches[0].k[1, :, 4:10].abs().sum() > 0 and caches[0].k[[0, 2]].abs().sum() == 0
    assert caches[0].k[1, :, :4].abs().sum() == 0 and caches[0].k[1, :, 10:].abs().sum() == 0


def test_chat_page_in_a_real_browser(server, tmp_path):
    """Headless system Chromium opens /, sends a message and sees a streamed reply; the screenshot is kept."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        driver.get(server + "/")
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("12")
        driver.find_element(By.ID, "input").send_keys("Hello there")
        driver.find_element(By.ID, "send").click()
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled()
                   and "chunks in" in d.find_element(By.ID, "status").text)
        replies = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        assert len(replies) == 1 and replies[0].text.strip(), driver.find_element(By.ID, "log").text
        assert driver.find_elements(By.CSS_SELECTOR, ".msg.user")[0].text == "Hello there"
        driver.save_screenshot(str(tmp_path / "chat_page.png"))
        assert (tmp_path / "chat_page.png").stat().st_size > 1000
    finally:
        driver.quit()


def test_stop_button_cancels_generation_in_a_real_browser(slow_server):
    """A 4000-token greedy reply streams into the page; Stop ends it: the page keeps what came and is ready for the
    next message, and the server frees the row having generated fewer tokens than the reply's first EOS-free
    stretch (checked beforehand), so neither EOS nor the length cap can have ended it: Stop did."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    clear_run = 1500
    body = {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, "max_tokens": clear_run}
    assert httpx.post(slow_server + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0][
        "finish_reason"] == "length"  # greedy: no EOS in the reply's first 1500 tokens
    driver = browser()
    try:
        driver.get(slow_server + "/")
        for field, value in (("temperature", "0"), ("max_tokens", "4000")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        before = _metrics(slow_server)["lmlab_generated_tokens_total"]
        driver.find_element(By.ID, "input").send_keys("Hello there")
        driver.find_element(By.ID, "send").click()
        wait = WebDriverWait(driver, 30, poll_frequency=0.05)
        wait.until(lambda d: "tokens/s" in d.find_element(By.ID, "status").text)  # streaming has begun
        assert driver.find_element(By.ID, "stop").is_enabled() and not driver.find_element(By.ID, "send").is_enabled()
        driver.find_element(By.ID, "stop").click()
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
        assert "chunks in" in driver.find_element(By.ID, "status").text
        assert not driver.find_element(By.ID, "stop").is_enabled()
        assert driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[0].text.strip()
        deadline = time.perf_counter() + 5
        while _metrics(slow_server)["lmlab_batch_rows_busy"] != 0:
            assert time.perf_counter() < deadline, "the stopped request still holds its row"
            time.sleep(0.1)
        generated = _metrics(slow_server)["lmlab_generated_tokens_total"] - before
        assert 0 < generated < clear_run, generated
    finally:
        driver.quit()


def test_request_timeout_api_key_file_and_latency_histograms(tmp_path):
    """--request-timeout ends a request that runs past it with OpenAI's error (HTTP 408, or the stream's last
    event), frees its row at once and counts the failure; --api-key-file guards the routes as --api-key does;
    /metrics parses with prometheus_client's own parser and holds the two latency histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    model = _tiny_model(tmp_path / "ckpt", context=4096)
    proc, url = _start(model, "--max-batch", "2", "--context", "4096", "--request-timeout", "1",
                       "--api-key-file", str(key_file))
    auth = {"Authorization": "Bearer file-key"}
    try:
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
        long = {"prompt": "Hello", "max_tokens": 4000, "logit_bias": {"0": -100}}
        start = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json=long, headers=auth, timeout=30)
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout", r.text
        assert 1 <= time.perf_counter() - start < 5 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        with httpx.stream("POST", url + "/v1/completions", json={**long, "stream": True}, headers=auth,
                          timeout=30) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "request_timeout"
        ok = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 5}, headers=auth, timeout=30)
        assert ok.status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics", headers=auth).text)}
        value = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
        assert value["lmlab_request_failures_total"] == 2 and value["lmlab_batch_rows_busy"] == 0
        for name in ("lmlab_time_to_first_token_seconds", "lmlab_time_per_output_token_seconds"):
            assert families[name].type == "histogram" and value[name + "_count"] >= 1
    finally:
        _stop(proc)
    key_file.write_text("\n")
    p = subprocess.run(lmlab_cmd("serve", "--model", str(model), "--api-key-file", str(key_file)),
                       capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "is empty" in p.stderr
