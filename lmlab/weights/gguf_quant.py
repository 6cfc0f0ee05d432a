"""GGUF quantized blocks split into integer codes and float scales, without a float32 copy of the weights.

A quantized GGUF tensor is a row-major run of fixed-size blocks (ggml's `block_q4_0` ...), each holding packed
integer codes and the fp16 scales that turn them into weights. `split_blocks` unpacks them into the two forms
PyTorch's weight-only kernels take (lmlab/quant.py):

- "int4": codes 0..15 (one uint8 per value), and per 32 values a scale and an offset: w = codes * scale + offset.
  Q4_0 (offset -8 d), Q4_1 (scale d, offset m), Q4_K (each 32-value sub-block: scale d * sc, offset -dmin * m,
  from the 6-bit scales and mins packed in 12 bytes of the 256-value super-block).
- "int8": signed codes and one scale per group of G values: w = codes * scale. Q8_0 (G = 32, codes as stored)
  and Q6_K (G = 16: the 6-bit value q - 32 in [-32, 31], scale d * sc[j] with an int8 sc per 16 values).

The codes * scale (+ offset) products are those ggml computes (same float32 operations in the same order), so
they equal `gguf.quants.dequantize` bit for bit. `requantize_int8` turns the group-scaled int8 form into the
per-channel one torch's int8 kernel takes; `random_blocks` writes valid blocks of random weights (the synthetic
GGUF benchmark, the tests). Everything is vectorized over blocks; Python loops only over chunks of rows, so the
temporaries stay a few MB for any tensor.

References: llama.cpp ggml/src/ggml-common.h (block layouts), ggml-quants.c (`dequantize_row_q4_0`, `_q4_1`,
`_q8_0`, `_q4_K` with `get_scale_min_k4`, `_q6_K`); gguf-py gguf/quants.py (`dequantize_blocks`).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lmlab.errors import LmlabError

Q = GGMLQuantizationType
INT4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)
INT8_TYPES = (Q.Q8_0, Q.Q6_K)
SPLIT_TYPES = INT4_TYPES + INT8_TYPES
INT4_GROUP = 32  # values per (scale, offset) pair in the int4 form, for every int4 type
INT8_GROUP = {Q.Q8_0: 32, Q.Q6_K: 16}  # values per scale in the int8 form
_CHUNK_BYTES = 1 << 23  # raw bytes unpacked per step: bounds the temporaries, not a tuning knob


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 little-endian halves -> (...) float32."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray, out: np.ndarray) -> None:
    """Bytes (..., n) -> out (..., 2, n): low nibbles then high ones, ggml's order for Q4_0/Q4_1/Q4_K."""
    np.bitwise_and(qs, 0x0F, out=out[..., 0, :])
    np.right_shift(qs, 4, out=out[..., 1, :])


def _q4_0(b: np.ndarray, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> None:
    # block_q4_0: fp16 d, 16 bytes of nibbles; w = d * (q - 8)
    d = _f16(b[..., 0:2])
    _nibbles(b[..., 2:], codes.reshape(*b.shape[:2], 2, 16))
    scale[...] = d
    offset[...] = -8 * d


def _q4_1(b: np.ndarray, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> None:
    # block_q4_1: fp16 d, fp16 m, 16 bytes of nibbles; w = d * q + m
    scale[...] = _f16(b[..., 0:2])
    offset[...] = _f16(b[..., 2:4])
    _nibbles(b[..., 4:], codes.reshape(*b.shape[:2], 2, 16))


def _k4_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes (..., 12) -> the 8 six-bit scales and 8 mins (..., 8) of a Q4_K super-block.

    ggml-quants.c get_scale_min_k4: for j < 4, sc = q[j] & 63 and m = q[j+4] & 63; for j >= 4,
    sc = (q[j+4] & 0xF) | ((q[j-4] >> 6) << 4) and m = (q[j+4] >> 4) | ((q[j] >> 6) << 4)."""
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate((lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)), axis=-1)
    mn = np.concatenate((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), axis=-1)
    return sc, mn


def _q4_k(b: np.ndarray, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> None:
    # block_q4_K: fp16 d, fp16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles. Four 64-value chunks, each
    # 32 bytes: sub-block 2k is the low nibbles of chunk k, 2k+1 its high nibbles; w = d*sc*q - dmin*m.
    r, nb = b.shape[:2]
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    sc, mn = _k4_scales_mins(b[..., 4:16])
    scale.reshape(r, nb, 8)[...] = d * sc.astype(np.float32)
    offset.reshape(r, nb, 8)[...] = -(dmin * mn.astype(np.float32))
    _nibbles(b[..., 16:].reshape(r, nb, 4, 32), codes.reshape(r, nb, 4, 2, 32))


def _q8_0(b: np.ndarray, codes: np.ndarray, scale: np.ndarray) -> None:
    # block_q8_0: fp16 d, 32 int8; w = d * q
    scale[...] = _f16(b[..., 0:2])
    codes.reshape(*b.shape[:2], 32)[...] = b[..., 2:].view(np.int8)


def _q6_k(b: np.ndarray, codes: np.ndarray, scale: np.ndarray) -> None:
    # block_q6_K: 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 int8 scales, fp16 d. Each 128-value
    # half h takes 64 bytes of ql and 32 of qh: values 32k + l (k = 0..3, l < 32) are nibble k // 2 of
    # ql[32 * (k % 2) + l] with bits 2k..2k+1 of qh[l] on top; w = d * sc[value // 16] * (q - 32).
    r, nb = b.shape[:2]
    ql = b[..., 0:128].reshape(r, nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)  # (r, nb, 2, 2, 64)
    qh = b[..., 128:192].reshape(r, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    q = (ql.reshape(r, nb, 2, 4, 32) & 0x0F) | ((qh & 3) << 4)  # (r, nb, 2, 4, 32), 0..63
    codes.reshape(r, nb, 2, 4, 32)[...] = q.view(np.int8) - np.int8(32)
    d = _f16(b[..., 208:210])[..., None]
    scale.reshape(r, nb, 16)[...] = d * b[..., 192:208].view(np.int8).astype(np.float32)


def split_blocks(raw: np.ndarray, qtype: GGMLQuantizationType, rows: int, cols: int) -> tuple:
    """A quantized tensor's bytes as stored (uint8, rows * cols / block * block bytes) -> its codes and scales.

    Returns ("int4", codes uint8 (rows, cols) in 0..15, scale float32 (rows, cols // 32), offset float32
    (rows, cols // 32)), the weight being codes * scale + offset per 32 values (Q4_0, Q4_1, Q4_K); or
    ("int8", codes int8 (rows, cols), scale float32 (rows, cols // G), G), the weight being codes * scale per G
    values (Q8_0: G = 32, Q6_K: G = 16). Both equal gguf.quants.dequantize exactly."""
    qtype = Q(qtype)
    if qtype not in SPLIT_TYPES:
        raise LmlabError(f"GGUF type {qtype.name} cannot be split into codes and scales; splittable: "
                         f"{', '.join(t.name for t in SPLIT_TYPES)}")
    block, size = GGML_QUANT_SIZES[qtype]
    if rows < 1 or cols < 1 or cols % block:
        raise LmlabError(f"a {qtype.name} tensor of shape ({rows}, {cols}): columns must be a positive multiple "
                         f"of {block}")
    nb = cols // block
    if raw.dtype != np.uint8 or raw.size != rows * nb * size:
        raise LmlabError(f"a {qtype.name} tensor of shape ({rows}, {cols}) needs {rows * nb * size} bytes, got "
                         f"{raw.size} of {raw.dtype}; the file is malformed")
    blocks = raw.reshape(rows, nb, size)
    step = max(1, _CHUNK_BYTES // (nb * size))
    if qtype in INT4_TYPES:
        codes = np.empty((rows, cols), np.uint8)
        scale = np.empty((rows, cols // INT4_GROUP), np.float32)
        offset = np.empty_like(scale)
        fn = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q4_K: _q4_k}[qtype]
        for r in range(0, rows, step):
            fn(blocks[r:r + step], codes[r:r + step], scale[r:r + step], offset[r:r + step])
        return "int4", codes, scale, offset
    group = INT8_GROUP[qtype]
    codes = np.empty((rows, cols), np.int8)
    scale = np.empty((rows, cols // group), np.float32)
    fn = {Q.Q8_0: _q8_0, Q.Q6_K: _q6_k}[qtype]
    for r in range(0, rows, step):
        fn(blocks[r:r + step], codes[r:r + step], scale[r:r + step])
    return "int8", codes, scale, group


def requantize_int8(codes: np.ndarray, scale: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Group-scaled int8 (codes (rows, cols), scale (rows, cols // group)) -> per-channel int8 (codes int8
    (rows, cols), scale float32 (rows,)), symmetric with codes in [-127, 127]: torch's int8 kernel takes one scale
    per output row. Each weight moves by at most half the new step (row max |w| / 127). Done in chunks of rows,
    so the float32 temporary stays a few MB whatever the tensor."""
    rows, cols = codes.shape
    if cols % group or scale.shape != (rows, cols // group):
        raise LmlabError(f"int8 codes of shape {codes.shape} need scales of shape ({rows}, {cols // group}) for "
                         f"groups of {group}, got {scale.shape}")
    out = np.empty((rows, cols), np.int8)
    row_scale = np.empty(rows, np.float32)
    step = max(1, _CHUNK_BYTES // (4 * cols))
    for r in range(0, rows, step):
        w = codes[r:r + step].reshape(-1, cols // group, group) * scale[r:r + step, :, None]  # float32
        w = w.reshape(-1, cols)
        s = np.abs(w).max(axis=1) / np.float32(127)
        s[s == 0] = 1  # an all-zero row: any scale gives zero codes
        out[r:r + step] = np.clip(np.rint(w / s[:, None]), -127, 127)
        row_scale[r:r + step] = s
    return out, row_scale


# ---------------------------------------------------------------------------------------------------------
# random blocks: valid quantized tensors of random weights


def _pack_k4_scales_mins(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 mins (..., 8) -> Q4_K's 12 packed bytes (..., 12), the inverse of _k4_scales_mins."""
    lo = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    mid = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)
    return np.concatenate((lo, mid, hi), axis=-1).astype(np.uint8)


def _put_f16(b: np.ndarray, values: np.ndarray) -> None:
    b[...] = values.astype(np.float16)[..., None].view(np.uint8)


# The root mean square of a block's codes (as dequantized, before the scale) when every code is uniform:
# Q4_0 q - 8 in -8..7, Q4_1 / Q4_K q - 7.5 after the offset, Q8_0 -128..127, Q6_K q - 32 in -32..31.
_CODE_RMS = {Q.Q4_0: 4.64, Q.Q4_1: 4.61, Q.Q4_K: 4.61, Q.Q8_0: 73.9, Q.Q6_K: 18.5}


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator,
                  std: float = 0.02) -> np.ndarray:
    """Bytes (rows, cols / block * block bytes) of a valid `qtype` tensor whose weights have mean about 0 and
    root mean square about `std` (codes uniform, per-block scales jittered by up to +-25%), built block field by
    block field: no float32 weights exist, so an 8B-shaped file costs its own size in memory, one tensor at
    a time. For synthetic GGUF files (benchmarks/synthetic_gguf.py) and tests."""
    qtype = Q(qtype)
    if qtype not in SPLIT_TYPES:
        raise LmlabError(f"random blocks of type {qtype.name} are not supported; supported: "
                         f"{', '.join(t.name for t in SPLIT_TYPES)}")
    block, size = GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise LmlabError(f"{qtype.name} needs a column count that is a multiple of {block}, got {cols}")
    nb = cols // block
    b = rng.integers(0, 256, (rows, nb, size), dtype=np.uint8)  # the codes: uniform bits
    unit = std / _CODE_RMS[qtype]
    if qtype in (Q.Q4_0, Q.Q8_0):  # codes -8..7 / -128..127 lean negative: a random sign per block centres them
        sign = rng.choice(np.array([-1, 1], np.float32), (rows, nb))
        _put_f16(b[..., 0:2], sign * unit * rng.uniform(0.75, 1.25, (rows, nb)).astype(np.float32))
    elif qtype == Q.Q4_1:
        d = (unit * rng.uniform(0.75, 1.25, (rows, nb))).astype(np.float16)
        _put_f16(b[..., 0:2], d)
        _put_f16(b[..., 2:4], -7.5 * d.astype(np.float32))  # centre q = 0..15 on 0
    elif qtype == Q.Q4_K:
        # sc in 32..63 (+-33% around the mean 47.5) and m = sc * 15/16 with dmin = 8 d: offset about -7.5 d sc
        sc = rng.integers(32, 64, (rows, nb, 8), dtype=np.uint8)
        mn = np.rint(sc * (15 / 16)).astype(np.uint8)
        d = np.full((rows, nb), unit / 47.5, np.float32)
        _put_f16(b[..., 0:2], d)
        _put_f16(b[..., 2:4], 8 * d)
        b[..., 4:16] = _pack_k4_scales_mins(sc, mn)
    else:  # Q6_K: int8 scales +-(64..127) (mean magnitude 95.5; the sign centres q - 32 in -32..31), one fp16 d
        sc = rng.integers(64, 128, (rows, nb, 16), dtype=np.int8) * rng.choice(np.array([-1, 1], np.int8),
                                                                             (rows, nb, 16))
        b[..., 192:208] = sc.view(np.uint8)
        _put_f16(b[..., 208:210], np.full((rows, nb), unit / 95.5, np.float32))
    return b.reshape(rows, nb * size)
