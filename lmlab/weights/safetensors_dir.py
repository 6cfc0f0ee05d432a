"""Tensor-at-a-time reads from a directory of safetensors files (one file, or shards listed in
model.safetensors.index.json), as HF's save_pretrained writes them.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
the raw bytes (https://github.com/huggingface/safetensors#format). Tensors are read here with plain file reads
rather than the `safetensors` package's memory map: every page of a map that has been read stays resident in
the process (its RSS) until the map closes, so loading a bf16 checkpoint at float32 would hold the whole file
beside the converted model (1.5x). A plain read gives a buffer the caller converts and drops.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lmlab.errors import LmlabError
from lmlab.utils import read_json

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_CHUNK = 16 << 20  # bytes converted at a time


class SafetensorsFile:
    """The header of one safetensors file, checked against the file's size; tensors read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 2 <= n <= size - 8:
                raise LmlabError(f"{path} is not a readable safetensors file (its header length is wrong); it may be "
                                 "truncated, download or export it again")
            try:
                header = json.loads(f.read(n))
                header.pop("__metadata__", None)
                self.entries = {k: (_DTYPES[e["dtype"]], tuple(e["shape"]), *e["data_offsets"])
                                for k, e in header.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise LmlabError(f"{path} has a malformed safetensors header ({type(e).__name__}: {e})") from None
        self.start = 8 + n
        for key, (dtype, shape, begin, end) in self.entries.items():
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                raise LmlabError(f"{path}: tensor {key!r} spans {end - begin} bytes, not the {shape} {dtype} its "
                                 "header declares; the file is corrupt")
        end = max((e[3] for e in self.entries.values()), default=0)
        if self.start + end > size:
            raise LmlabError(f"{path} is truncated: its tensors need {self.start + end} bytes, the file holds {size}; "
                             "download or export it again")

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `key`, in `dtype` if given: read straight into the result, converting through one reused
        chunk buffer, so only the result is allocated (no source-sized temporary: freeing those leaves holes in
        the C heap that stay in RSS)."""
        src, shape, begin, end = self.entries[key]
        out = torch.empty(shape, dtype=dtype or src)
        if out.dtype == src:
            self._read(key, out.reshape(-1).view(torch.uint8), begin, end)
            return out
        flat, step = out.reshape(-1), _CHUNK // src.itemsize
        for i in range(0, flat.numel(), step):
            n = min(step, flat.numel() - i)
            chunk = self._chunk()[: n * src.itemsize]
            self._read(key, chunk, begin + i * src.itemsize, begin + (i + n) * src.itemsize)
            flat[i:i + n] = chunk.view(src)
        return out

    def _read(self, key: str, buf: torch.Tensor, begin: int, end: int) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            got = f.readinto(buf.numpy()) if end > begin else 0
        if got != end - begin:
            raise LmlabError(f"{self.path}: tensor {key!r} is cut short; the file is truncated")

    def _chunk(self) -> torch.Tensor:
        if not hasattr(self, "_buf"):
            self._buf = torch.empty(_CHUNK, dtype=torch.uint8)
        return self._buf


class SafetensorsReader:
    """Lazy reads from one safetensors file or a sharded set listed in model.safetensors.index.json."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index, "shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise LmlabError(f"{index} has no weight_map; re-download or re-export the checkpoint")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise LmlabError(f"{directory} holds no *.safetensors file; only safetensors checkpoints are read "
                                 "(convert .bin files with transformers' save_pretrained)")
            weight_map = None
        self.files = {}
        for name in files:
            if not (directory / name).is_file():
                raise LmlabError(f"shard {directory / name} listed in the index is missing; re-download the checkpoint")
            self.files[name] = SafetensorsFile(directory / name)
        self.where = dict(weight_map) if weight_map else {k: n for n, f in self.files.items() for k in f.entries}

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Tensor `key` (converted to `dtype` if given), None when no file holds it."""
        name = self.where.get(key)
        if name is None:
            return None
        if key not in self.files[name].entries:
            raise LmlabError(f"the shard index puts {key!r} in {name}, which does not hold it; re-download the "
                             "checkpoint")
        return self.files[name].get(key, dtype)

    def keys(self) -> list[str]:
        return list(self.where)
