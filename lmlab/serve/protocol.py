"""The OpenAI HTTP API's shapes: request bodies (validated), the error object, and response objects.

Request fields follow the OpenAI API reference (https://platform.openai.com/docs/api-reference/chat/create and
/completions/create): their types are checked strictly ("0.5" is not a number), their ranges as OpenAI states
them, and a bad one is an `APIError` naming the field as `param`. lmlab's own sampling knobs come as extra
fields (`top_k`, `min_p`, `repetition_penalty`), as vLLM and llama.cpp's server take them; `top_k` -1 means off,
as there. Every setting ends in lmlab.config's SamplingConfig, where its meaning lives.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from lmlab.config import SamplingConfig
from lmlab.errors import LmlabError
from lmlab.infer.engine import Extras, Request
from lmlab.templates import ROLES, chat_prompt_ids, chat_stop
from lmlab.tokenizer import BYTE_DECODER, BPETokenizer, Tokenizer


class APIError(Exception):
    """An error answered as OpenAI's {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
API_NAMES = {"max_new_tokens": "max_tokens"}  # SamplingConfig's fields by their names in a request, where they differ


def validation_error(e: ValidationError | list) -> APIError:
    """Pydantic's (or FastAPI's) first complaint as one APIError naming the field."""
    errors = e.errors() if isinstance(e, ValidationError) else e
    first = errors[0] if errors else {"loc": (), "msg": "invalid request body", "type": ""}
    loc = []
    for part in first.get("loc", ()):  # the field's path, up to a union member's tag ('str', 'list[int]', ...)
        if isinstance(part, str) and (part in TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper()):
            break
        if part != "body":
            loc.append(str(part))
    if first.get("type") == "json_invalid":
        return APIError(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    param = ".".join(loc) or None
    where = f"{param}: " if param else "request body: "
    return APIError(f"{where}{first['msg']}" + ("" if param else " (send a JSON object)"), param)


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_Body):
    """The fields both endpoints share."""

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    top_k: int = 0  # lmlab's extras, as vLLM and llama.cpp take them
    min_p: float = 0.0
    repetition_penalty: float = 1.0


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: str
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(Sampling):
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # the legacy endpoint's default
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


def _check_range(body: Sampling, name: str, low: float, high: float, low_open: bool = False) -> None:
    value = getattr(body, name)
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise APIError(f"{name} must be in {interval}, got {value}", name)


def check_sampling(body: Sampling, max_batch: int, vocab_size: int) -> None:
    """Ranges as OpenAI documents them (temperature 0 to 2, penalties -2 to 2, logit_bias -100 to 100, n at
    most the server's batch)."""
    for name, low, high, low_open in (("temperature", 0, 2, False), ("top_p", 0, 1, True), ("min_p", 0, 1, False),
                                      ("presence_penalty", -2, 2, False), ("frequency_penalty", -2, 2, False),
                                      ("repetition_penalty", 0, 10, True)):
        _check_range(body, name, low, high, low_open)
    if not 1 <= body.n <= max_batch:
        raise APIError(f"n must be in [1, {max_batch}] (this server's --max-batch), got {body.n}", "n")
    if body.top_k < -1:
        raise APIError(f"top_k must be >= 0 (0 or -1 turns it off), got {body.top_k}", "top_k")
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise APIError(f"seed must be in [0, 2**63), got {body.seed}", "seed")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > 16:
        raise APIError(f"stop takes at most 16 strings, got {len(stops)}", "stop")
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit() or not int(key) < vocab_size:
            raise APIError(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}", "logit_bias")
        if not -100 <= value <= 100:
            raise APIError(f"logit_bias values must be in [-100, 100], got {value}", "logit_bias")


def sampling_config(body: Sampling, max_tokens: int | None, prompt_len: int, context: int) -> SamplingConfig:
    """The request's SamplingConfig. max_tokens defaults to the room the context leaves; a larger one is honoured
    as everywhere in lmlab (the engine slides the row's window at the context's end), so finish_reason "length"
    always means max_tokens was reached."""
    room = context - prompt_len
    if room < 1:
        raise APIError(f"the prompt has {prompt_len} tokens, but this server's context is {context} tokens "
                       f"(prompt and completion together); shorten the prompt", "messages"
                       if isinstance(body, ChatRequest) else "prompt", code="context_length_exceeded")
    if max_tokens is not None and max_tokens < 1:
        name = "max_completion_tokens" if isinstance(body, ChatRequest) and body.max_tokens is None else "max_tokens"
        raise APIError(f"{name} must be >= 1, got {max_tokens}", name)
    try:
        return SamplingConfig(max_new_tokens=max_tokens or room, temperature=float(body.temperature),
                              top_k=max(body.top_k, 0), top_p=float(body.top_p), min_p=float(body.min_p),
                              repetition_penalty=float(body.repetition_penalty), seed=body.seed,
                              stop=body.stop or ())
    except LmlabError as e:
        param = API_NAMES.get(e.field, e.field)  # the request's name for the setting; None where it names none
        raise APIError(str(e if param is None else e.naming(param)), param) from None


def extras(body: Sampling) -> Extras:
    bias = tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items())
    return Extras(float(body.presence_penalty), float(body.frequency_penalty), bias)


def chat_messages(body: ChatRequest) -> list[dict]:
    """The messages as lmlab.infer.chat renders them: text parts joined, OpenAI's "developer" role as "system"."""
    if not body.messages:
        raise APIError("messages must hold at least one message", "messages")
    out = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ROLES:
            raise APIError(f"messages.{i}.role must be one of {', '.join(ROLES)} or developer, got {m.role!r}",
                           f"messages.{i}.role")
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        out.append({"role": role, "content": content})
    return out


def chat_jobs(body: ChatRequest, tok: Tokenizer, context: int) -> list[tuple[list[int], SamplingConfig]]:
    try:
        ids = chat_prompt_ids(tok, chat_messages(body))
    except LmlabError as e:
        raise APIError(str(e), "messages") from None
    s = sampling_config(body, body.max_completion_tokens if body.max_tokens is None else body.max_tokens,
                        len(ids), context)
    return [(ids, s.replace(stop=chat_stop(tok, s.stop)))]


def completion_jobs(body: CompletionRequest, tok: Tokenizer, context: int,
                    vocab_size: int) -> list[tuple[list[int], SamplingConfig]]:
    if body.echo or body.suffix:
        raise APIError("echo and suffix are not supported by this server", "echo" if body.echo else "suffix")
    p = body.prompt
    prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not prompts:
        raise APIError("prompt must not be empty", "prompt")
    out = []
    for prompt in prompts:
        try:
            ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        except LmlabError as e:
            raise APIError(str(e), "prompt") from None
        if not ids:
            raise APIError("the prompt encodes to no tokens; give some text", "prompt")
        if not all(0 <= i < vocab_size for i in ids):
            raise APIError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
        out.append((ids, sampling_config(body, body.max_tokens, len(ids), context)))
    return out


def make_jobs(body: Sampling, pairs: list[tuple[list[int], SamplingConfig]], logprobs: int | None,
              emit_for, tok: Tokenizer) -> list[Request]:
    """One engine Request per prompt; `emit_for(i)` is the callback of the i-th. A chat reply's leading
    whitespace is not part of its text, as `lmlab chat` shows it (lmlab.infer.chat)."""
    return [Request(ids, s, emit_for(i), n=body.n, eos=frozenset(tok.eos_ids), extras=extras(body),
                    logprobs=logprobs, trim_start=isinstance(body, ChatRequest)) for i, (ids, s) in enumerate(pairs)]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


# -- logprobs ------------------------------------------------------------------------------------------------

def token_text(tok: Tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text and its bytes (a byte-level token may hold part of a UTF-8 character: its text then shows
    U+FFFD, its bytes are exact)."""
    text = tok.decode([token])
    if isinstance(tok, BPETokenizer):
        piece = tok.tok.id_to_token(token) or ""
        if piece and all(ch in BYTE_DECODER for ch in piece):
            return text, [BYTE_DECODER[ch] for ch in piece]
    return text, list(text.encode("utf-8"))


def chat_logprobs(tok: Tokenizer, tokens: list) -> dict:
    def entry(token: int, lp: float) -> dict:
        text, raw = token_text(tok, token)
        return {"token": text, "logprob": lp, "bytes": raw}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
                        for t, lp, top in tokens]}


def completion_logprobs(tok: Tokenizer, tokens: list, start: int) -> dict:
    """The legacy shape: parallel lists, text_offset counting from `start` characters into the completion."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start
    for t, lp, top in tokens:
        text = token_text(tok, t)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({token_text(tok, a)[0]: alp for a, alp in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out
