"""lmlab eval: the tokenizer check, the strided sliding window against a direct computation, the chunked loss,
and bad values refused in one line."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from lmlab.api import LM
from lmlab.config import ModelConfig
from lmlab.data import TokenData, prepare
from lmlab.errors import LmlabError
from lmlab.evaluate import tokens_for
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
