"""Fine-tuning (lmlab.training.sft, lmlab.training.finetune): the reply mask against transformers' own
chat-template tokenization, the loss over reply tokens only, the plain format, full and LoRA fine-tunes through the
pretraining loop (the frozen base bit-identical), a SIGKILL mid-fine-tune resumed to the uninterrupted run's
adapter bit for bit, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lmlab
from lmlab.cli import main
from lmlab.config import LoRAConfig, SFTConfig
from lmlab.errors import LmlabError
from lmlab.training.finetune import FineTune, finetune, finetune_config
from lmlab.training.loop import loss_of, train_job
from lmlab.training.metrics import read_events
from lmlab.training.sft import IGNORE, SFTData, encode_example, to_messages
from tests.conftest import lmlab_cmd, subprocess_env
from tests.test_lora import CHATML, chat_tok, llama_base, one_thread  # noqa: F401 (fixtures)

transformers = pytest.importorskip("transformers")

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "The sum is 5."}, {"role": "user", "content": "And 4 and 4?"},
                {"role": "assistant", "content": "8"}]


def write_records(path: Path, n: int) -> Path:
    """n instruction records, Alpaca-style with a chat-style one every fourth, as JSONL."""
    lines = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        if i % 4 == 3:
            rec = {"messages": [{"role": "user", "content": f"Add {a} and {b}."},
                                {"role": "assistant", "content": f"{a + b}"}]}
        else:
            rec = {"instruction": f"Add {a} and {b}.", "output": f"The sum is {a + b}."}
            if i % 5 == 0:
                rec["input"] = "Answer in words."
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def _hf_ids(tok, messages, gen: bool) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_reply_mask_matches_transformers_chat_template_tokens(chat_tok):  # noqa: F811
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=chat_tok.tok)
    hf.chat_template = CHATML
    ids, labels = encode_example(chat_tok, CONVERSATION, SFTConfig(), "test")
    assert ids == _hf_ids(hf, CONVERSATION, gen=False)
    want = [IGNORE] * len(ids)
    for i in (2, 4):  # each assistant turn: from the generation prompt's end through its end-of-turn
        start, end = len(_hf_ids(hf, CONVERSATION[:i], gen=True)), len(_hf_ids(hf, CONVERSATION[:i + 1], gen=False))
        want[start:end] = ids[start:end]
    assert labels == want
    assert hf.decode([t for t in labels if t != IGNORE]) == "The sum is 5.<|im_end|>\n8<|im_end|>\n"
    _, all_labels = encode_example(chat_tok, CONVERSATION, SFTConfig(train_on_prompt=True), "test")
    assert all_labels == ids


def test_plain_format_for_a_model_without_a_template(char_run):
    tok = lmlab.load(char_run, device="cpu").tokenizer
    messages = to_messages({"instruction": "Say hi", "output": "hello"}, "test")
    ids, labels = encode_example(tok, messages, SFTConfig(), "test")
    assert tok.decode(ids) == "User: Say hi\nAssistant: hello\n"
    assert tok.decode([t for t in labels if t != IGNORE]) == " hello\n"


def test_the_loss_covers_reply_tokens_only_and_padding_never(tmp_path, chat_tok, llama_base):  # noqa: F811
    data = SFTData(write_records(tmp_path / "d.jsonl", 12), chat_tok, SFTConfig(), chat_tok.vocab_size, 128,
                   batch_size=4, grad_accum=1, seed=0, sampling="random")
    x, y = data.batch(0, 0, torch.device("cpu"))
    im_start = chat_tok.tok.token_to_id("<|im_start|>")
    for row_y in y.tolist():
        kept = [t for t in row_y if t != IGNORE]
        assert kept and im_start not in kept and chat_tok.decode(kept).endswith("<|im_end|>\n")
        assert chat_tok.decode(kept).startswith(("The sum is", *"0123456789"))
    model = lmlab.load(llama_base, device="cpu").model
    logits = model(x)
    per_token = [-torch.log_softmax(logits[b, t], -1)[y[b, t]] for b in range(len(y)) for t in range(y.shape[1])
                 if y[b, t] != IGNORE]
    torch.testing.assert_close(loss_of(model, x, y, torch.autocast("cpu", enabled=False)),
                               torch.stack(per_token).mean(), rtol=1e-6, atol=1e-6)
    assert F.cross_entropy(logits.flatten(0, 1), y.flatten()).isfinite()


def test_lora_finetune_learns_and_keeps_the_base_bit_identical(tmp_path, llama_base):  # noqa: F811
    data = write_records(tmp_path / "d.jsonl", 40)
    job = FineTune(llama_base, data, SFTConfig(), LoRAConfig(r=4, targets=("all-linear",)))
    before = {k: v.clone() for k, v in job.base.model.state_dict().items()}
    tc = finetune_config(dict(max_steps=32, lr=3e-2, batch_size=8, eval_interval=16, eval_batches=1, device="cpu"),
                         lora=True)
    result = train_job(job, job.base.config, tc, tmp_path / "run", quiet=True)
    after = job.base.model.state_dict()
    for key, value in before.items():  # the LoRA layers hold the base under .base.: the same tensors, untouched
        assert torch.equal(after[key.replace(".weight", ".base.weight") if key not in after else key], value), key
    assert any(v.abs().max() > 0 for k, v in after.items() if ".lora_B." in k)
    evals = [e["val_loss"] for e in read_events(tmp_path / "run" / "metrics.jsonl") if e["event"] == "eval"]
    assert evals[-1] < evals[0] - 0.3 and result.best_val == min(evals)
    saved = load_file(str(tmp_path / "run" / "last" / "adapter.safetensors"))
    assert saved and all(".lora_" in k for k in saved)  # the checkpoint holds the adapter alone


def test_full_finetune_saves_a_whole_model(tmp_path, llama_base):  # noqa: F811
    data = write_records(tmp_path / "d.jsonl", 20)
    tc = finetune_config(dict(max_steps=4, batch_size=4, eval_interval=4, eval_batches=1, device="cpu"), lora=False)
    finetune(llama_base, data, tmp_path / "run", tc, dropout={"dropout": 0.1}, quiet=True)
    lm = lmlab.load(tmp_path / "run", device="cpu")
    base = lmlab.load(llama_base, device="cpu")
    assert lm.config.dropout_resid == 0.1 and lm.tokenizer.chat_template == CHATML
    assert not torch.equal(lm.model.blocks[0].mlp.up.weight, base.model.blocks[0].mlp.up.weight)


def _finetune_cmd(base, data, run, *extra):
    return lmlab_cmd("finetune", "--model", str(base), "--data", str(data), "--out", str(run), "--lora",
                     "--lora-dropout", "0.1", "--max-steps", "12", "--eval-interval", "3", "--eval-batches", "1",
                     "--batch-size", "4", "--log-interval", "1", "--device", "cpu", "--quiet", *extra)


def test_a_killed_finetune_resumes_to_the_uninterrupted_adapter_bit_for_bit(tmp_path, llama_base):  # noqa: F811
    data = write_records(tmp_path / "d.jsonl", 30)
    env = subprocess_env()
    assert main(_finetune_cmd(llama_base, data, tmp_path / "full")[3:]) == 0  # the reference, in this process
    run = tmp_path / "killed"
    proc = subprocess.Popen(_finetune_cmd(llama_base, data, run), env=env, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and '"step": 6' in metrics.read_text()):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert proc.returncode != 0, "the run ended before it could be killed"
    r = subprocess.run(_finetune_cmd(llama_base, data, run, "--resume"), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    want, got = (load_file(str(d / "last" / "adapter.safetensors")) for d in (tmp_path / "full", run))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    def losses(d):
        return [(e["step"], e.get("loss"), e.get("val_loss")) for e in read_events(d / "metrics.jsonl")
                if e["event"] in ("train", "eval")]

    assert losses(run) == losses(tmp_path / "full")


BAD = [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instruction": "e", "output"\n', [],
     "line 3: not valid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', [], "line 2: 'output' is missing"),
    ('[{"instruction": "a", "output": "b"}, {"messages": [{"role": "user", "content": "x"}]}]', [],
     "record 2: the messages must end with an assistant reply"),
    ('{"instruction": "a", "output": 3}\n', [], "line 1: 'output' is not a string"),
    (None, ["--lora", "--lora-targets", "q,qq"], "no LoRA target module 'qq'.*valid names: q, k, v, o, gate, up"),
    (None, ["--lora", "--lora-r", "0"], "error: --lora-r must be a positive integer \\(the LoRA rank\\), got 0"),
    (None, ["--lora", "--lora-r", "100"], "LoRA rank 100 is larger than the layer"),
    (None, ["--lora-r", "4"], "--lora-r sets up LoRA; add --lora"),
    (None, ["--val-fraction", "1"], "--val-fraction must be in \\(0, 1\\)"),
]


@pytest.mark.parametrize("text, flags, message", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, llama_base, capsys, text, flags, message):  # noqa: F811
    import re

    data = tmp_path / ("d.json" if text and text.startswith("[") else "d.jsonl")
    if text is None:
        write_records(data, 10)
    else:
        data.write_text(text)
    code = main(["finetune", "--model", str(llama_base), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--device", "cpu", "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lmlab: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_epoch_sampling_visits_each_training_example_once_per_epoch(tmp_path, chat_tok):  # noqa: F811
    data = SFTData(write_records(tmp_path / "d.jsonl", 30), chat_tok, SFTConfig(), chat_tok.vocab_size, 128,
                   batch_size=3, grad_accum=2, seed=5, sampling="epoch")
    n = len(data.train)  # 27: nine steps of 2 x 3 draw 54 indices, two epochs
    drawn = [i for step in range(9) for micro in range(2) for i in data.indices(step, micro)]
    assert sorted(drawn[:n]) == list(range(n)) and sorted(drawn[n:2 * n]) == list(range(n))
    assert drawn[:n] != drawn[n:2 * n]  # each epoch its own order


def test_a_full_finetune_extended_on_resume_equals_one_run_and_other_data_is_refused(tmp_path, llama_base):  # noqa: F811
    data = write_records(tmp_path / "d.jsonl", 20)
    flags = ["--model", str(llama_base), "--data", str(data), "--eval-interval", "2", "--eval-batches", "1",
             "--batch-size", "4", "--dropout", "0.1", "--device", "cpu", "--quiet"]
    assert main(["finetune", *flags, "--out", str(tmp_path / "once"), "--max-steps", "4"]) == 0
    assert main(["finetune", *flags, "--out", str(tmp_path / "twice"), "--max-steps", "2"]) == 0
    resume = [a for a in flags if a not in ("--dropout", "0.1")]  # a resumed run keeps its own dropout
    assert main(["finetune", *resume, "--out", str(tmp_path / "twice"), "--max-steps", "4", "--resume"]) == 0
    want, got = (load_file(str(tmp_path / r / "last" / "model.safetensors")) for r in ("once", "twice"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    other = write_records(tmp_path / "other.jsonl", 21)
    with pytest.raises(LmlabError, match="cannot resume: the data_file differ"):
        finetune(llama_base, other, tmp_path / "twice", resume=True, quiet=True)
