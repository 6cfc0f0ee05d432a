"""Chat: templates rendered as HF transformers renders them, the session and its history, the chat command
(one-shot and the interactive loop on stdin), and conversations that outgrow the context."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

import lmlab
from lmlab.checkpoint import save_model
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.infer.chat import ChatSession
from lmlab.infer.generate import SamplingConfig
from lmlab.model import Transformer
from lmlab.templates import chat_prompt_ids, render_chat
from lmlab.tokenizer import BPETokenizer, CharTokenizer
from tests.conftest import corpus_text, lmlab_cmd, subprocess_env

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
    transformers = pytest.importorskip("transformers")
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


def _shared(a: list[int], b: list[int]) -> int:
    """How many tokens `b` takes from `a`'s start, its last token aside (it always runs, for its logits)."""
    n = 0
    while n < min(len(a), len(b) - 1) and a[n] == b[n]:
        n += 1
    return n


def test_the_next_turn_prefills_only_what_follows_the_last_prompt(char_run, capsys):
    """`lmlab chat`'s loop over an eager model: the model keeps its last engine's staging row between calls (its
    batch cache given back), so turn 2 prefills only what follows turn 1's prompt, in a new engine when it needs
    more slots, and a repeated first turn after /reset reuses all but its last token in the kept engine; each
    reply is the one a fresh engine gives. Changed weights void the cache."""
    from lmlab.infer.chat import repl, reply
    from lmlab.infer.engine import _ENGINES

    lm = lmlab.load(char_run, device="cpu")
    s = SamplingConfig(max_new_tokens=20, temperature=0)
    session = ChatSession(lm, s, system="Be kind.")
    lines, seen, turns = iter(["Hello there", "What is your name", "/reset", "Hello there", "/exit"]), [], []

    def read(_: str) -> str:  # called before each line: after each turn, the engine the model kept
        e = _ENGINES.get(lm.model)
        seen.append(None if e is None else (e, e.cached_tokens, list(e.staged_ids), e.main))
        if session.messages[-1]["role"] == "assistant" and (not turns or session.messages != turns[-1]):
            turns.append(list(session.messages))
        return next(lines)

    assert repl(session, read) == 0
    capsys.readouterr()
    tok = lm.tokenizer
    prompts = [chat_prompt_ids(tok, t[:-1]) for t in turns]  # what each reply was written for, rendered anew
    assert len(turns) == 3 and turns[2] == turns[0]
    (e1, c1, ids1, main1), (e2, c2, ids2, _), _, (e3, c3, ids3, _) = seen[1:5]
    assert (ids1, ids2, ids3) == (prompts[0], prompts[1], prompts[0]) and main1 == []  # one row kept
    assert e2 is not e1 and c2 == _shared(prompts[0], prompts[1]) > 0  # more slots: a new engine, the prefix moved
    assert len(prompts[1]) - c2 > 20  # turn 1's reply and turn 2's question are all it prefilled
    assert e3 is e2 and c3 - c2 == len(prompts[0]) - 1  # after /reset: the first prompt again, but one token
    for t in turns:
        _ENGINES.pop(lm.model)  # a fresh engine: no prompt cache
        assert reply(lm, t[:-1], s).strip() == t[-1]["content"]
    with torch.no_grad():
        lm.model.wte.weight.mul_(2)  # as an optimizer step would: the kept keys and values are not the model's
    kept, changed = _ENGINES[lm.model], reply(lm, turns[-1][:-1], s)
    assert _ENGINES[lm.model] is not kept and _ENGINES[lm.model].cached_tokens == 0  # a new engine, nothing reused
    assert reply(lm, turns[-1][:-1], s) == changed and _ENGINES[lm.model].cached_tokens == len(prompts[0]) - 1


def test_a_model_no_longer_used_is_freed_with_the_engine_it_kept():
    """The registry of kept engines holds models weakly, and a parked eager engine lets go of its model."""
    import gc
    import weakref

    from lmlab.infer.engine import _ENGINES
    from lmlab.infer.generate import generate_ids

    model = Transformer(ModelConfig(family="llama", vocab_size=64, context_length=64, d_model=32, n_layers=1,
                                    n_heads=2)).eval()
    list(generate_ids(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=3, temperature=0)))
    assert model in _ENGINES
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


# ---------------------------------------------------------------------------------------------------------
# A conversation longer than the context: a model with a 64-token context, like runs/baby.

TURNS = ["Hello there", "What is your name", "Speak, speak", "Who is the king", "Hear me speak", "Good night"]


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    torch.manual_seed(0)
    tok = CharTokenizer.train([corpus_text(5_000) + "User: Assistant: System:\nBe kind.", *TURNS])  # any corpus
    cfg = ModelConfig(family="gpt2", vocab_size=tok.vocab_size, context_length=64, d_model=32, n_layers=1,
                      n_heads=2)
    model = Transformer(cfg)
    with torch.no_grad():  # sharper logits, so replies are not one repeated character
        model.lm_head.weight.mul_(30)
    return save_model(tmp_path_factory.mktemp("baby") / "ckpt", model, tok)


def test_session_forgets_the_oldest_turns_and_says_so_once(baby):
    lm = lmlab.load(baby, device="cpu")
    s = SamplingConfig(max_new_tokens=12, temperature=0)
    notices: list[str] = []
    session = ChatSession(lm, s, system="Be kind.", notify=notices.append)
    for k, text in enumerate(TURNS):
        session.ask(text)
        m = session.messages
        assert m[0] == {"role": "system", "content": "Be kind."}
        assert [x["role"] for x in m[1:]] == ["user", "assistant"] * ((len(m) - 1) // 2)
        asked = [x["content"] for x in m[1:] if x["role"] == "user"]
        assert asked == TURNS[k + 1 - len(asked):k + 1]  # the newest turns, in order
        assert len(chat_prompt_ids(lm.tokenizer, m[:-1])) <= 64 - 12  # what the reply was written for fits
    assert len(asked) < len(TURNS) and len(notices) == 1 and "64-token context" in notices[0]


def test_an_error_in_one_turn_leaves_the_conversation(baby):
    lm = lmlab.load(baby, device="cpu")
    session = ChatSession(lm, SamplingConfig(max_new_tokens=8, temperature=0))
    session.ask("Hello there")
    before = list(session.messages)
    with pytest.raises(LmlabError, match="not in this model"):
        session.ask("Ça va? ☃")
    assert session.messages == before
    session.ask("Good night")
    assert len(session.messages) >= 2 and session.messages[-2]["content"] == "Good night"


def test_interactive_chat_outgrows_the_context_and_goes_on(baby):
    """The real REPL on stdin: a 64-token model, six turns and one bad one. Before, the second turn exited
    with code 2 and the conversation was lost."""
    lines = TURNS[:3] + ["Ça va? ☃"] + TURNS[3:] + ["/exit"]
    r = subprocess.run(lmlab_cmd("chat", "--model", str(baby), "--max-new-tokens", "20", "--temperature", "0",
                                 "--device", "cpu"), input="\n".join(lines) + "\n", capture_output=True, text=True,
                       env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout.count("bot> ") == len(TURNS) + 1
    assert r.stderr.count("64-token context") == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("lmlab: error:")]
    assert len(errors) == 1 and "'Ç'" in errors[0] and "goes on" in errors[0]


def test_one_shot_messages_longer_than_the_context(baby, tmp_path):
    history = []
    for text in TURNS:
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": "Speak, speak."}]
    f = tmp_path / "m.json"
    f.write_text(json.dumps(history[:-1]))
    r = subprocess.run(lmlab_cmd("chat", "--model", str(baby), "--max-new-tokens", "10", "--temperature", "0",
                                 "--device", "cpu", "--messages", str(f)), capture_output=True, text=True,
                       env=subprocess_env())
    assert r.returncode == 0 and "64-token context" in r.stderr, r.stderr
