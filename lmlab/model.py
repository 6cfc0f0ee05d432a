"""One decoder-only Transformer for the GPT-2 and Llama families, chosen by `ModelConfig` fields.

References: GPT-2 (Radford et al. 2019; nanoGPT's model.py), Llama (Touvron et al. 2023; HF
`modeling_llama.py`), dropout placement from "Attention Is All You Need" (Vaswani et al. 2017, sec. 5.4),
the static KV cache from gpt-fast. Imports torch and config only.

Dropout sites, each inverted dropout (`Dropout` below), active only in train() with a nonzero rate:
    (a) embed  on tok_emb (+ pos_emb)                         `self.drop_embed`
    (b) attn   on the attention probabilities                 `block.attn.drop_probs` (SDPA's dropout_p in eager)
    (c) resid  on each sub-layer output, before the residual  `block.drop_attn`, `block.drop_mlp`
`set_dropout()` changes the rates in place, so a schedule can move them during training. Eager code uses torch's
own dropout kernels with float rates; compiled code reads each rate from a 0-dim tensor, since torch.compile guards
on floats and a schedule moving every step would recompile every step until it fell back to eager.

Shapes: B batch, T query length, S cache length, C d_model, H heads, K kv heads, D head_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import INITS, ModelConfig, check_rate

IGNORE_INDEX = -100  # a target the loss skips (a prompt token in fine-tuning, padding): F.cross_entropy's default


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype:  # the same math in one op: 1 call instead of 8 per norm
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary frequencies theta^(-2i/D), with Llama 3.1's scaling of the low frequencies when asked. (D/2,)"""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_scaling == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        low_wavelen = cfg.rope_original_context / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_context / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (cfg.rope_original_context / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        interpolated = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(is_medium, interpolated, inv_freq)
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2), the rotate-half layout HF Llama checkpoints use. x (B,H,T,D), cos/sin (B,1,T,D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Dropout(nn.Module):
    """Inverted dropout (Srivastava et al. 2014): zero each element with probability p, scale the rest by 1/(1-p).

    Eager code runs torch's own dropout with the float `p`. Compiled code reads the rate from `rate`, a float32
    0-dim tensor changed in place, as a graph input (a float `p` would be a guarded constant there). Setting `p`
    sets both. The rate follows the module's device; `active` (p > 0) is the one Python value compiled code sees,
    so a schedule that turns dropout off recompiles once, not every step."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.rate = torch.tensor(float(p), dtype=torch.float32, device="cpu")  # not a buffer: .to(bf16) keeps it
        self.p = p

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = float(value)
        self.rate.fill_(self._p)
        self.active = self._p > 0

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = fn(torch.zeros((), device=self.rate.device)).device  # where .to()/.cuda()/to_empty() send tensors
        if device != self.rate.device:
            self.rate = torch.tensor(self._p, dtype=torch.float32, device=device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.active:
            return x
        if not torch.compiler.is_compiling():  # eager: torch's own fused kernel with the float rate
            return F.dropout(x, self._p, training=True)
        keep = torch.rand(x.shape, device=x.device) >= self.rate  # P(keep) = 1 - p; float32 draws whatever x is
        return torch.where(keep, x / (1 - self.rate), 0.0)

    def extra_repr(self) -> str:
        return f"p={self._p}"


class KVCache(nn.Module):
    """Static-shape cache of keys and values, written at `input_pos` (gpt-fast): shapes never change while
    decoding, so the step is friendly to torch.compile and CUDA graphs."""

    def __init__(self, batch: int, n_kv_heads: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))  # (B, K, S, D)
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v

    def view(self, rows: slice, slots: slice) -> KVCache:
        """Rows `rows` and slots `slots` of this cache alone, sharing its memory (a write through the view lands
        here). A server steps only its busy rows, over only the slots they use, in one batched cache (lmlab.serve);
        the view's slot 0 is this cache's slot `slots.start`, so input_pos and offset count from there."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[rows, :, slots], persistent=False)  # (b, K, s, D), a strided view
        view.register_buffer("v", self.v[rows, :, slots], persistent=False)
        return view


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k and v in one matmul: (H + 2K) * D outputs.
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop_probs = Dropout(cfg.dropout_attn)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                input_pos: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.cache is not None and input_pos is not None:
            k, v = self.cache.update(input_pos, k, v)  # (B, K, S, D)
            if mask is not None and mask.shape[-1] < k.shape[2]:  # the slots the mask can let through
                k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        drop = self.drop_probs if self.training and self.drop_probs.active else None
        y = attend(q, k, v, mask, drop)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           dropout: Dropout | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v, with `dropout` (when given) on the probabilities.

    mask None means plain causal attention; otherwise a boolean (B or 1, 1, T, S) mask, True where attention is
    allowed. K < H heads share keys (grouped-query). Eager code always runs SDPA (fused flash/efficient kernels,
    dropout_p the float rate). Compiled code with dropout on forms the probabilities here: SDPA's dropout_p must be
    a Python float, which torch.compile guards on, so a moving rate would recompile every step. That path costs
    the (B, H, T, S) probabilities in memory."""
    gqa = k.shape[1] != q.shape[1]
    if dropout is None and mask is not None and gqa:
        return _attend_grouped(q, k, v, mask)
    if dropout is None or not torch.compiler.is_compiling():
        p = dropout.p if dropout is not None else 0.0
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
        if dropout is None and not gqa:
            return _attend_masked(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, S)
    if mask is None:  # causal, aligned top-left as SDPA's is_causal
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(q.dtype)
    return dropout(probs) @ v


def _attend_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention with a mask, without copying the cache. With a mask, SDPA's enable_gqa runs its
    math fallback on CPU, which repeat_interleaves the whole (B, K, S, D) cache to H heads on every call: 27% of
    a SmolLM2 decode step. Instead the G = H/K query heads sharing a kv head become G*T queries of that head."""
    B, H, T, D = q.shape
    K = k.shape[1]
    G = H // K
    q = q.reshape(B, K, G * T, D)  # head h = j*G + g reads kv head j, as repeat_interleave pairs them
    y = _attend_masked(q, k, v, mask if T == 1 else mask.repeat(1, 1, G, 1))  # row g*T + t is query t
    return y.reshape(B, H, T, D)


def _attend_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA with a boolean mask; a decoding step's few queries by plain matmuls instead, since CPU SDPA's flash
    kernel spent ~0.5 ms per call on one query (15% of a SmolLM2 decode step) where four small ops take tens of
    microseconds. Same float math; every query may read at least its own slot, so no row is all -inf."""
    if q.shape[-2] > 16 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(q.dtype) @ v


def attention_mask(input_pos: torch.Tensor, S: int, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Which cache slots each query may read: (B or 1, 1, T, S), True where allowed.

    Causal over slots; with `offset` (B,), row b's left padding (slots below offset[b]) is hidden from its real
    tokens. A pad query itself would then see nothing, and an all-False row is what SDPA's CUDA kernels can turn
    into NaN that leaks into real rows; so every query may always read its own slot (HF's
    `AttentionMaskConverter._unmask_unattended` unmasks such rows for the same reason). Nothing real reads a pad
    row's output, so what it sees does not matter."""
    slots = torch.arange(S, device=input_pos.device)  # (S,)
    mask = slots[None, :] <= input_pos[:, None]  # causal over slots, (T, S)
    if offset is not None:
        own = slots[None, :] == input_pos[:, None]  # (T, S)
        mask = (mask & (slots >= offset[:, None])[:, None, :]) | own  # (B, T, S)
    return mask.unsqueeze(-3)


class MLP(nn.Module):
    """GPT-2: down(gelu_tanh(up(x))). Llama (SwiGLU, Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    """Pre-norm residual block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.drop_attn = Dropout(cfg.dropout_resid)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop_mlp = Dropout(cfg.dropout_resid)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                input_pos: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop_attn(self.attn(self.norm1(x), rope, input_pos, mask))
        return x + self.drop_mlp(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab).

    Training calls `model(idx)`. Incremental decoding first calls `setup_cache(B, S)`, then passes
    `input_pos` (T,), the cache slots being written, and optionally `offset` (B,), the number of left-pad
    slots in each row: row b's real tokens start at slot offset[b], and its positions count from there.
    `last_only` returns logits for the last position alone, (B, 1, vocab); `head=False` the final normed
    hidden states (B, T, C) instead of logits; `targets` (B, T) the mean next-token cross-entropy over the
    targets that are not IGNORE_INDEX, in float32, instead of logits.

    The loss is computed here, as nanoGPT's model does, so that a compiled model compiles its loss with it: the
    head's float32 upcast, log-softmax and their backward fuse into the graph, where a loss taken outside the
    compiled call would run eagerly over float32 copies of the (B, T, vocab) logits (3.3 GB for GPT-2 at
    16 x 1024). A head may offer `masked(x)`, logits over a padded vocabulary whose extra columns are -inf
    (lmlab.training.fastpath.PaddedHead): cross-entropy over those equals cross-entropy over the true vocabulary, and
    needs no slice of the padded matmul's output nor a padded copy of its gradient.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context_length, cfg.d_model) if cfg.pos == "learned" else None
        self.drop_embed = Dropout(cfg.dropout_embed)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.init_rope()
        if self.wte.weight.device.type != "meta":  # built on meta for loading: weights come from a file
            self.init_weights("gpt2")

    def init_rope(self) -> None:
        """(Re)build the rotary frequencies (needed after building the model on the meta device).

        A plain float32 attribute rather than a buffer, so `model.to(bfloat16)` cannot round it: positions
        times frequencies must stay exact to thousands of tokens. forward() moves it to the input's device."""
        self.inv_freq = rope_inv_freq(self.cfg) if self.cfg.pos == "rope" else None

    @torch.no_grad()
    def init_weights(self, scheme: str = "gpt2") -> None:
        """Initialize every parameter by a named scheme.

        gpt2: N(0, 0.02) for matrices and embeddings, and residual projections (attn.proj, mlp.down)
        scaled by 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth
        (GPT-2 paper, sec. 2.3). xavier: Glorot uniform for matrices (Glorot & Bengio 2010).
        orthogonal: orthogonal matrices (Saxe et al. 2014). Biases start at 0, norm gains at 1.
        """
        if scheme not in INITS:
            from lmlab.errors import unknown

            raise unknown("init", scheme, INITS)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if module is self.lm_head and self.cfg.tie_embeddings:
                    continue
                is_resid = name.endswith("attn.proj") or name.endswith("mlp.down")
                if scheme == "gpt2":
                    nn.init.normal_(module.weight, 0.0, resid_std if is_resid else 0.02)
                elif scheme == "xavier":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.orthogonal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def set_dropout(self, embed: float | None = None, attn: float | None = None, resid: float | None = None) -> None:
        """Change dropout rates in place (a schedule calls this between steps); None leaves a site as it is."""
        for name, rate in (("embed", embed), ("attn", attn), ("resid", resid)):
            if rate is not None:
                check_rate(f"dropout rate for {name}", rate)
        if embed is not None:
            self.drop_embed.p = embed
        for block in self.blocks:
            if attn is not None:
                block.attn.drop_probs.p = attn
            if resid is not None:
                block.drop_attn.p = resid
                block.drop_mlp.p = resid

    def setup_cache(self, batch_size: int, length: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a static KV cache of `length` slots in every layer (replacing any earlier one)."""
        self.use_cache(self.make_cache(batch_size, length, dtype))

    def make_cache(self, batch_size: int, length: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        """A KV cache per layer, not yet in use: a caller that keeps several (a server's batch and its prefill
        row) switches between them, or views of them (`KVCache.view`), with `use_cache`."""
        if length > self.cfg.context_length:
            raise ValueError(f"cache length {length} exceeds the context length {self.cfg.context_length}")
        dtype = dtype or self.norm_f.weight.dtype  # the float dtype, also when the weights are quantized
        return [KVCache(batch_size, self.cfg.n_kv_heads, length, self.cfg.head_dim, dtype, self.wte.weight.device)
                for _ in self.blocks]

    def use_cache(self, caches: list[KVCache] | None) -> None:
        """Decode with these caches (one per layer) from now on; None goes back to running without one."""
        for i, block in enumerate(self.blocks):
            block.attn.cache = None if caches is None else caches[i]

    def clear_cache(self) -> None:
        self.use_cache(None)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None,
                offset: torch.Tensor | None = None, last_only: bool = False, head: bool = True,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        B, T = idx.shape
        device = idx.device
        mask = None
        if input_pos is None:
            if T > self.cfg.context_length:
                raise ValueError(f"sequence length {T} exceeds the context length {self.cfg.context_length}")
            pos = torch.arange(T, device=device).expand(B, T)
            if offset is not None:  # a left-padded batch without the cache
                input_pos = torch.arange(T, device=device)
        else:
            pos = input_pos.expand(B, T)
        if input_pos is not None:
            mask = attention_mask(input_pos, self._slots_read(input_pos, T), offset)
            if offset is not None:
                pos = (pos - offset[:, None]).clamp(min=0)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            if self.inv_freq.device != device:
                self.inv_freq = self.inv_freq.to(device)
            freqs = pos[..., None].float() * self.inv_freq  # (B, T, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
            rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        x = self.drop_embed(x)
        for block in self.blocks:
            x = block(x, rope, input_pos, mask)
        if last_only:  # a prefill needs only the next-token logits, not (B, T, vocab) of them
            x = x[:, -1:]
        x = self.norm_f(x)  # (B, T, C): head=False stops here, for a loss that applies lm_head in chunks
        if targets is not None:
            logits = getattr(self.lm_head, "masked", self.lm_head)(x)  # (B, T, vocab or padded vocab)
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return self.lm_head(x) if head else x  # (B, T, vocab)

    def _slots_read(self, input_pos: torch.Tensor, T: int) -> int:
        """How many cache slots attention reads: all of them, or in eager CPU code only those up to the last
        query's, since every later slot is masked for every query. A cache is allocated for a whole generation
        (prompt + new tokens), so this spares a prefill and the early decoding steps the empty rest of it (a
        37-token prefill into 165 slots spent 4.5x the attention it needed). Compiled and GPU code keeps the one
        static shape: a graph per length, or a device-to-host sync per step, would cost more than it saves."""
        cache = self.blocks[0].attn.cache
        if cache is None:
            return T
        S = cache.k.shape[2]
        if input_pos.device.type == "cpu" and not torch.compiler.is_compiling():
            S = min(S, int(input_pos.max()) + 1)
        return S

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied head is counted once
