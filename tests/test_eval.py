"""lmlab eval: the tokenizer check, the strided sliding window against a direct computation, the chunked loss,
and bad values refused in one line."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.api import LM
from lmlab.config import ModelConfig
from lmlab.data.tokens import TokenData, prepare
from lmlab.errors import LmlabError
from lmlab.infer.evaluate import evaluate, tokens_for
from lmlab.model import Transformer
from tests.conftest import lmlab_cmd, subprocess_env


def tiny_lm(tokenizer, vocab_size: int | None = None, context: int = 16, seed: int = 0) -> LM:
    torch.manual_seed(seed)
    cfg = ModelConfig(family="llama", vocab_size=vocab_size or tokenizer.vocab_size, context_length=context,
                      d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    return LM(Transformer(cfg).eval(), tokenizer, source="tiny")


def char_dir(tmp_path, name: str, text: str):
    (tmp_path / f"{name}.txt").write_text(text * 50)
    prepare([str(tmp_path / f"{name}.txt")], tmp_path / name, quiet=True)
    return tmp_path / name


# ---------------------------------------------------------------------------------------------------------
# The tokenizer check


def test_eval_refuses_data_from_another_tokenizer(tmp_path):
    ours, other = char_dir(tmp_path, "ours", "abcd efgh\n"), char_dir(tmp_path, "other", "ABCD EFGH\n")
    lm = tiny_lm(TokenData(ours).tokenizer)
    assert TokenData(other).vocab_size == lm.config.vocab_size  # the size check alone would let it through
    assert len(tokens_for(lm, ours)) > 0
    with pytest.raises(LmlabError, match=r"tokenized with a 10-token char tokenizer \(fingerprint \w+\), but tiny "
                                         r"uses a 10-token char tokenizer \(fingerprint \w+\)"):
        tokens_for(lm, other)
    for d in (ours, other):  # a directory prepared before meta.json held the fingerprint: computed from its file
        meta = json.loads((d / "meta.json").read_text())
        del meta["tokenizer_sha256"]
        (d / "meta.json").write_text(json.dumps(meta))
    assert len(tokens_for(lm, ours)) > 0
    with pytest.raises(LmlabError, match="fingerprint"):
        tokens_for(lm, other)


def test_model_without_tokenizer_keeps_the_vocab_size_check(tmp_path):
    data = char_dir(tmp_path, "d", "abcd efgh\n")
    assert len(tokens_for(tiny_lm(None, vocab_size=10), data)) > 0
    with pytest.raises(LmlabError, match="tokenized with 10 tokens but the model knows 8"):
        tokens_for(tiny_lm(None, vocab_size=8), data)


def test_eval_cli_refuses_another_tokenizer_in_one_line(tmp_path, char_data):
    from lmlab.checkpoint import save_checkpoint

    other = char_dir(tmp_path, "other", "ABCD EFGH\n")
    lm = tiny_lm(TokenData(other).tokenizer)
    save_checkpoint(tmp_path / "ckpt", lm.config, lm.model.state_dict(), lm.tokenizer)
    r = subprocess.run(lmlab_cmd("eval", "--model", str(tmp_path / "ckpt"), "--data", str(char_data),
                                 "--device", "cpu"), capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 2 and r.stderr.startswith("lmlab: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "fingerprint" in r.stderr


# ---------------------------------------------------------------------------------------------------------
# The sliding window, the chunked loss and the shared loop, against plain torch


def direct_loss(model, tokens: np.ndarray, T: int, stride: int) -> tuple[float, int]:
    """The sliding window written out plainly: one window at a time, plain torch cross-entropy on the model's
    logits over the targets no earlier window scored; the last window ends at the last token."""
    t = torch.as_tensor(tokens.astype(np.int64))
    nll, n, scored_until, begin = 0.0, 0, 0, 0  # scored_until: targets 1..scored_until are scored
    with torch.no_grad():
        while scored_until < len(t) - 1:
            begin = min(begin, len(t) - 1 - T)
            x, y = t[begin:begin + T], t[begin + 1:begin + T + 1]
            new = begin + T - scored_until
            nll += F.cross_entropy(model(x[None])[0][-new:], y[-new:], reduction="sum").item()
            n, scored_until, begin = n + new, begin + T, begin + stride
    return nll / n, n


@pytest.mark.parametrize("context, stride, batch", [(16, 5, 3), (16, 16, 2), (12, 1, 4), (16, 8, 1), (7, 3, 64)])
def test_sliding_window_equals_a_direct_computation(context, stride, batch):
    lm = tiny_lm(None, vocab_size=50)
    tokens = np.random.default_rng(0).integers(0, 50, size=103).astype(np.uint16)
    r = evaluate(lm, tokens, batch_size=batch, context=context, stride=stride, quiet=True)
    loss, n = direct_loss(lm.model, tokens, context, stride)
    assert r.tokens == n == len(tokens) - 1  # every token after the first, once
    assert r.loss == pytest.approx(loss, rel=1e-5)


def test_stride_equal_to_context_is_the_non_overlapping_loss():
    lm = tiny_lm(None, vocab_size=50)
    T = 16
    tokens = np.random.default_rng(1).integers(0, 50, size=6 * T + 1)
    r = evaluate(lm, tokens, batch_size=4, context=T, stride=T, quiet=True)
    t = torch.as_tensor(tokens)
    x, y = t[:-1].view(-1, T), t[1:].view(-1, T)  # (6, T) windows side by side
    with torch.no_grad():
        expected = F.cross_entropy(lm.model(x).reshape(-1, 50), y.reshape(-1)).item()
    assert r.loss == pytest.approx(expected, rel=1e-5) and r.tokens == 6 * T


def test_chunked_loss_equals_unchunked_and_bounds_the_logits():
    lm = tiny_lm(None, vocab_size=50)
    tokens = np.random.default_rng(2).integers(0, 50, size=300)
    rows: list[int] = []
    hook = lm.model.lm_head.register_forward_hook(lambda m, args, out: rows.append(out.reshape(-1, 50).shape[0]))
    chunked = evaluate(lm, tokens, batch_size=8, context=16, stride=4, chunk=7, quiet=True)
    assert rows and max(rows) <= 7  # the head never sees more than `chunk` positions at once
    rows.clear()
    whole = evaluate(lm, tokens, batch_size=8, context=16, stride=4, chunk=0, quiet=True)
    hook.remove()
    assert max(rows) == 8 * 16  # unchunked: the whole (B, T) batch of logits
    assert chunked.loss == pytest.approx(whole.loss, rel=1e-6) and chunked.tokens == whole.tokens


def test_mean_loss_is_the_training_loops_evaluation():
    """The training loop's val/train loss: every target of fixed windows, in eval mode (no dropout), and the
    module left in the mode it was in."""
    from lmlab.data.tokens import eval_windows
    from lmlab.infer.evaluate import mean_loss

    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="gpt2", vocab_size=40, context_length=16, d_model=32, n_layers=2,
                                    n_heads=2, dropout=0.5)).train()
    data = np.random.default_rng(3).integers(0, 40, size=500).astype(np.uint16)
    windows = eval_windows(data, 16, 4, 3, seed=0)
    got = mean_loss(model, data, windows, 16, torch.device("cpu"))
    assert model.training
    starts = np.concatenate(windows)
    x = torch.as_tensor(np.stack([data[s:s + 16] for s in starts]).astype(np.int64))
    y = torch.as_tensor(np.stack([data[s + 1:s + 17] for s in starts]).astype(np.int64))
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(x).reshape(-1, 40), y.reshape(-1)).item()
    assert got == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Bad values: one line, exit 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "^batch_size must be an integer of at least 1, got 0$"),
    (dict(max_batches=-1), "^max_batches must be an integer of at least 0, got -1$"),
    (dict(context=-3), "^context must be"),
    (dict(stride=-1), "^stride must be"),
    (dict(chunk=-5), "^chunk must be"),
    (dict(context=17), "exceeds the model's context length 16"),
    (dict(context=8, stride=9), "--stride 9 is longer than the window"),
])
def test_bad_eval_values(kwargs, match):
    lm = tiny_lm(None, vocab_size=50)
    with pytest.raises(LmlabError, match=match):
        evaluate(lm, np.zeros(100, dtype=np.int64), quiet=True, **kwargs)


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory, char_data):
    from lmlab.checkpoint import save_checkpoint

    lm = tiny_lm(TokenData(char_data).tokenizer)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "c", lm.config, lm.model.state_dict(), lm.tokenizer)


@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--max-batches", "-1"], ["--stride", "-2"]])
def test_eval_cli_bad_values_in_one_line(char_ckpt, char_data, flags):
    r = subprocess.run(lmlab_cmd("eval", "--model", str(char_ckpt), "--data", str(char_data), "--device", "cpu",
                                 *flags), capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"lmlab: error: {flags[0]} must be an integer of at least "), r.stderr
