"""Small shared helpers: device and dtype resolution, atomic file and directory writes, reading JSON files."""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError, unknown

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must be a device torch knows and has."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LmlabError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmlabError(f"device {device!r} asked for, but no CUDA GPU is available here; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LmlabError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise unknown("dtype", dtype, DTYPES)
    return DTYPES[dtype]


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Floating-point tensors made inside are `dtype` (torch.set_default_dtype, restored after): a model built
    so has its parameters in that dtype from the start, never a float32 twin to cast from."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def slow_io() -> None:
    """Sleep LMLAB_TEST_SLOW_IO seconds (unset: not at all) at the points where a kill would tear a write.

    A test hook and its only reader: tests/test_kill.py widens the windows inside a checkpoint swap and a metrics
    append so that a SIGKILL at a random instant lands in them often."""
    delay = os.environ.get("LMLAB_TEST_SLOW_IO")
    if delay:
        import time

        time.sleep(float(delay))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (a rename, a new file) durable. A no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success fsync it, give it the umask's mode and rename
    it over `path`: readers see the old file or the new one, never half of one. On failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600: others on a shared box could not read it
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def current_dir(path: str | os.PathLike) -> Path:
    """Where the current version of a directory written with atomic_dir is, without changing anything (readers
    call this; a writer calls recover_dir): `path`, or its set-aside previous version when a kill interrupted a
    swap between its two renames."""
    path = Path(path)
    return _old(path) if not path.exists() and _old(path).is_dir() else path


def recover_dir(path: str | os.PathLike) -> None:
    """Finish a directory swap that a kill interrupted: if `path` is gone but its previous version was set
    aside, put that back. atomic_dir calls it before each swap; readers use current_dir, which changes nothing
    (a reader renaming while a live writer sits between its renames would break that writer's swap)."""
    path = Path(path)
    if not path.exists() and _old(path).is_dir():
        os.replace(_old(path), path)
        fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path` to fill; on success make every file durable and swap it in.

    The swap is two renames (old aside to .NAME.old, new in), then the old is deleted. A kill between the renames
    leaves no `path` but a complete .NAME.old, which recover_dir (called by the next reader or writer) puts back:
    at every instant one complete version exists. On failure the temporary directory is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        slow_io()
        for f in sorted(tmp.rglob("*"), reverse=True):  # children before their directory
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                os.chmod(f, 0o666 & ~umask())
            elif f.is_dir():
                fsync_dir(f)
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
        fsync_dir(tmp)
        old = _old(path)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)  # a leftover from a kill during the last delete
            os.replace(path, old)
            slow_io()  # the window with no `path`: recover_dir / current_dir cover it
        os.replace(tmp, path)
        fsync_dir(path.parent)
        slow_io()
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_dir(path)  # a failed second rename must not leave `path` missing
        raise


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file's content, or an LmlabError naming the file (missing, a directory, unreadable, not UTF-8)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmlabError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise LmlabError(f"{what} {path} is a directory, not a file") from None
    except OSError as e:
        raise LmlabError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise LmlabError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: str | os.PathLike, what: str = "file", expect: type | None = dict) -> Any:
    """A JSON file's content, or an LmlabError naming the file and the fix (missing, unreadable, malformed, or
    not of type `expect`)."""
    path = Path(path)
    try:
        data = json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise LmlabError(f"{what} {path} is not valid JSON ({e}); re-create it") from None
    if expect is not None and not isinstance(data, expect):
        raise LmlabError(f"{what} {path} must hold a JSON {expect.__name__}, got {type(data).__name__}")
    return data


@functools.cache
def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim). The tokenizers library's many small
    allocations, some from its worker threads, fragment glibc's heap: without this, a streamed BPE encode's RSS
    grew with the corpus (+700 MiB for 48 MiB of text here) though almost nothing was live. Loaders call it
    after each tensor, so temporaries freed in the heap (q, k, v before fusing) do not pile up in the peak."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# Long loops (packing an 8B GGUF takes a minute) show a tqdm bar on a terminal; a caller that shows progress
# elsewhere (the lab's page, for a load it runs on a thread) listens on its own thread instead.
_listeners = threading.local()


@contextmanager
def progress_to(listener: Callable[[str, int, int], None]) -> Iterator[None]:
    """Within this block, on this thread, `progress` loops report (what, done, total) to `listener` instead of
    drawing a bar."""
    before = getattr(_listeners, "fn", None)
    _listeners.fn = listener
    try:
        yield
    finally:
        _listeners.fn = before


def progress(items: Iterable, what: str, unit: str = "it", total: int | None = None) -> Iterator:
    """`items`, with their progress shown: to this thread's listener (progress_to), else as a tqdm bar on stderr,
    which tqdm leaves out when stderr is not a terminal. `total` for items without a length (a generator, which
    is read lazily either way)."""
    listener = getattr(_listeners, "fn", None)
    if listener is None:
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=what, unit=unit, total=total, leave=False, disable=None)
        return
    n = total if total is not None else len(items)  # type: ignore[arg-type]
    done = 0
    for item in items:
        listener(what, done, n)
        yield item
        done += 1
    listener(what, done, n)
