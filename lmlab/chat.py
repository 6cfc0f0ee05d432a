"""Chat: render a conversation with the model's own chat template, generate the reply, keep the history.

Templates are Jinja2, rendered the way HF transformers renders them (`apply_chat_template`): a sandboxed
environment with trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now` and a
`tojson` that does not escape HTML, with `messages`, `add_generation_prompt` and the special tokens as
variables. The rendered text is tokenized without adding BOS again (the template writes it if it wants it).
A model without a template (our own char or BPE models) gets a plain "User: ... / Assistant:" format.
"""

from __future__ import annotations

import json
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
    template = tokenizer.chat_template or PLAIN_TEMPLATE
    special = {}
    if isinstance(tokenizer, BPETokenizer):
        special = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    text = render_chat(template, check_messages(messages), **special)
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.tok.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text)


def reply(lm, messages: list[dict], s: SamplingConfig = CHAT_SAMPLING,
          on_text: Callable[[str], None] | None = None) -> str:
    """The assistant's next message for this conversation."""
    tok = lm.tokenizer
    if tok is None:
        raise LmlabError(f"{lm.source} has no tokenizer, so it cannot chat")
    if not tok.chat_template:  # a plain-format model would otherwise run on into the next "User:" turn
        s = s.replace(stop=tuple(s.stop) + PLAIN_STOP)
    ids = chat_prompt_ids(tok, messages)
    callback = (lambda row, delta: on_text(delta)) if on_text is not None else None
    return generate_text(lm.model, tok, [ids], s, callback)[0]


class ChatSession:
    """A multi-turn conversation: the history grows by each user message and the model's reply."""

    def __init__(self, lm, s: SamplingConfig = CHAT_SAMPLING, system: str | None = None) -> None:
        self.lm, self.s, self.system = lm, s, system
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        self.messages.append({"role": "user", "content": text})
        try:
            answer = reply(self.lm, self.messages, self.s, on_text)
        except BaseException:
            self.messages.pop()  # an interrupted or failed turn leaves no half turn behind
            raise
        self.messages.append({"role": "assistant", "content": answer.strip()})
        return answer
