"""Chat templates: a conversation rendered the way the model expects to read it, and tokenized.

Templates are Jinja2, rendered the way HF transformers renders them (`apply_chat_template`): a sandboxed
environment with trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now` and a
`tojson` that does not escape HTML, with `messages`, `add_generation_prompt` and the special tokens as
variables. The rendered text is tokenized without adding BOS again (the template writes it if it wants it).
A model without a template (our own char or BPE models) gets a plain "User: ... / Assistant:" format.

Chat (lmlab.infer.chat), the server (lmlab.serve) and fine-tuning data (lmlab.training.sft) all render here, so a
model is trained on what it is later shown.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from lmlab.errors import LmlabError
from lmlab.tokenizer import BPETokenizer, Tokenizer

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_STOP = ("\nUser:", "\nSystem:")
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
    return encode_rendered(tokenizer, render_for(tokenizer, check_messages(messages)))


def render_for(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
               plain: bool = False) -> str:
    """The conversation rendered with the tokenizer's template (the plain one where it has none, or with `plain`);
    fine-tuning (lmlab.training.sft) renders its examples through here too, so it trains on what chat will show."""
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


def chat_stop(tok: Tokenizer, stop: tuple[str, ...]) -> tuple[str, ...]:
    """A reply's stop strings: a plain-format model (no template) would otherwise run on into the next turn."""
    return tuple(stop) + (() if tok.chat_template else PLAIN_STOP)
