"""Selection: our logit filters against HF transformers' logits processors on random logits, a chi-square
test of top-k sampling, and the generation engine's stops, streaming, batching and seeding."""

from __future__ import annotations

import pytest
import torch

import lmlab
from lmlab.checkpoint import save_model
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.infer.generate import (
    SamplingConfig,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    generate_ids,
    process_logits,
    select,
)
from lmlab.model import Transformer
from lmlab.tokenizer import CharTokenizer

V = 300


def _logits(seed: int, B: int = 6) -> torch.Tensor:
    return 3 * torch.randn(B, V, generator=torch.Generator().manual_seed(seed))


def _same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), "different tokens removed"
    keep = ~torch.isinf(ref)
    assert torch.allclose(ours[keep], ref[keep], atol=1e-6)


@pytest.fixture(scope="module")
def hf_proc():
    return pytest.importorskip("transformers.generation.logits_process")


@pytest.mark.parametrize("k", [1, 5, 50, V, V + 10])
def test_top_k_equals_hf(hf_proc, k):
    for seed in range(3):
        x = _logits(seed)
        _same(apply_top_k(x, k), hf_proc.TopKLogitsWarper(top_k=k)(None, x.clone()))


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999, 1.0])
def test_top_p_equals_hf(hf_proc, p):
    for seed in range(3):
        x = _logits(seed)
        _same(apply_top_p(x, p), hf_proc.TopPLogitsWarper(top_p=p)(None, x.clone()))


@pytest.mark.parametrize("p", [0.0, 0.05, 0.2, 0.9, 1.0])
def test_min_p_equals_hf(hf_proc, p):
    for seed in range(3):
        x = _logits(seed)
        _same(apply_min_p(x, p), hf_proc.MinPLogitsWarper(min_p=p)(None, x.clone()))


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5])
def test_temperature_equals_hf(hf_proc, t):
    x = _logits(0)
    _same(apply_temperature(x, t), hf_proc.TemperatureLogitsWarper(t)(None, x.clone()))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_equals_hf(hf_proc, penalty):
    x = _logits(1)
    ids = torch.randint(0, V, (x.shape[0], 40), generator=torch.Generator().manual_seed(2))  # repeats included
    seen = torch.zeros_like(x, dtype=torch.bool).scatter_(1, ids, True)
    _same(apply_repetition_penalty(x, seen, penalty),
          hf_proc.RepetitionPenaltyLogitsProcessor(penalty)(ids, x.clone()))


@pytest.mark.parametrize("settings", [
    dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    dict(temperature=1.5, top_k=0, top_p=0.5, min_p=0.0, repetition_penalty=1.0),
    dict(temperature=0.9, top_k=10, top_p=1.0, min_p=0.3, repetition_penalty=0.8),
])
def test_composed_filters_follow_hf_order(hf_proc, settings):
    """The whole chain equals HF's processor list in the order GenerationMixin builds it."""
    x = _logits(3)
    ids = torch.randint(0, V, (x.shape[0], 25), generator=torch.Generator().manual_seed(4))
    seen = torch.zeros_like(x, dtype=torch.bool).scatter_(1, ids, True)
    chain = hf_proc.LogitsProcessorList()
    if settings["repetition_penalty"] != 1.0:
        chain.append(hf_proc.RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]))
    chain.append(hf_proc.TemperatureLogitsWarper(settings["temperature"]))
    if settings["top_k"]:
        chain.append(hf_proc.TopKLogitsWarper(settings["top_k"]))
    if settings["top_p"] < 1:
        chain.append(hf_proc.TopPLogitsWarper(settings["top_p"]))
    if settings["min_p"]:
        chain.append(hf_proc.MinPLogitsWarper(settings["min_p"]))
    _same(process_logits(x, SamplingConfig(**settings), seen), chain(ids, x.clone()))


def test_top_k_sampling_statistics():
    """Every draw lies in the top-k set, and the draw frequencies match the renormalized top-k
    probabilities (chi-square goodness of fit, fixed seed)."""
    from scipy.stats import chisquare

    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    k, n = 8, 40000
    s = SamplingConfig(top_k=k, temperature=1.0)
    topk = torch.topk(logits[0], k)
    g = torch.Generator().manual_seed(123)
    draws = select(logits.expand(n, -1), s, g)
    assert set(draws.tolist()) <= set(topk.indices.tolist())
    counts = torch.bincount(draws, minlength=50)[topk.indices].double()
    expected = topk.values.double().softmax(-1) * counts.sum()
    stat, p_value = chisquare(counts.numpy(), expected.numpy())
    assert p_value > 1e-3, f"chi-square {stat:.1f}, p={p_value:.2g}"


def _draws_match(settings: dict, warpers: list, n: int = 40_000, seed: int = 0) -> None:
    """Draw n tokens with our `select` and test the frequencies against the distribution HF's logits warpers
    give (softmax of their output): every draw inside HF's support, and a chi-square goodness of fit."""
    from scipy.stats import chisquare

    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(seed))
    ref = logits.clone()
    for warper in warpers:
        ref = warper(None, ref)
    probs = ref.double().softmax(-1)[0]
    support = probs > 0
    draws = select(logits.expand(n, -1), SamplingConfig(**settings), torch.Generator().manual_seed(seed + 1))
    counts = torch.bincount(draws, minlength=40).double()
    assert counts[~support].sum() == 0, "a token HF's warpers remove was drawn"
    expected, observed = probs * n, counts
    rare = support & (expected < 5)  # pooled into one bin, so every bin expects at least a few draws
    big = support & ~rare
    if rare.any():
        observed = torch.cat([observed[big], observed[rare].sum()[None]])
        expected = torch.cat([expected[big], expected[rare].sum()[None]])
    else:
        observed, expected = observed[big], expected[big]
    assert big.sum() >= 3  # some freedom for the test
    stat, p_value = chisquare(observed.numpy(), expected.numpy())
    assert p_value > 1e-3, f"chi-square {stat:.1f}, p={p_value:.2g}"


@pytest.mark.parametrize("t", [0.5, 1.0, 1.7])
def test_temperature_sampling_statistics(hf_proc, t):
    _draws_match(dict(temperature=t), [hf_proc.TemperatureLogitsWarper(t)])


@pytest.mark.parametrize("p", [0.5, 0.8, 0.95])
def test_top_p_sampling_statistics(hf_proc, p):
    _draws_match(dict(temperature=1.0, top_p=p), [hf_proc.TopPLogitsWarper(p)])


@pytest.mark.parametrize("p", [0.02, 0.1, 0.25])
def test_min_p_sampling_statistics(hf_proc, p):
    _draws_match(dict(temperature=1.0, min_p=p), [hf_proc.MinPLogitsWarper(p)])


def test_composed_sampling_statistics(hf_proc):
    _draws_match(dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.02),
                 [hf_proc.TemperatureLogitsWarper(0.7), hf_proc.TopKLogitsWarper(20), hf_proc.TopPLogitsWarper(0.9),
                  hf_proc.MinPLogitsWarper(0.02)])


def test_temperature_zero_is_greedy():
    x = _logits(5)
    assert torch.equal(select(x, SamplingConfig(temperature=0)), x.argmax(-1))


@pytest.mark.parametrize("bad, field", [
    (dict(top_k=-1), "top_k"), (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"), (dict(min_p=-0.01), "min_p"), (dict(min_p=1.5), "min_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_invalid_settings_name_the_parameter(bad, field):
    with pytest.raises(LmlabError, match=f"^{field} "):
        SamplingConfig(**bad)


# ---------------------------------------------------------------------------------------------------------
# The engine and the text layer, on a tiny random char model.

TEXT = "the quick brown fox jumps over the lazy dog. THE END!\n"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.manual_seed(0)
    tok = CharTokenizer.train([TEXT])
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, context_length=48, d_model=32, n_layers=2,
                      n_heads=4, n_kv_heads=2)
    model = Transformer(cfg)
    with torch.no_grad():  # sharper logits than the 0.02 init, so sampling and greedy differ visibly
        model.lm_head.weight.mul_(20)
    path = save_model(tmp_path_factory.mktemp("ckpt"), model, tok)
    return lmlab.load(path, device="cpu")


def test_same_seed_same_text(lm):
    kw = dict(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=7)
    a, b = lm.generate("the", **kw), lm.generate("the", **kw)
    assert a == b and len(a) == 30
    assert lm.generate("the", **dict(kw, seed=8)) != a


def test_kv_cache_decoding_equals_recomputing_the_context(lm):
    """Greedy with the cache equals the naive loop that re-runs the whole sequence for every token."""
    ids = lm.tokenizer.encode("the lazy")
    naive = list(ids)
    with torch.no_grad():
        for _ in range(20):
            naive.append(int(lm.model(torch.tensor([naive]))[0, -1].argmax()))
    cached = [t[0] for t in generate_ids(lm.model, [ids], SamplingConfig(max_new_tokens=20, temperature=0))]
    assert cached == naive[len(ids):]


def test_batch_equals_one_by_one(lm):
    prompts = ["t", "the quick", "over the la"]
    batch = lm.generate(prompts, max_new_tokens=15, temperature=0)
    assert batch == [lm.generate(p, max_new_tokens=15, temperature=0) for p in prompts]


def test_stop_string_cuts_the_text(lm):
    full = lm.generate("the", max_new_tokens=30, temperature=0)
    stop = full[5:7]
    cut = lm.generate("the", max_new_tokens=30, temperature=0, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_eos_stops_generation(lm):
    ids = lm.tokenizer.encode("the")
    free = [t[0] for t in generate_ids(lm.model, [ids], SamplingConfig(max_new_tokens=20, temperature=0))]
    eos = free[4]
    engine = generate_ids(lm.model, [ids], SamplingConfig(max_new_tokens=20, temperature=0), eos_id=eos)
    stopped = [t[0] for t in engine]
    assert stopped == free[: free.index(eos) + 1]


def test_streaming_pieces_add_up_to_the_result(lm):
    pieces: list[str] = []
    out = lm.generate("the", max_new_tokens=25, temperature=0.8, seed=3, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == out
    assert "".join(lm.stream("the", max_new_tokens=25, temperature=0.8, seed=3)) == out


def test_max_new_tokens_and_a_sliding_window(lm):
    assert lm.generate("the", max_new_tokens=0) == ""
    # 43 prompt tokens + 30 new pass the 48-token context: the window slides and generation goes on.
    prompt = "the quick brown fox jumps over the lazy dog"
    ids = lm.tokenizer.encode(prompt)
    s = SamplingConfig(max_new_tokens=30, temperature=0)
    out = [t[0] for t in generate_ids(lm.model, [ids], s)]
    assert len(out) == 30
    # Until the window is full (6 tokens: 43 + 6 = 49 = C + 1) decoding is plain; the 7th token is
    # conditioned on the last C/2 = 24 tokens, positions from 0, as a fresh prefill of them gives.
    short = [t[0] for t in generate_ids(lm.model, [ids], SamplingConfig(max_new_tokens=6, temperature=0))]
    assert out[:6] == short
    with torch.no_grad():
        window = torch.tensor([(ids + out[:6])[-24:]])
        assert out[6] == int(lm.model(window)[0, -1].argmax())


def test_prompt_longer_than_context(lm):
    long = TEXT * 2
    with pytest.raises(LmlabError, match="context"):
        lm.generate(long, max_new_tokens=5)
    assert len(lm.generate(long, max_new_tokens=5, truncate=True, temperature=0)) == 5


@pytest.mark.parametrize("prompts", [[], ()])
def test_no_prompts_is_a_clear_error(lm, prompts):
    with pytest.raises(LmlabError, match="no prompts"):
        lm.generate(prompts)
    with pytest.raises(LmlabError, match="no prompts"):
        next(generate_ids(lm.model, list(prompts), SamplingConfig(max_new_tokens=3)))


def test_left_padded_mask_has_no_empty_row(lm):
    """A pad query that may read nothing is an all-False mask row, which SDPA's CUDA kernels can turn into NaN
    that then leaks into real rows. Every row must allow at least its own slot, and the real rows must still
    see exactly their own tokens, causally."""
    from lmlab.model import attention_mask

    offset = torch.tensor([3, 0, 5])
    for input_pos, S in ((torch.arange(8), 8), (torch.arange(8), 12), (torch.tensor([8]), 12)):
        mask = attention_mask(input_pos, S, offset)[:, 0]  # (B, T, S)
        assert mask.any(-1).all(), "a query row with nothing to attend to"
        for b, off in enumerate(offset.tolist()):
            for t, q in enumerate(input_pos.tolist()):
                if q >= off:  # a real token: its own row's real tokens up to itself, nothing else
                    assert mask[b, t].tolist() == [off <= k <= q for k in range(S)]
    idx = torch.tensor([[0] * 3 + [1] * 5, [2] * 8, [0] * 5 + [3] * 3])
    with torch.no_grad():
        assert torch.isfinite(lm.model(idx, torch.arange(8), offset)).all()


# ---------------------------------------------------------------------------------------------------------
# Against HF generate on a tiny random HF directory with a BPE tokenizer.


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random Llama saved by transformers, with a BPE tokenizer.json and no tokenizer_config.json."""
    import json

    transformers = pytest.importorskip("transformers")
    from lmlab.tokenizer import BPETokenizer
    from tests.conftest import corpus_text

    path = tmp_path_factory.mktemp("hf")
    tok = BPETokenizer.train([corpus_text(20_000)], vocab_size=300)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))
    with torch.no_grad():  # random but varied greedy text: sharper logits than the init's
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    return path


def _hf_generate(path, prompt: list[int], n: int, **kw) -> list[int]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()  # reads generation_config.json
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def test_every_eos_id_in_generation_config_stops_like_hf(hf_dir):
    """generation_config.json lists several EOS ids (Llama 3 instruct: 128001/128008/128009): generation ends at
    whichever comes first, token for token as HF generate does, and the text stops there."""
    import json

    prompt = lmlab.load(hf_dir, device="cpu").tokenizer.encode("First Citizen:")
    free = _hf_generate(hf_dir, prompt, 40)
    firsts = list(dict.fromkeys(free))[1:4]  # three ids, first produced at increasing steps after the start
    assert len(firsts) == 3, free
    for k in range(3):
        listed = firsts[k:][::-1]  # the earliest one last in the list: order must not matter
        (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": listed}))
        ref = _hf_generate(hf_dir, prompt, 40)
        lm = lmlab.load(hf_dir, device="cpu")
        assert set(lm.tokenizer.eos_ids) == set(listed)
        ours = [t[0] for t in generate_ids(lm.model, [prompt], SamplingConfig(max_new_tokens=40, temperature=0),
                                           eos_id=lm.tokenizer.eos_ids)]
        assert ours == ref == free[: free.index(firsts[k]) + 1]
        text = lm.generate("First Citizen:", max_new_tokens=40, temperature=0)
        assert text == lm.tokenizer.decode(free[: free.index(firsts[k])])
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))


@pytest.mark.parametrize("bad", ["2", [1, "x"], [2.0], True, {"a": 1}])
def test_bad_generation_config_eos_is_a_clear_error(tmp_path, hf_dir, bad):
    import json
    import shutil

    shutil.copytree(hf_dir, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
    with pytest.raises(LmlabError, match="eos_token_id"):
        lmlab.load(tmp_path / "m", device="cpu")


# ---------------------------------------------------------------------------------------------------------
# The text layer alone: a BPE tokenizer's ids fed one at a time, as the engine feeds them.

UNICODE = "नमस्ते, आप कैसे हैं? 你好，世界 🎉🎉 café naïve — «ok» ∑x² 日本語のテキスト 👩‍👩‍👧 "


@pytest.fixture(scope="module")
def bpe():
    from lmlab.tokenizer import BPETokenizer
    from tests.conftest import corpus_text

    return BPETokenizer.train([corpus_text(20_000), UNICODE * 3], vocab_size=400)


def _stream(tok, ids: list[int], stop=()) -> tuple[list[str], bool]:
    from lmlab.infer.generate import TextStream

    ts, deltas, fed = TextStream(tok, tuple(stop)), [], []
    for i in ids:
        fed.append(i)
        stopped = ts.feed(fed)
        deltas.append(ts.take())
        if stopped:
            break
    deltas.append(ts.take(final=True))
    return deltas, ts.stopped


def test_streamed_text_equals_decoding_all_ids(bpe):
    """Multi-byte characters split over several byte-level tokens: the deltas add up to the tokenizer's own
    decode of all ids, and no delta carries half a character (U+FFFD)."""
    text = ("First Citizen: " + UNICODE) * 4
    ids = bpe.encode(text)
    assert any("\ufffd" in bpe.decode([i]) for i in ids)  # some characters are split over tokens
    deltas, stopped = _stream(bpe, ids)
    assert "".join(deltas) == bpe.decode(ids) == text and not stopped
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("stop", ["你好，世", "🎉🎉 ca", "speak. न", "ok» ∑", "x² 日"])
def test_stop_strings_spanning_tokens(bpe, stop):
    text = "First Citizen: speak, speak. " + UNICODE + UNICODE
    ids = bpe.encode(text)
    full = bpe.decode(ids)
    at = full.index(stop)
    boundaries = {len(bpe.decode(ids[:n])) for n in range(len(ids))}
    assert any(at < b < at + len(stop) for b in boundaries), "the stop string should span a token boundary"
    deltas, stopped = _stream(bpe, ids, stop=["never there", stop])
    assert stopped and "".join(deltas) == full[:at]


def test_text_layer_work_per_token_is_constant(bpe):
    """8K tokens: feeding the last 1K ids costs no more than twice the first 1K (the old stream re-decoded
    every id each step and rescanned all text for stops). Thread CPU time, best of three: robust to load."""
    import time

    from lmlab.infer.generate import TextStream
    from tests.conftest import corpus_text

    ids = bpe.encode(corpus_text(60_000) + UNICODE * 200)[:8192]
    assert len(ids) == 8192
    stops = ("\nUSER:", "never appears here")
    best = {"first": float("inf"), "last": float("inf")}
    for _ in range(3):
        ts, fed = TextStream(bpe, stops), []
        for chunk in range(8):
            t0 = time.thread_time()
            for i in ids[chunk * 1024:(chunk + 1) * 1024]:
                fed.append(i)
                ts.feed(fed)
                ts.take()
            spent = time.thread_time() - t0
            if chunk in (0, 7):
                key = "first" if chunk == 0 else "last"
                best[key] = min(best[key], spent)
        assert not ts.stopped
    assert best["last"] <= 2 * best["first"], best


# ---------------------------------------------------------------------------------------------------------
# One set of sampling settings: SamplingConfig's defaults reach the API and the CLI alike.


def test_cli_and_api_share_samplingconfigs_defaults(lm):
    import dataclasses
    import subprocess

    from lmlab.cli import build_parser, config_from
    from tests.conftest import lmlab_cmd, subprocess_env

    d = SamplingConfig()
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p"])
    flags = {k[2:]: v for k, v in vars(args).items() if k.startswith("s_")}
    assert sorted(flags) == sorted(f.name for f in dataclasses.fields(SamplingConfig))  # a flag for every field
    assert all(v is None for v in flags.values())  # and no default of the CLI's own: SamplingConfig's
    assert config_from(args, SamplingConfig, "s", SamplingConfig()) == d
    r = subprocess.run(lmlab_cmd("generate", "--model", lm.source, "--prompt", "the", "--seed", "5", "--device",
                                 "cpu"), capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    api = lm.generate("the", seed=5)
    assert r.stdout == "the" + api + "\n" and len(api) == d.max_new_tokens
    assert lm.generate("the", SamplingConfig(seed=5)) == api == "".join(lm.stream("the", seed=5))
    assert lm.generate("the", SamplingConfig(seed=5, temperature=0.1), temperature=d.temperature) == api


@pytest.mark.parametrize("settings, match", [
    (dict(temprature=0.5), "did you mean 'temperature'"), (dict(stop=[1]), "^stop must"),
    (dict(stop=3), "^stop must"), (dict(top_k=1.5), "^top_k"),
])
def test_bad_settings_are_clear_errors(lm, settings, match):
    with pytest.raises(LmlabError, match=match):
        lm.generate("the", **settings)
    with pytest.raises(LmlabError, match=match):
        next(lm.stream("the", **settings))


def test_positional_settings_are_refused_clearly(lm):
    with pytest.raises(LmlabError, match="by name"):
        lm.generate("the", 50)


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_engine_repetition_penalty_token_identical_to_hf(hf_dir, penalty):
    """The whole engine with a repetition penalty (the prompt and each generated token count as seen), greedy,
    against HF generate on the same random model: token for token, for two prompts of one length in a batch."""
    lm = lmlab.load(hf_dir, device="cpu")
    prompts = [lm.tokenizer.encode(t)[:6] for t in ("First Citizen: we are", "Speak, speak. hear me now")]
    assert all(len(p) == 6 for p in prompts)
    s = SamplingConfig(max_new_tokens=30, temperature=0, repetition_penalty=penalty)
    steps = list(generate_ids(lm.model, prompts, s))
    for b, prompt in enumerate(prompts):
        ours = [step[b] for step in steps]
        ref = _hf_generate(hf_dir, prompt, 30, repetition_penalty=penalty)
        assert ours == ref
    plain = [t[0] for t in generate_ids(lm.model, prompts[:1], SamplingConfig(max_new_tokens=30, temperature=0))]
    assert plain != [step[0] for step in steps]  # the penalty changed the text, so the test can see it
