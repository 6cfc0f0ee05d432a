"""Text generation: pure logit filters, a prefill/decode engine over the static KV cache, and text streaming.

The filters are small pure functions on logits (B, V), applied in the order HF transformers applies its
logits processors (`GenerationMixin._get_logits_processor`): repetition penalty, then temperature, top-k,
top-p (Holtzman et al. 2020), min-p (Nguyen et al. 2024). Greedy decoding (temperature 0) applies the
penalty alone and takes the argmax, as HF does with do_sample=False.

The engine prefills the prompt, then feeds one token per step into the static cache. Prompts of different
lengths are left-padded and each row's padding is masked out. When the text fills the context, the window
slides by half a context: the cache is prefilled again from the last C/2 tokens (see `generate_ids`), so the
context is re-run once every C/2 tokens, never per token.

The text layer (`TextStream`) decodes incrementally and looks for stop strings only in new text, so its work
per token does not grow with the length of the output.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.model import Transformer
from lmlab.tokenizer import Tokenizer


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token, and when to stop. Validated once; errors name the parameter.

    The one home of the sampling defaults: `LM.generate`, `LM.stream` and the `lmlab generate` flags all start
    from these. temperature 0.8 is nanoGPT's sample.py default (the model's distribution, slightly sharpened, so
    small models garble fewer words); the truncation filters are off, as in HF's GenerationConfig. Chat starts
    from its own documented variant, `lmlab.infer.chat.CHAT_SAMPLING`."""

    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off (CTRL, Keskar et al. 2019)
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    truncate: bool = False  # cut a too-long prompt from the left instead of refusing it

    def __post_init__(self) -> None:
        def number(name: str, value, kind=(int, float)):
            if isinstance(value, bool) or not isinstance(value, kind):
                raise LmlabError(f"{name} must be a number, got {value!r}")

        number("max_new_tokens", self.max_new_tokens, int)
        if self.max_new_tokens < 0:
            raise LmlabError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        number("temperature", self.temperature)
        if not self.temperature >= 0:
            raise LmlabError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        number("top_k", self.top_k, int)
        if self.top_k < 0:
            raise LmlabError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise LmlabError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise LmlabError(f"min_p must be in [0, 1] (0 turns it off), got {self.min_p}")
        number("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0:
            raise LmlabError(f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}")
        if self.seed is not None:
            number("seed", self.seed, int)
            if not 0 <= self.seed < 2**63:
                raise LmlabError(f"seed must be in [0, 2**63), got {self.seed}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise LmlabError(f"stop must be a string or a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(s for s in stop if s))

    def replace(self, **settings) -> SamplingConfig:
        """These settings with some changed (validated again); an unknown name is an error naming the nearest."""
        from lmlab.errors import closest

        names = [f.name for f in fields(self)]
        for name in settings:
            if name not in names:
                raise LmlabError(f"unknown sampling setting {name!r}{closest(name, names)}; "
                                 f"known: {', '.join(names)}")
        return replace(self, **settings)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---------------------------------------------------------------------------------------------------------
# Pure filters on logits (B, V). Each returns new logits with removed tokens at -inf.

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely: positive logits divided by `penalty`, negative ones multiplied.
    `seen` is a (B, V) boolean mask of the tokens in each row's context."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits (ties with the k-th kept too, as HF does)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus sampling)."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)  # the low tail holding at most 1-p of the mass
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens whose probability is below p times the top token's probability."""
    probs = logits.softmax(dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, s: SamplingConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """All filters of `s`, in HF's order. Greedy settings apply the repetition penalty alone."""
    logits = logits.float()
    if s.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, s.repetition_penalty)
    if s.greedy:
        return logits
    if s.temperature != 1.0:
        logits = apply_temperature(logits, s.temperature)
    if s.top_k:
        logits = apply_top_k(logits, s.top_k)
    if s.top_p < 1.0:
        logits = apply_top_p(logits, s.top_p)
    if s.min_p:
        logits = apply_min_p(logits, s.min_p)
    return logits


def select(logits: torch.Tensor, s: SamplingConfig, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): the argmax when greedy, else a draw from the filtered softmax."""
    logits = process_logits(logits, s, seen)
    if s.greedy:
        return logits.argmax(dim=-1)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------
# The engine: token ids in, token ids out.

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled decoding step
_GRAPHED: weakref.WeakSet = weakref.WeakSet()  # models whose step is a CUDA graph: their cache stays put


def compile_decoding(model: Transformer, mode: str | None = None) -> None:
    """Run `model`'s one-token decoding steps through torch.compile from now on (the prefill stays eager).

    A decoding step is dozens of small ops per layer, each paying PyTorch's dispatch (~3 us on a CPU core):
    about a third of a SmolLM2 step at batch 1. Inductor fuses the elementwise work into generated C++ and
    leaves the matmuls to their kernels. Compiling costs about a minute on a 2-core CPU for each new batch size
    and cache length (cache lengths are rounded up to a multiple of 256 to keep those few), so it pays for long
    generations and servers, not for one short reply.

    On CUDA (mode None there means "reduce-overhead") the step is also captured as a CUDA graph (gpt-fast's
    recipe): one replay launches the whole step, so the GPU no longer waits for Python between kernels. That
    needs the step as one graph (`fullgraph`: a graph break is an error, not a silent slowdown) and the static
    KV cache at fixed addresses, so such a model keeps its cache between generations (`_setup_cache`)."""
    if mode is None and model.wte.weight.device.type == "cuda":
        mode = "reduce-overhead"
    graphs = mode == "reduce-overhead"
    _COMPILED[model] = torch.compile(model, dynamic=False, mode=mode, fullgraph=graphs)
    if graphs:
        _GRAPHED.add(model)


def _setup_cache(model: Transformer, batch: int, slots: int) -> None:
    """A static cache of `slots` slots for `batch` rows: a new one, or for a CUDA-graphed model the one it already
    has when the shape matches. A graph replays at the addresses it was recorded with; a new cache per generation
    would make it re-record every time (and fall back to no graph after a few dozen). Stale entries are harmless:
    the prefill overwrites slots 0..L-1 and the mask hides every slot past the current one and before the offset."""
    cache = model.blocks[0].attn.cache
    if model in _GRAPHED and cache is not None and cache.k.shape[0] == batch and cache.k.shape[2] == slots:
        return
    model.setup_cache(batch, slots)


def _decode_step(model: Transformer, step_fn, ids: torch.Tensor, slot: torch.Tensor,
                 offset: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) for one token per row (B, 1) written at cache slot `slot` (1,), a device tensor:
    no host-to-device copy per token. A CUDA graph's outputs live in its pool until the next replay, so each
    replay is marked as a new step (the previous logits have been consumed by then)."""
    if model in _GRAPHED:
        torch.compiler.cudagraph_mark_step_begin()
    return step_fn(ids, slot, offset)[:, -1]


def _cache_slots(model: Transformer, needed: int) -> int:
    """Cache slots to allocate: what the generation needs, rounded up to a multiple of 256 when compiled."""
    if model not in _COMPILED:
        return needed
    return min(model.cfg.context_length, -(-needed // 256) * 256)


@dataclass
class Finished:
    """Why each row stopped: 'eos', 'stop' (a stop string), 'length' (max_new_tokens or the context)."""

    reasons: list[str | None]


def fit_prompts(prompts: list[list[int]], s: SamplingConfig, context_length: int) -> list[list[int]]:
    """Check prompt lengths against the context; cut from the left only when `s.truncate` asks for it."""
    if not prompts:
        raise LmlabError("no prompts given: pass a prompt string, or a non-empty list of them")
    out = []
    for i, ids in enumerate(prompts):
        if not ids:
            raise LmlabError(f"prompt {i} is empty (0 tokens) and this tokenizer adds no BOS; give some text")
        if len(ids) > context_length:
            if not s.truncate:
                raise LmlabError(f"prompt has {len(ids)} tokens but the model's context is {context_length}; "
                                 "shorten it or allow truncation (truncate=True, --truncate)")
            keep = context_length - min(s.max_new_tokens, context_length // 2)
            ids = ids[-keep:]
        out.append(list(ids))
    return out


def _seen_mask(prompts: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """(B, V) True for each token in a row's prompt: what the repetition penalty starts from."""
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        seen[b, p] = True
    return seen


def _prefill(model: Transformer, seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Run left-padded `seqs` into the cache from slot 0: (next-token logits (B, V), slots used, pads per row)."""
    device = model.wte.weight.device
    L = max(len(q) for q in seqs)
    idx = torch.tensor([[pad] * (L - len(q)) + q for q in seqs], device=device)  # left-padded (B, L)
    offset = torch.tensor([L - len(q) for q in seqs], device=device)
    logits = model(idx, torch.arange(L, device=device), offset, last_only=True)[:, -1]  # (B, V)
    return logits, L, offset


def _record(step: list[int], rows: list[list[int]], generated: list[list[int]], reasons: list[str | None],
            eos: set[int], should_stop: Callable[[int, list[int]], bool] | None) -> list[int | None]:
    """Append one step's tokens to every row and end the rows that hit an EOS id or a stop; the step as yielded
    (None for rows finished before it)."""
    out: list[int | None] = []
    for b, tok in enumerate(step):
        rows[b].append(tok)
        if reasons[b] is not None:
            out.append(None)
            continue
        generated[b].append(tok)
        out.append(tok)
        if tok in eos:
            reasons[b] = "eos"
        elif should_stop is not None and should_stop(b, generated[b]):
            reasons[b] = "stop"
    return out


@torch.inference_mode()
def generate_ids(model: Transformer, prompts: list[list[int]], s: SamplingConfig,
                 eos_id: int | Collection[int] | None = None,
                 should_stop: Callable[[int, list[int]], bool] | None = None) -> Iterator[list[int | None]]:
    """Yield, per decoding step, each row's new token (None for rows already finished).

    `eos_id` is one id or several (an instruct model's generation_config.json may list end-of-text and
    end-of-turn ids): a row ends at the first of them it produces, as HF generate does.

    `should_stop(row, generated_ids)` lets the caller end a row early (stop strings). The generator's
    return value (StopIteration.value) is a `Finished` with each row's reason.

    When the batch's cache of C slots is full, the window slides by half a context: every row's last C/2
    tokens are prefilled again into a fresh cache, positions restarting at 0, and decoding goes on in the
    freed half. Unlike nanoGPT's sample loop, which crops to the last C tokens and re-runs them for every new
    token, this re-runs C/2 tokens once every C/2 tokens: about one extra token of work per step, at the price
    of a context that shrinks to C/2 right after each slide and grows back to C."""
    prompts = fit_prompts(prompts, s, model.cfg.context_length)
    B, C = len(prompts), model.cfg.context_length
    device = model.wte.weight.device
    reasons: list[str | None] = [None] * B
    if s.max_new_tokens == 0:
        return Finished(["length"] * B)
    eos = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    pad = min(eos) if eos else 0
    S = _cache_slots(model, min(C, max(len(p) for p in prompts) + s.max_new_tokens))  # cache slots to hold
    seen = _seen_mask(prompts, model.cfg.vocab_size, device) if s.repetition_penalty != 1.0 else None
    generator = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
    rows = [list(p) for p in prompts]  # every row's tokens so far, prompt included
    generated: list[list[int]] = [[] for _ in range(B)]
    was_training = model.training
    model.eval()
    _setup_cache(model, B, S)
    step_fn = _COMPILED.get(model, model)
    try:
        logits, pos, offset = _prefill(model, rows, pad)  # pos: the cache slot the next token goes into
        slot = torch.tensor([pos], device=device)  # pos on the device, advanced there
        for step in range(s.max_new_tokens):
            next_ids = select(logits, s, generator, seen)  # (B,)
            yield _record(next_ids.tolist(), rows, generated, reasons, eos, should_stop)
            if all(r is not None for r in reasons) or step + 1 == s.max_new_tokens:
                break
            if seen is not None:
                seen[torch.arange(B, device=device), next_ids] = True
            if pos >= S:  # the context is full: slide the window by C/2 (a prefill of the last C/2 tokens)
                logits, pos, offset = _prefill(model, [r[-max(1, C // 2):] for r in rows], pad)
                slot = torch.tensor([pos], device=device)
                continue
            logits = _decode_step(model, step_fn, next_ids[:, None], slot, offset)
            slot += 1
            pos += 1
    finally:
        if model not in _GRAPHED:
            model.clear_cache()
        model.train(was_training)
    return Finished([r or "length" for r in reasons])


# ---------------------------------------------------------------------------------------------------------
# Text in, text out.

class TextStream:
    """Turns one row's growing token list into text deltas, with the same work for every token however long the
    text grows.

    Decoding is incremental, as text-generation-inference's and vLLM's detokenizers do it: each step decodes only
    the ids since the last character boundary, with the ids of the previous delta in front as context (a
    SentencePiece-style decoder drops a leading space at the start of a text), and keeps what that adds to the
    context's own text. A decode ending in U+FFFD (a UTF-8 character split over tokens) waits for the next token,
    as HF's TextStreamer holds back an unfinished word; after MAX_WAIT ids it is invalid UTF-8, and goes out as is.
    Stop strings are searched for in the new text and the longest stop's length - 1 characters before it, and a
    tail that could still grow into a stop string is held back, so no stop can start in text already handed out.
    """

    MAX_WAIT = 8  # ids: a UTF-8 character has at most 4 bytes, and every byte-level token holds one or more

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.reach = max(map(len, stop), default=1) - 1  # characters a stop can reach back before new text
        self.ids: list[int] = []  # the row's generated ids, as last fed: ids[:fed] are text
        self.fed = self.prefix = self.read = 0  # ids[prefix:read] decoded to context_text; ids[read:fed] are new
        self.context_text = ""
        self.pending, self.stopped = "", False  # text decoded but not yet handed out

    def feed(self, ids: list[int]) -> bool:
        """Take in the row's generated ids so far (EOS excluded); True once a stop string has appeared."""
        self.ids, self.fed = ids, len(ids)
        if not self.stopped and self.fed > self.read:
            self._add(self._decode(final=False))
        return self.stopped

    def _decode(self, final: bool) -> str:
        """The text ids[read:fed] add after the context, once it ends on a whole character (or `final`)."""
        text = self.tokenizer.decode(self.ids[self.prefix:self.fed])
        whole = len(text) > len(self.context_text) and not text.endswith("\ufffd")
        if not (whole or final or self.fed - self.read > self.MAX_WAIT):
            return ""
        new = text[len(self.context_text):]
        self.prefix, self.read = self.read, self.fed
        self.context_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        return new

    def _add(self, new: str) -> None:
        if not new:
            return
        start = max(0, len(self.pending) - self.reach)
        self.pending += new
        found = [at for at in (self.pending.find(stop, start) for stop in self.stop) if at >= 0]
        if found:
            self.pending, self.stopped = self.pending[:min(found)], True

    def take(self, final: bool = False) -> str:
        """The text not yet handed out that is safe to hand out now (all of it when `final`)."""
        if final and not self.stopped and self.fed > self.read:
            self._add(self._decode(final=True))
        hold = 0
        if not (final or self.stopped):
            hold = max((k for stop in self.stop for k in range(1, len(stop))
                        if self.pending.endswith(stop[:k])), default=0)
        delta, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return delta


def stream_text(model: Transformer, tokenizer: Tokenizer, prompts: list[str] | list[list[int]], s: SamplingConfig,
                eos_id: int | Collection[int] | None = None) -> Iterator[tuple[int, str]]:
    """Yield (row, text delta) as tokens arrive. EOS tokens (all of the tokenizer's, unless `eos_id` says
    otherwise) and stop strings are not part of the text.
    Prompts are strings, or token id lists already encoded (a chat template's output, say)."""
    eos_id = tokenizer.eos_ids if eos_id is None else eos_id
    streams = [TextStream(tokenizer, s.stop) for _ in prompts]
    ids = [p if isinstance(p, list) else tokenizer.encode(p) for p in prompts]
    engine = generate_ids(model, ids, s, eos_id,
                          should_stop=lambda row, generated: streams[row].feed(generated))
    for step in engine:
        for row, tok in enumerate(step):
            if tok is not None:
                delta = streams[row].take()
                if delta:
                    yield row, delta
    for row, stream in enumerate(streams):
        delta = stream.take(final=True)
        if delta:
            yield row, delta


def generate_text(model: Transformer, tokenizer: Tokenizer, prompts: list[str] | list[list[int]], s: SamplingConfig,
                  on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """Each prompt's continuation. `on_text(row, delta)` is called as text arrives (streaming)."""
    out = [""] * len(prompts)
    for row, delta in stream_text(model, tokenizer, prompts, s):
        out[row] += delta
        if on_text is not None:
            on_text(row, delta)
    return out
