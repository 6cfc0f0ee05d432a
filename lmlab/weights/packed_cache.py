"""The packed form of a GGUF file, kept beside lmlab's cache so that the second load takes seconds.

Packing a GGUF's quantized tensors into lmlab.quant's layers (weights/gguf_packed.py) costs about a minute for an
8B file on a 2-core CPU: every tensor is split into codes and scales and repacked into the kernels' layout. The
first load writes what it built to `$LMLAB_CACHE/packed/`: the model's tensors in one torch.save file, read back
with torch.load(mmap=True) (gpt-fast's habit: the tensors are views of the file's pages, nothing is copied), and
a small JSON beside it holding the module plan (which layers are packed, and how), the config, the tokenizer
and the key the entry is valid for.

The key is the GGUF file's size, modification time and a hash of its first and last MiB, the load's settings
(quantize, group size, dtype), and what decides the packed layout: this module's format version, torch's version
and the CPU's vector capability (torch's int4 layout differs between AVX2 and AVX-512 builds). An entry whose key
differs is stale and is rebuilt; a torn, truncated or otherwise damaged entry (its recorded size or CRC-32 does
not match, or it does not load) is never trusted: it is rebuilt too. Writes go to a temporary name, are fsynced
and renamed into place, the JSON last, so a kill at any instant leaves no entry that passes the checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import torch
import torch.nn as nn

from lmlab.config import ModelConfig
from lmlab.data.fetch import cache_dir
from lmlab.errors import LmlabError
from lmlab.fuse import FusedSwiGLU
from lmlab.model import Transformer
from lmlab.quant import QuantEmbedding, QuantLinear, exact_head
from lmlab.tokenizer import Tokenizer, load_tokenizer, tokenizer_meta
from lmlab.utils import atomic_file

FORMAT = 2  # of the entries written here: bump when the plan or the tensors' meaning changes
CHUNK = 8 << 20  # bytes per read when checking an entry's CRC-32 (a small buffer: it adds to the peak RSS)


def cache_key(path: Path, quantize: str | None, group_size: int, dtype: torch.dtype, fuse: bool = True) -> dict:
    """What an entry must match to stand for this load of `path`."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return {"format": FORMAT, "file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "head_tail_sha256": h.hexdigest(), "quantize": quantize, "group_size": group_size, "fuse": fuse,
            "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def entry_paths(key: dict) -> tuple[Path, Path]:
    """(tensors, plan) of the entry for `key`: named after the file and a hash of the whole key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    base = f"{Path(key['file']).stem.replace('.', '_')}-{digest}"  # a stem may hold dots: SmolLM2.Q4_1
    folder = cache_dir() / "packed"
    return folder / f"{base}.pt", folder / f"{base}.json"


def _tok_file(plan_file: Path) -> Path:
    return plan_file.with_name(plan_file.name.removesuffix(".json") + ".tok.json")


def crc32_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def load_cached(key: dict) -> tuple[Transformer, Tokenizer | None] | None:
    """The model and tokenizer an entry for `key` holds, or None where there is none that passes every check
    (a damaged entry is deleted, for the caller to rebuild)."""
    tensors, plan_file = entry_paths(key)
    try:
        plan = json.loads(plan_file.read_text())
    except (OSError, ValueError):
        return None
    try:
        if plan.get("key") != key or tensors.stat().st_size != plan["size"] or crc32_file(tensors) != plan["crc32"]:
            raise ValueError("stale or damaged")
        return _build(plan, torch.load(tensors, mmap=True, weights_only=True), _tok_file(plan_file))
    except Exception:  # noqa: BLE001 - whatever is wrong with an entry, it is not used
        forget(key)
        return None


def forget(key: dict) -> None:
    tensors, plan_file = entry_paths(key)
    for p in (plan_file, tensors, _tok_file(plan_file)):
        p.unlink(missing_ok=True)


def forget_others(key: dict) -> None:
    """Delete the entries of earlier versions of the same file (another size, mtime or hash; entries for other
    settings stay): an 8B entry is 5 GB, and a file that changes would otherwise leave one behind each time. A
    plan that does not parse goes too, with its tensors."""
    tensors, _ = entry_paths(key)
    version = ("size", "mtime_ns", "head_tail_sha256")
    for plan_file in tensors.parent.glob(tensors.name.rsplit("-", 1)[0] + "-*.json"):
        if plan_file.name.endswith(".tok.json"):
            continue
        try:
            old = json.loads(plan_file.read_text())["key"]
            stale = old["file"] == key["file"] and any(old[k] != key[k] for k in version)
        except (OSError, ValueError, KeyError, TypeError):
            stale = True
        if stale:
            for p in (plan_file, plan_file.with_suffix(".pt"), _tok_file(plan_file)):
                p.unlink(missing_ok=True)


def save_cached(key: dict, model: Transformer, tokenizer: Tokenizer | None) -> None:
    """Write the entry for `key` (a full disk only costs the next load its speed: the error is swallowed)."""
    tensors, plan_file = entry_paths(key)
    forget_others(key)
    try:
        tensors.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(tensors) as tmp:
            torch.save(_tensors(model), tmp)
        plan = {"key": key, "size": tensors.stat().st_size, "crc32": crc32_file(tensors),
                "config": model.cfg.to_dict(), "modules": _plan(model),
                "fused": [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, FusedSwiGLU)],
                "tokenizer": None if tokenizer is None else tokenizer_meta(tokenizer)}
        if tokenizer is not None:
            with atomic_file(_tok_file(plan_file)) as tmp:
                tokenizer.save(tmp)
        with atomic_file(plan_file) as tmp:
            Path(tmp).write_text(json.dumps(plan))
    except OSError:
        forget(key)


def _tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer under its module's own name (not the state dict, whose hooks give a
    fused SwiGLU's tensors the unfused names: the entry holds the modules as they are); a tensor shared by two
    modules (a tied head) is saved once and comes back shared."""
    out = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        out.update({prefix + k: t for k, t in m._parameters.items() if t is not None})
        out.update({prefix + k: t for k, t in m._buffers.items()
                    if t is not None and k not in m._non_persistent_buffers_set})
    return out


def _plan(model: Transformer) -> dict[str, dict]:
    """Every packed layer: its path and what its skeleton needs."""
    plan = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            plan[name] = dict(kind="linear", in_features=m.in_features, out_features=m.out_features, mode=m.mode,
                              group_size=m.group_size)
        elif isinstance(m, QuantEmbedding):
            plan[name] = dict(kind="embedding", num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim,
                              mode=m.mode)
    return plan


def _build(plan: dict, state: dict[str, torch.Tensor], tok_file: Path) -> tuple[Transformer, Tokenizer | None]:
    """A model on the meta device, its packed layers' skeletons set in, every tensor of `state` assigned."""
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_dict(plan["config"]))
    for i in plan["fused"]:  # its gate_up layer is set in below, as every packed layer is
        model.blocks[i].mlp = FusedSwiGLU(model.blocks[i].mlp, nn.Identity())
    for name, spec in plan["modules"].items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, _skeleton(spec))
    for key, t in state.items():
        owner, _, attr = key.rpartition(".")
        m = model.get_submodule(owner)
        if isinstance(m, (QuantLinear, QuantEmbedding)) and attr != "bias":
            m.register_buffer(attr, t)
        else:
            setattr(m, attr, nn.Parameter(t, requires_grad=False))
    if model.cfg.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.wte.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LmlabError(f"the cached packed model lacks {left[0]}")
    model.init_rope()
    exact_head(model)
    tok = load_tokenizer(tok_file, plan["tokenizer"]) if plan["tokenizer"] is not None else None
    return model.eval(), tok


def _skeleton(spec: dict) -> nn.Module:
    """A packed layer without its tensors (they are assigned from the entry)."""
    if spec["kind"] == "linear":
        return QuantLinear(spec["in_features"], spec["out_features"], spec["mode"], spec["group_size"], None)
    m = QuantEmbedding.__new__(QuantEmbedding)
    nn.Module.__init__(m)
    m.num_embeddings, m.embedding_dim, m.mode = spec["num_embeddings"], spec["embedding_dim"], spec["mode"]
    return m


def cache_enabled() -> bool:
    """LMLAB_PACKED_CACHE=0 turns the cache off (a load then always packs the file anew)."""
    return os.environ.get("LMLAB_PACKED_CACHE", "1") != "0"
