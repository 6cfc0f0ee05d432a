"""LoRA layers (lmlab.lora) against plain torch and HF PEFT: the forward is W + (alpha/r) B A computed by hand; at
B = 0 the logits are the base's exactly; an adapter exported for PEFT and loaded by `peft.PeftModel` onto
transformers' model of our HF export gives our logits; merged exports equal the adapter on the base; adapters
for another base, unknown targets and impossible ranks are refused in one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import lmlab
from lmlab.checkpoint import save_model
from lmlab.config import LoRAConfig, ModelConfig
from lmlab.errors import LmlabError
from lmlab.lora import LoRALinear, apply_lora, merge_lora
from lmlab.model import Transformer
from lmlab.tokenizer import BPETokenizer
from tests.conftest import corpus_text

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a second one stalls every op when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def chat_tok() -> BPETokenizer:
    """A small byte-level BPE with ChatML's special tokens and template (as SmolLM2-Instruct has)."""
    tok = BPETokenizer.train([corpus_text(20_000) + " 0123456789 sum is The Add and"], vocab_size=300)
    tok.tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return BPETokenizer(tok.tok, eos_token="<|im_end|>", chat_template=CHATML)


def tiny_llama(vocab: int, seed: int = 0, **over) -> Transformer:
    torch.manual_seed(seed)
    shape = dict(context_length=128, d_model=32, d_ff=64, n_layers=2, n_heads=4, n_kv_heads=2)
    cfg = ModelConfig(family="llama", vocab_size=vocab, **{**shape, **over})
    return Transformer(cfg).eval()


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory, chat_tok):
    """A random tiny Llama-family model with the chat tokenizer, saved as an lmlab checkpoint."""
    return save_model(tmp_path_factory.mktemp("base") / "ckpt", tiny_llama(chat_tok.vocab_size), chat_tok)


def _randomize_lora(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_lora_linear_is_w_plus_scaled_ba_on_its_slices():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24, bias=True)
    layer = LoRALinear(copy.deepcopy(base), {"q": (0, 8), "v": (16, 24)}, LoRAConfig(r=4, alpha=12.0))
    _randomize_lora(layer)
    x = torch.randn(3, 5, 16)
    w = base.weight.detach().clone()
    w[0:8] += (12.0 / 4) * layer.lora_B["q"] @ layer.lora_A["q"]  # rows 8..16 (k) untouched
    w[16:24] += (12.0 / 4) * layer.lora_B["v"] @ layer.lora_A["v"]
    torch.testing.assert_close(layer(x), F.linear(x, w, base.bias), rtol=0, atol=1e-6)


def test_lora_model_equals_hand_merged_weights_and_zero_b_equals_base():
    model = tiny_llama(97)
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        base_logits = model(x)
    reference = copy.deepcopy(model)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, targets=("all-linear",)))
    with torch.no_grad():
        assert torch.equal(model(x), base_logits)  # B = 0 at init: exactly the base
    _randomize_lora(model)
    cfg, s = model.cfg, 8.0 / 4
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    with torch.no_grad():
        for ref_block, block in zip(reference.blocks, model.blocks, strict=True):
            for name, (a, b) in rows.items():
                lora = block.attn.qkv
                ref_block.attn.qkv.weight[a:b] += s * lora.lora_B[name] @ lora.lora_A[name]
            for path, name in (("attn.proj", "o"), ("mlp.gate", "gate"), ("mlp.up", "up"), ("mlp.down", "down")):
                lora = block.get_submodule(path)
                ref_block.get_submodule(path).weight += s * lora.lora_B[name] @ lora.lora_A[name]
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)
        assert (model(x) - base_logits).abs().max() > 1e-2  # the adapter does change the model


def test_only_adapter_parameters_train():
    model = tiny_llama(97)
    apply_lora(model, LoRAConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-1] for n in trainable} == {"q", "v"}  # the default targets


@pytest.mark.parametrize("cfg, message", [
    (dict(targets=("q_porj",)), "no LoRA target module 'q_porj'.*did you mean 'q_proj'.*valid names: q, k, v"),
    (dict(targets=("c_attn",)), "no LoRA target module 'c_attn' in a llama-family model"),
    (dict(r=17), "LoRA rank 17 is larger than the layer it adapts .*at most 16"),  # v: 2 kv heads x 8 rows
])
def test_bad_lora_settings_are_refused(cfg, message):
    with pytest.raises(LmlabError, match=message):
        apply_lora(tiny_llama(97), LoRAConfig(**cfg))


@pytest.mark.parametrize("value", [0, -1, True])
def test_rank_below_one_is_refused(value):
    with pytest.raises(LmlabError, match=r"^r must be a positive integer \(the LoRA rank\)") as e:
        LoRAConfig(r=value)
    assert e.value.field == "r"


def test_merge_folds_the_adapter_into_plain_linears():
    model = tiny_llama(97)
    apply_lora(model, LoRAConfig(r=2, targets=("q", "k", "v", "down")))
    _randomize_lora(model)
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Adapters out and in, against HF transformers + peft. A short LoRA fine-tune with a large lr gives an adapter
# far from zero, so a wrongly mapped or scaled tensor would show in the logits.

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, llama_base):
    from lmlab.training.finetune import finetune, finetune_config
    from tests.test_finetune import write_records

    data = write_records(tmp_path_factory.mktemp("data") / "train.jsonl", 24)
    run = tmp_path_factory.mktemp("runs") / "lora"
    tc = finetune_config(dict(max_steps=3, lr=0.05, warmup_steps=0, batch_size=4, eval_interval=3, eval_batches=1,
                              device="cpu"), lora=True)
    finetune(llama_base, data, run, tc, lora=LoRAConfig(r=4, alpha=8.0, targets=("q", "v", "o", "down")), quiet=True)
    return run


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_peft_loads_our_adapter_onto_the_hf_export_of_the_base(tmp_path, llama_base, lora_run):
    from lmlab.cli import main

    assert main(["export", str(llama_base), "--format", "hf", "--out", str(tmp_path / "base_hf")]) == 0
    assert main(["export", str(lora_run), "--format", "peft", "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"] and config["r"] == 4
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf").float().eval()
    ids = list(range(3, 40))
    base = _hf_logits(hf, ids)
    with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    theirs = _hf_logits(with_adapter, ids)
    ours = lmlab.load(lora_run, device="cpu").model(torch.tensor([ids]))
    assert (theirs - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(ours.detach(), theirs, rtol=0, atol=1e-5)
    # and a PEFT adapter comes back in: the same model again
    back = lmlab.load(llama_base, device="cpu", adapter=tmp_path / "adapter").model(torch.tensor([ids]))
    torch.testing.assert_close(back.detach(), theirs, rtol=0, atol=1e-5)


def test_merged_export_equals_the_adapter_on_the_base(tmp_path, llama_base, lora_run):
    from lmlab.cli import main
    from lmlab.weights.adapter import apply_adapter

    assert main(["export", str(lora_run), "--format", "hf", "--merge", "--out", str(tmp_path / "merged")]) == 0
    unmerged = lmlab.load(llama_base, device="cpu").model
    apply_adapter(unmerged, lora_run, merge=False)  # LoRA layers kept, computing base + B A on the fly
    assert any(isinstance(m, LoRALinear) for m in unmerged.modules())
    ids = list(range(5, 50))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(hf, ids), unmerged(torch.tensor([ids])), rtol=0, atol=1e-5)


def test_export_of_a_lora_run_needs_merge_or_peft(tmp_path, lora_run, capsys):
    from lmlab.cli import main

    assert main(["export", str(lora_run), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a LoRA adapter: fold it into its base with --merge" in err


def test_an_adapter_for_another_base_is_refused_in_one_line(tmp_path, chat_tok, lora_run, capsys):
    from lmlab.cli import main

    other = save_model(tmp_path / "other", tiny_llama(chat_tok.vocab_size, d_model=48, n_heads=4), chat_tok)
    with pytest.raises(LmlabError, match=r"made for a different base: blocks.0.attn.\w+.lora_A.\w+ has shape "
                                         r"\(4, 32\), this model needs \(4, 48\)"):
        lmlab.load(other, device="cpu", adapter=lora_run)
    assert main(["generate", "--model", str(other), "--adapter", str(lora_run), "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error: adapter") and err.count("\n") == 1


def test_gguf_lora_applied_to_the_base_gguf_equals_the_merged_gguf(tmp_path, llama_base, lora_run):
    """What llama.cpp computes with --lora, W + (alpha / r) B A on each named base tensor, read from the files by
    the gguf package: the base's GGUF plus the adapter's GGUF must give the merged model's GGUF, q/k rows included
    (they are permuted for llama.cpp in the base, so B's rows must be too)."""
    import numpy as np
    from gguf import GGUFReader

    from lmlab.cli import main

    assert main(["export", str(llama_base), "--format", "gguf", "--out", str(tmp_path / "base.gguf")]) == 0
    assert main(["export", str(lora_run), "--format", "gguf", "--merge", "--out", str(tmp_path / "merged.gguf")]) == 0
    assert main(["export", str(lora_run), "--format", "gguf-lora", "--out", str(tmp_path / "lora.gguf")]) == 0

    def tensors(name):
        r = GGUFReader(tmp_path / name)
        return r, {t.name: np.array(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
                   for t in r.tensors}

    reader, lora = tensors("lora.gguf")
    (_, base), (_, merged) = tensors("base.gguf"), tensors("merged.gguf")
    assert reader.fields["general.type"].contents() == "adapter" and reader.fields["adapter.type"].contents() == "lora"
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    adapted = {n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")}
    assert adapted == {f"blk.{i}.{t}.weight" for i in range(2) for t in ("attn_q", "attn_v", "attn_output", "ffn_down")}
    for name, w in base.items():
        want = merged[name]
        if name in adapted:
            a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
            w = w + alpha / a.shape[0] * b @ a
        np.testing.assert_allclose(w, want, rtol=0, atol=1e-5, err_msg=name)


def test_peft_loads_a_gpt2_adapter_on_the_fused_c_attn(tmp_path, char_run):
    """GPT-2 fuses q, k and v in HF too (Conv1D c_attn): the default target is the whole of it, as PEFT's is."""
    from lmlab.cli import main
    from lmlab.training.finetune import finetune, finetune_config

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": f"{w} {w}"}) + "\n"
                            for w in ("hello", "there", "speak", "hear", "the", "king", "lord", "good")))
    tc = finetune_config(dict(max_steps=2, lr=0.05, warmup_steps=0, batch_size=4, eval_interval=2, eval_batches=1,
                              device="cpu"), lora=True)
    finetune(char_run, data, tmp_path / "run", tc, lora=LoRAConfig(r=2, targets=("all-linear",)), quiet=True)
    assert main(["export", str(char_run), "--format", "hf", "--out", str(tmp_path / "base_hf")]) == 0
    trained = tmp_path / "run" / "last"  # after the steps (best/ may be step 0's, the base itself)
    assert main(["export", str(trained), "--format", "peft", "--out", str(tmp_path / "adapter")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf").float().eval()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = list(range(1, 30))
    ours = lmlab.load(trained, device="cpu").model(torch.tensor([ids])).detach()
    assert (ours - lmlab.load(char_run, device="cpu").model(torch.tensor([ids]))).abs().max() > 1e-2
    torch.testing.assert_close(ours, _hf_logits(theirs, ids), rtol=0, atol=1e-5)


def test_an_adapter_on_a_quantized_base_stays_beside_the_packed_weights(llama_base, lora_run):
    """A packed base (QuantLinear) cannot take the update into its codes: the LoRA layers wrap it, and compute what
    the float base with the same (dequantized) weights and the adapter computes, at decode (1 row) and prefill."""
    from lmlab.quant import QuantLinear, quantize_model
    from lmlab.weights.adapter import apply_adapter

    packed = lmlab.load(llama_base, device="cpu").model
    quantize_model(packed, "int8")
    float_twin = copy.deepcopy(packed)
    for name, m in list(float_twin.named_modules()):
        if isinstance(m, QuantLinear) and name.startswith("blocks."):
            parent, _, attr = name.rpartition(".")
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=False)
            linear.weight.data = m.dequantize()
            setattr(float_twin.get_submodule(parent), attr, linear)
    bare = copy.deepcopy(packed)
    apply_adapter(packed, lora_run)
    apply_adapter(float_twin, lora_run, merge=False)
    layers = [m for m in packed.modules() if isinstance(m, LoRALinear)]
    assert layers and all(isinstance(m.base, QuantLinear) for m in layers)
    for ids in ([7], list(range(3, 40))):
        x = torch.tensor([ids])
        with torch.no_grad():
            torch.testing.assert_close(packed(x), float_twin(x), rtol=0, atol=2e-2)  # bf16 inside the int8 kernel
            assert (packed(x) - bare(x)).abs().max() > 0.2  # far above that: the adapter is applied
