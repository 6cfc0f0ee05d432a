"""Weight-only quantization (lmlab/quant.py): layers against plain float torch, the real model's greedy output,
the memory of a packed GGUF load, and bad input.

Error bounds, relative Frobenius error of a layer's output against F.linear with the original float weight:
int8 per channel of N(0, 1) weights: step max|w|/127 ~ 4/127, noise ~ 0.9% of the weights; int4 groups of 32:
step (max - min)/15 ~ 4/15, noise ~ 8%. The bf16 activations add ~0.3%. Against the weight the layer itself
holds (`dequantize()`), only the bf16 activations remain.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.quant import QuantEmbedding, QuantLinear, quantize_model
from tests.conftest import lmlab_cmd, subprocess_env


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode,bound", [("int8", 0.015), ("int4", 0.11)])
def test_quant_linear_against_float(mode, bound):
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(96, 128, generator=g), torch.randn(96, generator=g), torch.randn(3, 5, 128, generator=g)
    layer = QuantLinear.from_float(w, b, mode, group_size=32)
    y = layer(x)
    assert y.shape == (3, 5, 96) and y.dtype == torch.float32
    assert _rel(y, F.linear(x, w, b)) < bound  # the quantization error itself
    assert _rel(y, F.linear(x, layer.dequantize(), b)) < 0.006  # the kernel computes with the weight it holds
    step = (w.abs().amax(1) / 127)[:, None] if mode == "int8" else None
    if step is not None:  # int8: every weight within half a step (+ bf16 rounding of the scale)
        assert ((layer.dequantize() - w).abs() <= step * 0.5 + w.abs() * 2 ** -8).all()


def test_int4_from_codes_is_exact():
    """from_int4 holds codes * scale + offset: exact up to the bf16 rounding of scale and zero."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.uint8)
    scale, offset = torch.rand(32, 2, generator=g) * 0.1, torch.randn(32, 2, generator=g) * 0.1
    layer = QuantLinear.from_int4(codes, scale, offset)
    s16, z16 = scale.bfloat16().float(), (offset + 8 * scale).bfloat16().float()
    expected = ((codes.float() - 8).view(32, 2, 32) * s16[..., None] + z16[..., None]).view(32, 64)
    torch.testing.assert_close(layer.dequantize(), expected, rtol=0, atol=1e-6)


def test_int4_unpacking_matches_the_kernel():
    """unpack_int4 reads the kernel's private nibble layout (found by probing it); the weight it gives equals
    the one the kernel computes with, read through the kernel itself (an identity matrix in float32)."""
    from lmlab.quant import int4_layout

    assert int4_layout() is not None  # on this machine's build the layout is of the probed form
    layer = QuantLinear.from_float(torch.randn(96, 256, generator=torch.Generator().manual_seed(3)), None, "int4")
    through_kernel = torch._weight_int4pack_mm_for_cpu(torch.eye(256), layer.weight, 32,
                                                       layer.scales_zeros.float()).t()
    torch.testing.assert_close(layer.dequantize(), through_kernel, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_many_rows_take_the_float_gemm_path(mode, monkeypatch):
    """From GEMM_ROWS rows on (prefill, eval) the layer unpacks and runs a float GEMM: the same weight, so the
    same result as the int kernel up to its bf16 activations. (The AVX2 switch, set here: an AVX-512 machine's
    kernels take every row count.)"""
    import lmlab.quant as quant

    monkeypatch.setattr(quant, "GEMM_ROWS", quant.gemm_rows_for("AVX2"))
    GEMM_ROWS = quant.GEMM_ROWS
    g = torch.Generator().manual_seed(4)
    layer = QuantLinear.from_float(torch.randn(64, 128, generator=g), torch.randn(64, generator=g), mode)
    rows = GEMM_ROWS[mode]
    x = torch.randn(rows, 128, generator=g)
    gemm, kernel = layer(x), torch.cat([layer(x[i:i + 8]) for i in range(0, rows, 8)])
    assert _rel(kernel, gemm) < 0.006
    torch.testing.assert_close(gemm, F.linear(x, layer.dequantize(), layer.bias))


@pytest.mark.parametrize("mode,exact_top", [("int8", 0), ("int4", 0), ("int8", 32)])
def test_a_decoding_step_of_many_rows_gives_each_row_its_solo_result(mode, exact_top, monkeypatch):
    """A decoding step, one token per sequence, takes the int kernel however many rows it has, so a row's output
    is bit for bit what it is alone (a server's seeded request gives the same text beside others); a head's
    recomputed top logits too. (With the AVX2 switch, the one a step could cross.)"""
    import lmlab.quant as quant

    monkeypatch.setattr(quant, "GEMM_ROWS", quant.gemm_rows_for("AVX2"))
    GEMM_ROWS = quant.GEMM_ROWS

    g = torch.Generator().manual_seed(5)
    layer = QuantLinear.from_float(torch.randn(64, 128, generator=g), None, mode)
    layer.exact_top = exact_top
    x = torch.randn(GEMM_ROWS[mode] + 3, 1, 128, generator=g)  # (B, T=1, C): more rows than the GEMM switch
    together = layer(x)
    for i in (0, 1, x.shape[0] - 1):
        assert torch.equal(together[i], layer(x[i:i + 1])[0])


def test_the_gemm_switch_follows_the_cpus_vector_extensions():
    """AVX-512 builds of the kernels take every row count; others switch to the float GEMM at the AVX2
    crossovers; and this machine's table is the one for what torch dispatches to here."""
    import lmlab.quant as quant

    assert quant.gemm_rows_for("AVX512") == {"int8": quant.NEVER, "int4": quant.NEVER}
    assert quant.gemm_rows_for("AVX2") == quant.gemm_rows_for("DEFAULT") == {"int8": 80, "int4": 64}
    assert quant.GEMM_ROWS == quant.gemm_rows_for(torch.backends.cpu.get_cpu_capability())
    assert "_weight_int4pack_mm_for_cpu" in quant.kernel_description("int4")


def test_int8_head_top_logits_are_those_of_its_weights():
    """The kernel returns bf16 logits (0.125 apart near 20), so near-ties flip greedy choices; an output head
    recomputes its top logits, and then every row's argmax and top-20 values are float32's on the same int8
    weights (`F.linear` of the dequantized matrix). The kernel alone, on the same rows, must miss somewhere,
    or this test would prove nothing."""
    from lmlab.quant import EXACT_TOP

    g = torch.Generator().manual_seed(6)
    head = QuantLinear.from_float(torch.randn(4096, 64, generator=g), None, "int8")
    x = torch.randn(256, 1, 64, generator=g) * 3  # logits of magnitude ~20-40, as a language model's
    ref = F.linear(x, head.dequantize())[:, 0]
    top_values, top_ids = ref.topk(20, dim=-1)
    kernel_only = head(x)[:, 0]
    head.exact_top = EXACT_TOP
    ours = head(x)[:, 0]
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(ours.gather(1, top_ids), top_values, rtol=0, atol=1e-4)
    assert (kernel_only.gather(1, top_ids) - top_values).abs().max() > 0.05


def test_quantized_models_recompute_their_head_top():
    """quantize_model and the packed GGUF loader both switch the int8 head's recomputation on."""
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer
    from lmlab.quant import EXACT_TOP

    model = Transformer(ModelConfig(family="llama", vocab_size=96, context_length=32, d_model=64, n_layers=1,
                                    n_heads=4, n_kv_heads=2, d_ff=128))
    for mode in ("int8", "int4"):
        assert quantize_model(copy.deepcopy(model), mode).lm_head.exact_top == EXACT_TOP


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quant_embedding_rows(mode):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(50, 64, generator=g)
    emb = QuantEmbedding.from_float(w, mode, group_size=32)
    idx = torch.tensor([[0, 7, 49], [3, 3, 1]])
    out = emb(idx)
    torch.testing.assert_close(out, emb.dequantize()[idx])
    assert _rel(out, F.embedding(idx, w)) < (0.015 if mode == "int8" else 0.11)


def test_quantize_model_logits_close_and_smaller():
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer
    from lmlab.quant import weight_bytes

    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="llama", vocab_size=96, context_length=32, d_model=64, n_layers=2,
                                    n_heads=4, n_kv_heads=2, d_ff=128)).eval()
    idx = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        ref = model(idx)
        before = weight_bytes(model)
        quantize_model(model, "int8")
        assert _rel(model(idx), ref) < 0.02
    assert weight_bytes(model) < before / 3.5
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_quantized_gate_up_gives_the_same_numbers_and_state_dict(mode):
    """A quantized SwiGLU's gate and up as one packed matmul (what lmlab.load does to a quantized model): the
    unfused model's logits bit for bit, for a decoding step, a short prompt (the kernel) and a long one (the
    float GEMM), and the unfused state dict, which loads back either way."""
    from lmlab.config import ModelConfig
    from lmlab.fuse import FusedSwiGLU, fuse_gate_up
    from lmlab.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=96, context_length=128, d_model=128, n_layers=2, n_heads=4,
                      n_kv_heads=2, d_ff=192)  # d_ff: three of the int4 kernel's 64-row blocks on x86
    plain = quantize_model(Transformer(cfg), mode)
    fused = copy.deepcopy(plain)
    assert fuse_gate_up(fused) == 2 and isinstance(fused.blocks[1].mlp, FusedSwiGLU)
    assert fused.blocks[0].mlp.gate_up.out_features == 2 * cfg.d_ff
    with torch.no_grad():
        for idx in (torch.randint(0, 96, (3, 1)), torch.randint(0, 96, (2, 9)), torch.randint(0, 96, (1, 100))):
            assert torch.equal(fused(idx), plain(idx))
    a, b = plain.state_dict(), fused.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    back = copy.deepcopy(plain)
    back.load_state_dict(b)
    fused.load_state_dict(a)
    idx = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        assert torch.equal(fused(idx), back(idx))


def test_bad_mode_group_and_device():
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer
    from lmlab.quant import check_device, check_mode

    with pytest.raises(LmlabError, match="unknown quantization 'int3'"):
        check_mode("int3")
    with pytest.raises(LmlabError, match="group size must be 32, 64, 128 or 256"):
        check_mode("int4", 48)
    with pytest.raises(LmlabError, match="runs on the CPU and on CUDA GPUs, not on mps"):
        check_device(torch.device("mps"))
    model = Transformer(ModelConfig(family="llama", vocab_size=96, context_length=32, d_model=48, n_layers=1,
                                    n_heads=4, n_kv_heads=2, d_ff=96))
    with pytest.raises(LmlabError, match="multiple of the group size"):
        quantize_model(model, "int4", 32)


def test_cli_bad_quantize_is_one_line(char_run):
    for flags, message in ((["--quantize", "int3"], "unknown quantization 'int3'"),
                           (["--quantize", "int4", "--group-size", "64"], "multiple of the group size")):
        r = subprocess.run(lmlab_cmd("generate", "--model", str(char_run), "--prompt", "ab", "--device", "cpu",
                                     *flags), capture_output=True, text=True, env=subprocess_env())
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_eval_reports_quantized_weights(char_run, tmp_path):
    import lmlab

    tok = lmlab.load(char_run, device="cpu").tokenizer
    (tmp_path / "t.txt").write_text(tok.decode(list(range(tok.vocab_size))) * 20)  # every character it knows
    r = subprocess.run(lmlab_cmd("eval", "--model", str(char_run), "--data", str(tmp_path / "t.txt"),
                                 "--device", "cpu", "--quantize", "int8"),
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert "weights int8" in r.stdout and "perplexity" in r.stdout


# ---------------------------------------------------------------------------------------------------------
# the named model (SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding)


@pytest.fixture(scope="module")
def smollm2_path():
    from tests.test_gguf import _fetch_or_skip

    return _fetch_or_skip("smollm2-135m-instruct")


def test_int8_greedy_equals_float32(smollm2_path):
    """16 greedy tokens of int8 SmolLM2 equal float32's (the file dequantized). The prompt is fixed; on another
    prompt a near-tie (a top-2 margin of 0.05 logits, against int8's ~0.7 max logit error) can flip a token."""
    import lmlab
    from lmlab.infer.generate import SamplingConfig, generate_ids
    from lmlab.templates import chat_prompt_ids

    s = SamplingConfig(max_new_tokens=16, temperature=0)
    out = {}
    for mode in ("off", "int8"):
        lm = lmlab.load(smollm2_path, device="cpu", quantize=mode)
        ids = chat_prompt_ids(lm.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
        out[mode] = [t[0] for t in generate_ids(lm.model, [ids], s, eos_id=None)]
    assert out["int8"] == out["off"] and len(out["off"]) == 16


RSS_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
import lmlab
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
base = hwm()
lm = lmlab.load(sys.argv[1], device="cpu")
print(base, hwm())
"""


def test_packed_load_peak_rss_is_about_the_file(smollm2_path):
    """Loading the 94 MiB Q4_1 file packed, in a fresh process: the peak grows by at most the file's size +
    256 MiB (measured: 316 MiB; a float32 load grows by ~950 MiB). The overhead is mostly fixed: ~75 MiB of the
    GGUF reader's metadata objects, ~20 MiB of tokenizer, and one tensor's temporaries while it is split and
    packed (the 28 MiB Q8_0 embedding: its codes, then their per-row requantization)."""
    size = smollm2_path.stat().st_size
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(smollm2_path)], capture_output=True, text=True,
                       env=subprocess_env())
    assert r.returncode == 0, r.stderr
    base, peak = map(int, r.stdout.split())
    print(f"\nfile {size / 2**20:.0f} MiB; peak RSS grew by {(peak - base) / 2**20:.0f} MiB while loading")
    assert peak - base <= size + 256 * 2**20


def test_compiled_decoding_gives_the_same_tokens():
    """compile_decoding swaps in a torch.compile'd step after the prefill: the same greedy tokens as eager, on a
    quantized model (the int kernels inside the compiled graph)."""
    from lmlab.config import ModelConfig
    from lmlab.infer.generate import SamplingConfig, compile_decoding, generate_ids
    from lmlab.model import Transformer

    torch.manual_seed(0)
    model = quantize_model(Transformer(ModelConfig(family="llama", vocab_size=64, context_length=512, d_model=64,
                                                   n_layers=1, n_heads=4, n_kv_heads=2, d_ff=128)), "int4")
    s = SamplingConfig(max_new_tokens=12, temperature=0)
    eager = list(generate_ids(model, [[1, 2, 3]], s))
    compile_decoding(model)
    assert list(generate_ids(model, [[1, 2, 3]], s)) == eager


def test_torchao_weight_only_int8_the_cuda_path_within_bounds_on_cpu():
    """`--quantize int8` on CUDA goes through torchao's weight-only int8 (quantize_torchao); its arithmetic runs on
    CPU too, so here: every linear replaced, logits within the per-channel int8 bound of this file's other tests
    (0.05 of the logits' spread), the same greedy tokens on a peaked model."""
    pytest.importorskip("torchao")
    import copy

    from lmlab.config import ModelConfig
    from lmlab.model import Transformer
    from lmlab.quant import quantize_torchao

    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="llama", vocab_size=96, context_length=32, d_model=64, n_layers=2,
                                    n_heads=4, n_kv_heads=2, d_ff=128)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    q = quantize_torchao(copy.deepcopy(model), "int8")
    kinds = {type(m.weight).__name__ for m in q.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {"Int8Tensor"}, kinds  # every linear, the head included, holds torchao's int8 weights
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(x), q(x)
    assert (b - a).abs().max() < 0.05 * (a.max() - a.min())
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao's int4 kernels need a CUDA GPU")
def test_torchao_int4_on_cuda_within_bounds():
    import copy

    from lmlab.config import ModelConfig
    from lmlab.model import Transformer
    from lmlab.quant import quantize_model

    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="llama", vocab_size=256, context_length=32, d_model=256, n_layers=2,
                                    n_heads=4, n_kv_heads=2, d_ff=512)).to("cuda", torch.bfloat16).eval()
    q = quantize_model(copy.deepcopy(model), "int4", 64)
    x = torch.randint(0, 256, (2, 16), device="cuda")
    with torch.no_grad():
        a, b = model(x).float(), q(x).float()
    assert (b - a).abs().max() < 0.1 * (a.max() - a.min())
