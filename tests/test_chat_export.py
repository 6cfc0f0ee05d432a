"""Chat templates rendered as HF transformers renders them, the chat command, and export to HF directories
read back by transformers' AutoModelForCausalLM with the same logits."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

import lmlab
from lmlab.chat import ChatSession, render_chat
from lmlab.checkpoint import save_model
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.generate import SamplingConfig
from lmlab.model import Transformer
from lmlab.tokenizer import BPETokenizer, CharTokenizer
from lmlab.weights.hf import export_hf
from tests.conftest import corpus_text, lmlab_cmd, subprocess_env

transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is dropout?  "},
            {"role": "assistant", "content": "A regularizer."}, {"role": "user", "content": "Why does it work?"}]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([corpus_text(30_000)], vocab_size=300)


@pytest.mark.parametrize("template", [CHATML, LLAMA3], ids=["chatml", "llama3"])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_renders_like_transformers(bpe, template, gen):
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tok, bos_token="<|endoftext|>",
                                               eos_token="<|endoftext|>")
    ref.chat_template = template
    for messages in (MESSAGES, MESSAGES[1:2]):
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert render_chat(template, messages, add_generation_prompt=gen, bos_token="<|endoftext|>",
                           eos_token="<|endoftext|>") == expected


def test_template_errors_are_one_line():
    with pytest.raises(LmlabError, match="does not parse"):
        render_chat("{% for m in messages %}", MESSAGES)
    with pytest.raises(LmlabError, match="refused"):
        render_chat("{{ raise_exception('roles must alternate') }}", MESSAGES)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    torch.manual_seed(0)
    text = corpus_text(5_000) + "User: Assistant: System:"
    tok = CharTokenizer.train([text])
    cfg = ModelConfig(family="gpt2", vocab_size=tok.vocab_size, context_length=256, d_model=32, n_layers=1,
                      n_heads=2, bias=False)
    return save_model(tmp_path_factory.mktemp("char") / "ckpt", Transformer(cfg), tok)


def test_chat_session_keeps_history_and_resets(char_run):
    lm = lmlab.load(char_run, device="cpu")
    session = ChatSession(lm, SamplingConfig(max_new_tokens=10, temperature=0), system="Be kind.")
    first = session.ask("Hello")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[-1]["content"] == first.strip() and "\nUser:" not in first
    session.ask("Again")
    assert len(session.messages) == 5
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be kind."}]


def test_chat_command_prints_only_the_reply(char_run):
    args = ["chat", "--model", str(char_run), "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"]
    r = subprocess.run(lmlab_cmd(*args, "--prompt", "Hello there"), capture_output=True, text=True,
                       env=subprocess_env())
    assert r.returncode == 0, r.stderr
    lm = lmlab.load(char_run, device="cpu")
    expected = ChatSession(lm, SamplingConfig(max_new_tokens=12, temperature=0)).ask("Hello there").strip()
    assert r.stdout == expected + "\n"
    msgs = json.dumps([{"role": "user", "content": "Hello there"}])
    r2 = subprocess.run(lmlab_cmd(*args, "--messages", "-"), input=msgs, capture_output=True, text=True,
                        env=subprocess_env())
    assert r2.returncode == 0 and r2.stdout == r.stdout
    r3 = subprocess.run(lmlab_cmd(*args, "--messages", "-"), input="[{\"role\": \"robot\"}]", capture_output=True,
                        text=True, env=subprocess_env())
    assert r3.returncode == 2 and "role" in r3.stderr and r3.stderr.count("\n") == 1


def test_interactive_chat_commands(char_run):
    args = ["chat", "--model", str(char_run), "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"]
    r = subprocess.run(lmlab_cmd(*args), input="Hello\n/help\n/reset\nHello\n/exit\nnever read\n",
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    replies = [part.split("\n")[0] for part in r.stdout.split("bot> ")[1:]]
    assert len(replies) == 2 and replies[0] == replies[1]  # after /reset the same question, the same answer
    assert "/reset" in r.stderr and "(conversation reset)" in r.stderr
    eof = subprocess.run(lmlab_cmd(*args), input="Hello\n", capture_output=True, text=True, env=subprocess_env())
    assert eof.returncode == 0 and "Traceback" not in eof.stderr


# ---------------------------------------------------------------------------------------------------------
# Export to HF


def _logits_match(path, lm, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        return (hf(x).logits - lm.model(x)).abs().max().item()


def test_export_char_gpt2_without_biases(tmp_path, char_run):
    r = subprocess.run(lmlab_cmd("export", str(char_run), "--format", "hf", "--out", str(tmp_path / "hf")),
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    lm = lmlab.load(char_run, device="cpu")
    text = "First Citizen:\nBefore we proceed"
    ids = lm.tokenizer.encode(text)
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert ref_tok(text)["input_ids"] == ids and ref_tok.decode(ids) == text
    assert _logits_match(tmp_path / "hf", lm, ids) < 1e-5
    assert lmlab.load(tmp_path / "hf", device="cpu").model.num_params() >= lm.model.num_params()


@pytest.mark.parametrize("cfg", [
    dict(family="llama", n_kv_heads=2, tie_embeddings=False),
    dict(family="llama", n_kv_heads=4, tie_embeddings=True, qkv_bias=True),
    dict(family="gpt2", tie_embeddings=False),
], ids=["llama-gqa", "qwen2-style", "gpt2-untied"])
def test_export_bpe_models_round_trip(tmp_path, bpe, cfg):
    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=bpe.vocab_size, context_length=64, d_model=32, n_layers=2, n_heads=4,
                                    **cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    src = save_model(tmp_path / "ckpt", model, bpe)
    lm = lmlab.load(src, device="cpu")
    export_hf(lm.model, lm.tokenizer, tmp_path / "hf")
    ids = bpe.encode("Before we proceed any further, hear me speak.")
    assert _logits_match(tmp_path / "hf", lm, ids) < 1e-5
    back = lmlab.load(tmp_path / "hf", device="cpu")
    assert back.tokenizer.eos_id == bpe.eos_id and back.tokenizer.encode("hear me") == bpe.encode("hear me")


def test_export_refuses_what_hf_cannot_express(tmp_path, bpe):
    model = Transformer(ModelConfig(family="gpt2", pos="rope", vocab_size=bpe.vocab_size, context_length=16,
                                    d_model=16, n_layers=1, n_heads=2))
    with pytest.raises(LmlabError, match="mixes families"):
        export_hf(model, bpe, tmp_path / "x")


def test_export_into_an_old_export_replaces_it_whole(tmp_path, bpe):
    """An earlier sharded export left model-0000x-of-00002.safetensors and an index: the new export replaces the
    directory, so a load gets the new weights (transformers agrees) and no stale file remains."""
    torch.manual_seed(3)
    cfg = ModelConfig(family="llama", vocab_size=bpe.vocab_size, context_length=32, d_model=32, n_layers=2, n_heads=4)
    old, new = Transformer(cfg), Transformer(cfg)
    out = tmp_path / "hf"
    export_hf(old, bpe, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf.save_pretrained(out, max_shard_size="20KB")  # the old weights as shards + index
    stale = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in stale and any(n.startswith("model-00001-of-") for n in stale)
    (out / "model.safetensors").unlink()
    export_hf(new, bpe, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    ids = bpe.encode("Before we proceed any further")
    assert _logits_match(out, lmlab.load(out, device="cpu"), ids) < 1e-5
    with torch.no_grad():
        assert (lmlab.load(out, device="cpu").model(torch.tensor([ids])) - new(torch.tensor([ids]))).abs().max() < 1e-6
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary or set-aside directory left


def test_export_refuses_to_replace_a_directory_that_is_not_hf(tmp_path, bpe):
    (tmp_path / "notes.txt").write_text("mine")
    model = Transformer(ModelConfig(family="gpt2", vocab_size=bpe.vocab_size, context_length=16, d_model=16,
                                    n_layers=1, n_heads=2))
    with pytest.raises(LmlabError, match="not an HF checkpoint directory"):
        export_hf(model, bpe, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
