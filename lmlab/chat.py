"""Chat: render a conversation with the model's own chat template, generate the reply, keep the history.

Templates are Jinja2, rendered the way HF transformers renders them (`apply_chat_template`): a sandboxed
environment with trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now` and a
`tojson` that does not escape HTML, with `messages`, `add_generation_prompt` and the special tokens as
variables. The rendered text is tokenized without adding BOS again (the template writes it if it wants it).
A model without a template (our own char or BPE models) gets a plain "User: ... / Assistant:" format.

A conversation that outgrows the model's context loses its oldest turns, never its system messages (nor what
the template writes before the turns); the interactive loop (`repl`) says so once, and reports an error inside
one turn without ending the conversation.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache

from lmlab.errors import LmlabError
from lmlab.generate import SamplingConfig, generate_text
from lmlab.tokenizer import BPETokenizer, Tokenizer

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_STOP = ("\nUser:", "\nSystem:")
# Chat's own sampling defaults, over SamplingConfig's: instruct models answer better colder (SmolLM2's model card
# suggests temperature 0.2 and top_p 0.9), and an answer often runs past generate's 256 tokens.
CHAT_SAMPLING = SamplingConfig(temperature=0.3, top_p=0.9, max_new_tokens=512)
ROLES = ("system", "user", "assistant")
HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D), /help; Ctrl-C stops a reply"


@lru_cache(maxsize=8)
def compile_template(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LmlabError(f"the model's chat template does not parse ({e}); pass a plain prompt instead") from None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **special: str) -> str:
    """The conversation as the model expects to read it."""
    import jinja2

    try:
        return compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **special)
    except jinja2.exceptions.TemplateError as e:
        raise LmlabError(f"the chat template refused these messages: {e}") from None


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise LmlabError('messages must be a JSON list of {"role": ..., "content": ...} objects')
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LmlabError(f"message {i} needs a role ({', '.join(ROLES)}) and a string content, got {m!r}")
    return messages


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """Render with the tokenizer's template (or the plain one) and tokenize without adding BOS twice."""
    return encode_rendered(tokenizer, render_for(tokenizer, check_messages(messages)))


def render_for(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
               plain: bool = False) -> str:
    """The conversation rendered with the tokenizer's template (the plain one where it has none, or with `plain`);
    fine-tuning (lmlab.sft) renders its examples through here too, so it trains on what chat will show."""
    template = PLAIN_TEMPLATE if plain else tokenizer.chat_template or PLAIN_TEMPLATE
    special = {}
    if isinstance(tokenizer, BPETokenizer):
        special = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    return render_chat(template, messages, add_generation_prompt, **special)


def encode_rendered(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of rendered chat text: special tokens as the template wrote them, no BOS added on top."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.tok.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text)


def read_messages(source: str) -> list[dict]:
    """A JSON list of {"role", "content"} messages from a file, or from stdin when `source` is "-"."""
    from lmlab.utils import read_json

    if source != "-":
        return check_messages(read_json(source, "messages file", expect=list))
    try:
        return check_messages(json.loads(sys.stdin.read()))
    except ValueError as e:
        if isinstance(e, LmlabError):
            raise
        raise LmlabError(f"messages on stdin are not valid JSON ({e})") from None


def chat_stop(tok: Tokenizer, stop: tuple[str, ...]) -> tuple[str, ...]:
    """A reply's stop strings: a plain-format model (no template) would otherwise run on into the next turn."""
    return tuple(stop) + (() if tok.chat_template else PLAIN_STOP)


def fit_conversation(tok: Tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], list[int]]:
    """(the messages kept, their prompt ids): the oldest turns dropped, one user message and the replies after it
    at a time, until the prompt takes at most `budget` tokens. The leading system messages and the newest
    message always stay, and so does what the template writes before the turns (it is rendered anew)."""
    head = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    kept = list(messages)
    ids = chat_prompt_ids(tok, kept)
    while len(ids) > budget and len(kept) - head > 1:
        end = head + 1
        while end < len(kept) - 1 and kept[end]["role"] != "user":
            end += 1
        del kept[head:end]
        ids = chat_prompt_ids(tok, kept)
    return kept, ids


def answer(lm, messages: list[dict], s: SamplingConfig = CHAT_SAMPLING,
           on_text: Callable[[str], None] | None = None) -> tuple[str, list[dict]]:
    """(the assistant's next message, the messages it was written for): the conversation's oldest turns are
    left out when the prompt would leave the reply less than min(max_new_tokens, context / 2) tokens of room."""
    tok = lm.tokenizer
    if tok is None:
        raise LmlabError(f"{lm.source} has no tokenizer, so it cannot chat")
    s = s.replace(stop=chat_stop(tok, s.stop))
    C = lm.config.context_length
    kept, ids = fit_conversation(tok, check_messages(messages), C - min(s.max_new_tokens, C // 2))
    callback = (lambda row, delta: on_text(delta)) if on_text is not None else None
    return generate_text(lm.model, tok, [ids], s, callback)[0], kept


def forgotten_notice(lm) -> str:
    return (f"(the conversation outgrew the model's {lm.config.context_length}-token context: its oldest turns "
            "are forgotten from here on)")


def reply(lm, messages: list[dict], s: SamplingConfig = CHAT_SAMPLING, on_text: Callable[[str], None] | None = None,
          notify: Callable[[str], None] | None = None) -> str:
    """The assistant's next message for this conversation; `notify` hears if old turns had to be left out."""
    text, kept = answer(lm, messages, s, on_text)
    if notify is not None and len(kept) < len(messages):
        notify(forgotten_notice(lm))
    return text


class ChatSession:
    """A multi-turn conversation: the history grows by each user message and the model's reply, and loses its
    oldest turns when it outgrows the context. `notify` is told so, once per conversation."""

    def __init__(self, lm, s: SamplingConfig = CHAT_SAMPLING, system: str | None = None,
                 notify: Callable[[str], None] | None = None) -> None:
        self.lm, self.s, self.system, self.notify = lm, s, system, notify
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.told = False

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        self.messages.append({"role": "user", "content": text})
        try:
            reply_text, kept = answer(self.lm, self.messages, self.s, on_text)
        except BaseException:
            self.messages.pop()  # an interrupted or failed turn leaves no half turn behind
            raise
        if len(kept) < len(self.messages):
            self.messages = kept
            if not self.told and self.notify is not None:
                self.notify(forgotten_notice(self.lm))
            self.told = True
        self.messages.append({"role": "assistant", "content": reply_text.strip()})
        return reply_text


def repl(session: ChatSession, read: Callable[[str], str] = input) -> int:
    """The interactive loop: replies stream to stdout, everything else goes to stderr. Returns the exit code."""
    print(f"chatting with {session.lm.source} ({HELP})", file=sys.stderr)
    while True:
        try:
            text = read("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        command = text.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
        elif command == "/help":
            print(HELP, file=sys.stderr)
        elif command:
            turn(session, text)


def turn(session: ChatSession, text: str) -> None:
    """One exchange. Ctrl-C stops the reply; an error is reported and the conversation goes on without the turn."""
    print("bot> ", end="", flush=True)
    try:
        session.ask(text, on_text=lambda d: print(d, end="", flush=True))
        print()
    except KeyboardInterrupt:
        print("\n(reply stopped)", file=sys.stderr)
    except Exception as e:  # bad input (LmlabError) or a failure such as running out of memory mid-reply
        print(flush=True)
        detail = str(e) if isinstance(e, LmlabError) else f"{type(e).__name__}: {e}"
        print(f"lmlab: error: {detail} (the conversation goes on)", file=sys.stderr)
