"""The `lmlab` command line: output, exit codes, and one-line errors for bad input.

Most cases call `lmlab.cli.main(argv)` in-process (what `python -m lmlab` runs, minus interpreter start-up,
which costs about 1.5 s a call); an exception escaping main() fails the test, as a traceback would. A few
cases also run as a real `python -m lmlab` process and must give the same result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import lmlab
from lmlab.checkpoint import save_model
from lmlab.config import PRESETS, ModelConfig
from lmlab.model import Transformer
from lmlab.tokenizer import CharTokenizer

# One torch thread: the model is tiny, and OpenMP threads wait badly for each other when the CPU is shared.
ENV = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
TEXT = "the quick brown fox jumps over the lazy dog\nabba cabbage, a bad bed.\n"
CONTEXT = 16


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str


def run_plain(args: list[str], cwd: Path) -> Result:
    p = subprocess.run([sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, encoding="utf-8",
                       env=ENV, cwd=cwd, timeout=120)
    return Result(p.returncode, p.stdout, p.stderr)


def run_inprocess(args: list[str], capsys) -> Result:
    from lmlab.cli import main

    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as e:  # --help exits through argparse
        rc = e.code if isinstance(e.code, int) else 0
    out, err = capsys.readouterr()
    return Result(rc, out, err)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture
def cli(capsys):
    return lambda *args: run_inprocess(list(args), capsys)


@pytest.fixture(scope="session")
def ckpt(workdir) -> Path:
    """A tiny random-weight char model with a 16-token context, saved as an lmlab checkpoint."""
    torch.manual_seed(0)
    tok = CharTokenizer.train([TEXT])
    cfg = ModelConfig(family="gpt2", vocab_size=tok.vocab_size, context_length=CONTEXT, d_model=16, n_layers=1,
                      n_heads=2)
    return save_model(workdir / "tiny", Transformer(cfg), tok)


@pytest.fixture(scope="session")
def hf_dirs(workdir) -> dict[str, Path]:
    """HF-style model directories whose config.json is broken in different ways."""
    configs = {
        "invalid-json": '{"model_type": "gpt2", "n_embd": 16,',
        "missing-field": json.dumps({"model_type": "gpt2", "vocab_size": 20, "n_positions": 16, "n_layer": 1,
                                     "n_head": 2}),
        "unsupported": json.dumps({"model_type": "bert", "vocab_size": 20, "hidden_size": 16}),
    }
    dirs = {}
    for name, text in configs.items():
        d = workdir / "hf" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(text, encoding="utf-8")
        dirs[name] = d
    return dirs


def assert_user_error(r: Result, *names: str) -> str:
    """Exit 2, exactly one stderr line `lmlab: error: ...` naming each of `names`, nothing else, no traceback."""
    assert "Traceback" not in r.out + r.err, r.err
    assert r.rc == 2, (r.rc, r.err)
    lines = r.err.splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("lmlab: error: ")
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert r.out == ""
    return lines[0]


def assert_ok(r: Result) -> None:
    assert "Traceback" not in r.out + r.err, r.err
    assert r.rc == 0, (r.rc, r.err)


# ---------------------------------------------------------------------------------------------------------
# info and --help


def test_info_preset_param_count(cli):
    r = cli("info", "gpt2-124m")
    assert_ok(r)
    assert r.out.splitlines()[0] == "preset gpt2-124m"
    assert "parameters: 124,439,808" in r.out  # GPT-2 small, tied head (HF GPT2LMHeadModel's count)


def test_info_lists_presets(cli):
    r = cli("info")
    assert_ok(r)
    lines = r.out.splitlines()
    assert lines[0].split()[0] == "preset"
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(PRESETS)
    for name, cfg in PRESETS.items():
        assert rows[name].split()[1] == cfg.family
        assert rows[name].endswith(f"{cfg.num_params():,}")


def test_info_of_a_checkpoint(cli, ckpt):
    r = cli("info", str(ckpt))
    assert_ok(r)
    from safetensors.torch import load_file

    n_params = sum(t.numel() for t in load_file(ckpt / "model.safetensors").values())  # tied head stored once
    assert f"parameters: {n_params:,}" in r.out
    assert f"context_length         {CONTEXT}" in r.out


@pytest.mark.parametrize("args", [["--help"], ["info", "--help"], ["generate", "--help"], ["-h"]],
                         ids=["lmlab", "info", "generate", "short"])
def test_help(cli, args):
    r = cli(*args)
    assert_ok(r)
    prog = " ".join(["lmlab"] + [a for a in args if not a.startswith("-")])
    assert r.out.startswith(f"usage: {prog}")
    assert r.err == ""
    if "generate" in args:
        for flag in ("--model", "--prompt", "--top-k", "--top-p", "--min-p", "--temperature", "--max-new-tokens",
                     "--seed", "--stream", "--truncate"):
            assert flag in r.out


# ---------------------------------------------------------------------------------------------------------
# Bad input: exit 2 and one line naming the problem


def test_unknown_preset_suggests_the_nearest(cli):
    line = assert_user_error(cli("info", "gpt2-125m"), "gpt2-125m")
    assert "did you mean 'gpt2-124m'" in line


def test_no_command(cli):
    assert_user_error(cli(), "COMMAND")


def test_unknown_command(cli):
    assert_user_error(cli("trian"), "trian")


def test_generate_missing_model_path(cli, workdir):
    missing = workdir / "no-such-model"
    assert_user_error(cli("generate", "--model", str(missing), "--prompt", "ab"), str(missing), "not found")


def test_generate_requires_model_and_prompt(cli):
    assert_user_error(cli("generate", "--prompt", "ab"), "--model")


@pytest.mark.parametrize(("case", "names"), [
    ("invalid-json", ("config.json", "not valid JSON")),
    ("missing-field", ("config.json", "n_embd")),
    ("unsupported", ("config.json", "'bert'", "not supported")),
])
def test_generate_malformed_config_json(cli, hf_dirs, case, names):
    assert_user_error(cli("generate", "--model", str(hf_dirs[case]), "--prompt", "ab", "--device", "cpu"), *names)


@pytest.mark.parametrize(("flag", "value"), [
    ("--top-k", "-1"),
    ("--temperature", "-0.5"),
    ("--top-p", "0"),
    ("--top-p", "1.5"),
    ("--min-p", "-0.1"),
    ("--min-p", "1.5"),
    ("--max-new-tokens", "-1"),
    ("--repetition-penalty", "0"),
    ("--temperature", "nan"),
    ("--top-k", "abc"),
])
def test_generate_invalid_sampling_setting(cli, ckpt, flag, value):
    r = cli("generate", "--model", str(ckpt), "--prompt", "ab", "--device", "cpu", flag, value)
    assert_user_error(r, flag, value)


def test_prompt_longer_than_context(cli, ckpt):
    prompt = ("abc " * 10)[:40]
    line = assert_user_error(cli("generate", "--model", str(ckpt), "--prompt", prompt, "--device", "cpu"),
                             "--truncate", "40", str(CONTEXT))
    assert "prompt" in line


def test_truncate_lets_a_long_prompt_through(cli, ckpt):
    prompt = ("abc " * 10)[:40]
    r = cli("generate", "--model", str(ckpt), "--prompt", prompt, "--device", "cpu", "--truncate",
            "--max-new-tokens", "5", "--temperature", "0")
    assert_ok(r)
    assert r.out.startswith(prompt)
    assert len(r.out) == len(prompt) + 5 + 1  # the prompt, 5 characters, a newline


def test_a_settings_error_names_its_field_for_the_cli_and_the_server(cli):
    """A config's validation names the setting at fault in LmlabError.field; the CLI says it as its flag and the
    server as its request parameter, from that field (nothing parses the message's first word)."""
    from lmlab.config import SamplingConfig
    from lmlab.errors import LmlabError
    from lmlab.serve.protocol import APIError, CompletionRequest, sampling_config

    with pytest.raises(LmlabError) as e:
        SamplingConfig(top_p=0.0)
    assert (e.value.field, e.value.problem) == ("top_p", "must be in (0, 1] (1 turns it off), got 0.0")
    assert str(e.value) == "top_p must be in (0, 1] (1 turns it off), got 0.0"
    assert str(e.value.naming("--top-p")) == "--top-p must be in (0, 1] (1 turns it off), got 0.0"
    line = assert_user_error(cli("serve", "--model", "unused", "--port", "70000"))
    assert line == "lmlab: error: --port must be an integer in [0, 65535], got 70000"
    line = assert_user_error(cli("prepare", "x", "--out", "unused", "--val-fraction", "1.5"))
    assert line == "lmlab: error: --val-fraction must be in (0, 1), got 1.5"
    with pytest.raises(APIError) as api:  # past the server's own range checks: the seed reaches SamplingConfig
        sampling_config(CompletionRequest(prompt="x", seed=2**63), None, 1, 64)
    assert (api.value.param, api.value.message) == ("seed", f"seed must be in [0, 2**63), got {2**63}")


def _configs():
    from lmlab.config import (
        CHAT_SAMPLING,
        EvalConfig,
        LoRAConfig,
        PrepareConfig,
        SamplingConfig,
        ServeConfig,
        SFTConfig,
    )

    tune = ["finetune", "--model", "m", "--data", "d", "--out", "o"]
    return [(["serve", "--model", "m"], ServeConfig, "serve", "", None),
            (["prepare", "x", "--out", "o"], PrepareConfig, "prep", "", None),
            (["eval", "--model", "m", "--data", "d"], EvalConfig, "ev", "", None),
            (tune, LoRAConfig, "lora", "lora-", None), (tune, SFTConfig, "sft", "", None),
            (["generate", "--model", "m", "--prompt", "p"], SamplingConfig, "s", "", None),
            (["chat"], SamplingConfig, "s", "", CHAT_SAMPLING)]


@pytest.mark.parametrize("argv, cls, tag, prefix, base", _configs(),
                         ids=["serve", "prepare", "eval", "finetune-lora", "finetune-sft", "generate", "chat"])
def test_every_config_field_is_a_flag_with_the_configs_default(argv, cls, tag, prefix, base):
    """Each command's flags are its config's fields, all of them, spelled --PREFIX-FIELD, with no default of the
    CLI's own (unset flags leave the config's defaults, or chat's CHAT_SAMPLING)."""
    import dataclasses

    from lmlab.cli import build_parser, config_from

    parser = build_parser()
    args = parser.parse_args(argv)
    flags = {k[len(tag) + 1:]: v for k, v in vars(args).items() if k.startswith(tag + "_")}
    assert sorted(flags) == sorted(f.name for f in dataclasses.fields(cls))
    assert all(v is None for v in flags.values())
    assert config_from(args, cls, tag, base) == (base if base is not None else cls())
    for f in dataclasses.fields(cls):
        default = getattr(base if base is not None else cls(), f.name)
        value = {bool: "true", tuple: "q", type(None): "1" if "int" in str(f.type) else "k"}.get(type(default),
                                                                                             str(default))
        given = parser.parse_args([*argv, f"--{prefix}{f.name.replace('_', '-')}", value])
        assert getattr(given, f"{tag}_{f.name}") is not None, f.name


def test_seed_out_of_range(cli, ckpt):
    assert_user_error(cli("generate", "--model", str(ckpt), "--prompt", "ab", "--device", "cpu", "--seed",
                          str(2**70)), "--seed")


# ---------------------------------------------------------------------------------------------------------
# generate that works


def generate(cli, ckpt, *extra: str) -> Result:
    return cli("generate", "--model", str(ckpt), "--prompt", "ab", "--device", "cpu", *extra)


def test_generate_greedy_and_stream(cli, ckpt):
    r = generate(cli, ckpt, "--max-new-tokens", "5", "--temperature", "0")
    assert_ok(r)
    assert r.out.startswith("ab") and r.out.endswith("\n")
    continuation = r.out[len("ab"):-1]
    assert len(continuation) == 5
    assert set(continuation) <= set(TEXT)
    # The library call the CLI stands for gives the same text.
    assert lmlab.load(ckpt, device="cpu").generate("ab", max_new_tokens=5, temperature=0) == continuation

    s = generate(cli, ckpt, "--max-new-tokens", "5", "--temperature", "0", "--stream")
    assert_ok(s)
    assert s.out == continuation + "\n"  # streaming prints the continuation alone


def test_generate_same_seed_same_text(cli, ckpt):
    def sample(seed: int) -> str:
        r = generate(cli, ckpt, "--max-new-tokens", "12", "--temperature", "1.0", "--top-k", "10", "--seed", str(seed))
        assert_ok(r)
        return r.out

    first = sample(7)
    assert sample(7) == first
    assert len({first, sample(8), sample(9)}) > 1  # the seed is used at all


# ---------------------------------------------------------------------------------------------------------
# The runner against the real thing


@pytest.mark.parametrize("kind", ["info", "error", "generate"])
def test_plain_subprocess_agrees_with_runner(cli, ckpt, workdir, kind):
    args = {"info": ["info", "gpt2-124m"],
            "error": ["info", "gpt2-125m"],
            "generate": ["generate", "--model", str(ckpt), "--prompt", "ab", "--device", "cpu", "--max-new-tokens",
                         "5", "--temperature", "0"]}[kind]
    plain = run_plain(args, workdir)
    assert plain == cli(*args)
    if kind == "error":
        assert_user_error(plain, "gpt2-125m", "gpt2-124m")
    else:
        assert_ok(plain)


# ---------------------------------------------------------------------------------------------------------
# train settings: a config file, flags and presets, refused with one line when wrong


def numeric_fields() -> list[tuple[str, str]]:
    """(name, annotation) of every int or float field of ModelConfig and TrainConfig."""
    from dataclasses import fields

    from lmlab.config import TrainConfig

    return [(f.name, str(f.type)) for cls in (ModelConfig, TrainConfig) for f in fields(cls)
            if ("int" in str(f.type) or "float" in str(f.type))]


def train_with(cli, workdir: Path, *extra: str) -> Result:
    """`lmlab train` on data that does not exist: settings are checked before the data is read."""
    return cli("train", "--data", str(workdir / "no-data"), "--out", str(workdir / "no-run"), *extra)


def write_config(workdir: Path, name: str, text: str) -> Path:
    path = workdir / "configs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("name", "annotation"), numeric_fields())
def test_config_file_string_where_a_number_belongs(cli, workdir, name, annotation):
    cfg = write_config(workdir, f"str-{name}.json", json.dumps({name: "1"}))
    line = assert_user_error(train_with(cli, workdir, "--config", str(cfg)), name, "'1'")
    assert ("integer" if annotation.startswith("int") else "number") in line


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("name", [n for n, a in numeric_fields() if "float" in a])
def test_config_file_non_finite_number(cli, workdir, name, value):
    cfg = write_config(workdir, f"nonfinite-{name}.json", f'{{"{name}": {value}}}')  # JSON as Python writes it
    assert_user_error(train_with(cli, workdir, "--config", str(cfg)), name, "finite")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
@pytest.mark.parametrize("name", [n for n, a in numeric_fields() if "float" in a])
def test_non_finite_flag(cli, workdir, name, value):
    assert_user_error(train_with(cli, workdir, f"--{name.replace('_', '-')}={value}"), name, "finite")


@pytest.mark.parametrize("text", ['{"lr": true}', '{"d_model": 1.5}', '{"max_steps": [1]}', '{"family": 2}',
                                  '{"bias": "yes"}', '{"lr": {"value": 1}}'])
def test_config_file_wrong_type(cli, workdir, text):
    cfg = write_config(workdir, "wrong-type.json", text)
    assert_user_error(train_with(cli, workdir, "--config", str(cfg)), next(iter(json.loads(text))))


def test_min_lr_above_lr_is_refused(cli, workdir):
    assert_user_error(train_with(cli, workdir, "--lr", "1e-4", "--min-lr", "1e-3"), "min_lr", "lr")
    from lmlab.config import TrainConfig
    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    assert TrainConfig(lr=1e-5).min_lr == pytest.approx(1e-6)  # the default follows lr down: lr / 10


def test_toml_config_without_tomllib(cli, workdir, monkeypatch):
    """Python 3.10 has no tomllib: tomli (the package tomllib was made from, same API) reads the file there,
    and with neither importable the error says what to install."""
    import tomllib

    cfg = write_config(workdir, "settings.toml", 'lr = "0.9"\n')
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now fails, as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    assert_user_error(train_with(cli, workdir, "--config", str(cfg)), "lr", "'0.9'")  # read, then validated
    monkeypatch.setitem(sys.modules, "tomli", None)
    assert_user_error(train_with(cli, workdir, "--config", str(cfg)), str(cfg), "tomli")


@pytest.mark.parametrize(("text", "names"), [
    ("lr = 0.9\n[model\n", ("settings-bad.toml", "malformed")),
    ("[model]\nd_model = 64\n", ("model",)),
])
def test_malformed_toml_config(cli, workdir, text, names):
    cfg = write_config(workdir, "settings-bad.toml", text)
    assert_user_error(train_with(cli, workdir, "--config", str(cfg)), *names)


def test_config_file_that_is_a_directory_or_unreadable(cli, workdir):
    d = workdir / "configs" / "a-dir.json"
    d.mkdir(parents=True, exist_ok=True)
    assert_user_error(train_with(cli, workdir, "--config", str(d)), str(d))
    f = write_config(workdir, "latin1.json", "")
    f.write_bytes(b'{"lr": "\xe9"}')
    assert_user_error(train_with(cli, workdir, "--config", str(f)), str(f))


# ---------------------------------------------------------------------------------------------------------
# Flags users bring from HF transformers and nanoGPT


@pytest.mark.parametrize(("alias", "value", "names"), [
    ("--learning-rate", "1e-4", ("min_lr", "0.001", "lr (0.0001)")),  # with --min-lr 1e-3 below: lr reached lr
    ("--max-iters", "-1", ("max_steps", "-1")),
    ("--block-size", "0", ("context_length", "0")),
    ("--n-embd", "30", ("d_model (30)", "n_heads (4)")),  # with --n-heads 4 below
    ("--n-layer", "0", ("n_layers", "0")),
    ("--n-head", "7", ("d_model (32)", "n_heads (7)")),  # with --d-model 32 below
])
def test_hf_and_nanogpt_flag_aliases(cli, workdir, alias, value, names):
    """Each alias reaches its field: an invalid value given through it is reported under the field's name."""
    extra = {"--learning-rate": ["--min-lr", "1e-3"], "--n-embd": ["--n-heads", "4"], "--n-head": ["--d-model", "32"]}
    assert_user_error(train_with(cli, workdir, alias, value, *extra.get(alias, [])), *names)


@pytest.mark.parametrize(("command", "typo", "meant"), [
    ("train", "--max_steps", "--max-steps"),
    ("train", "--Weight_Decay", "--weight-decay"),
    ("train", "--warmup-iters", "--warmup-steps"),  # nanoGPT
    ("train", "--eval_iters", "--eval-batches"),  # nanoGPT
    ("train", "--gradient-accumulation-steps", "--grad-accum"),  # HF Trainer and nanoGPT
    ("train", "--max-grad-norm", "--grad-clip"),  # HF Trainer
    ("train", "--num-hidden-layers", "--n-layers"),  # HF config.json
    ("train", "--hidden_size", "--d-model"),
    ("train", "--lrr", "--lr"),
    ("train", "--out-dir", "--out"),
    ("generate", "--max_new_tokens", "--max-new-tokens"),
    ("generate", "--temp", "--temperature"),
])
def test_unknown_flag_suggests_ours(cli, ckpt, workdir, command, typo, meant):
    args = {"train": ["train", "--data", str(workdir / "d"), "--out", str(workdir / "o")],
            "generate": ["generate", "--model", str(ckpt), "--prompt", "ab"]}[command]
    line = assert_user_error(cli(*args, typo, "5"), typo)
    assert f"did you mean '{meant}'?" in line, line


def test_unknown_flag_far_from_every_flag_gets_no_suggestion(cli, workdir):
    line = assert_user_error(train_with(cli, workdir, "--zzzzqqq", "1"), "--zzzzqqq")
    assert "did you mean" not in line


# ---------------------------------------------------------------------------------------------------------
# The library behind `lmlab train`'s settings, for Python users


def test_train_configs_precedence(workdir):
    from lmlab.config import train_configs

    cfg = write_config(workdir, "precedence.json", json.dumps({"d_model": 64, "lr": 0.002, "max_steps": 7}))
    mc, tc = train_configs(preset="char-cpu", config_file=cfg, overrides={"lr": 0.004})
    assert (mc.d_model, mc.n_layers, mc.context_length) == (64, PRESETS["char-cpu"].n_layers, 64)  # file > preset
    assert (tc.lr, tc.max_steps) == (0.004, 7)  # overrides > file
    mc, tc = train_configs(overrides={"family": "llama", "n_heads": 2, "d_model": 32})
    assert (mc.family, mc.norm, mc.n_kv_heads) == ("llama", "rmsnorm", 2)


def test_train_configs_resume_builds_on_the_saved_run(workdir):
    from lmlab.checkpoint import save_checkpoint, saved_settings
    from lmlab.config import TrainConfig, train_configs

    run = workdir / "saved-run"
    assert saved_settings(run) is None
    cfg = ModelConfig(family="llama", vocab_size=20, context_length=16, d_model=32, n_layers=1, n_heads=4)
    saved_tc = TrainConfig(lr=0.003, max_steps=4)
    save_checkpoint(run / "last", cfg, Transformer(cfg).state_dict(), None, extra={"train_config": saved_tc.to_dict()})
    mc, tc = train_configs(overrides={"max_steps": 6}, saved=saved_settings(run))
    assert mc == cfg and (tc.lr, tc.max_steps) == (0.003, 6)
    mc, tc = train_configs(preset="char-cpu", saved=saved_settings(run))  # a preset given: the saved run is no base
    assert mc == PRESETS["char-cpu"] and tc.lr == TrainConfig().lr


def test_train_configs_unknown_override_key():
    from lmlab.config import train_configs
    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError, match="did you mean 'n_layers'"):
        train_configs(overrides={"n_layer": 2})


@pytest.mark.parametrize("world", ["1", "2"])
def test_leave_worker_skips_teardown_only_under_torchrun(world):
    code = ("import atexit; from lmlab.training.distributed import leave_worker; "
            "atexit.register(lambda: print('teardown')); print('done', flush=False); leave_worker()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**ENV, "WORLD_SIZE": world},
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == ("done\nteardown\n" if world == "1" else "done\n")  # buffered output still flushed


@pytest.mark.parametrize("seed", [str(2**63), str(2**64), str(2**70)])
def test_train_seed_beyond_64_bits(cli, workdir, seed):
    """torch.manual_seed takes at most 64 bits; a larger --seed was a ValueError traceback (found by the fuzz test)."""
    assert_user_error(train_with(cli, workdir, "--seed", seed), "seed", seed)


@pytest.mark.parametrize("args", [["info", "x" * 300], ["generate", "--model", "x" * 300, "--prompt", "a"],
                                  ["train", "--data", "x" * 300, "--out", "r"], ["plot", "x" * 300, "--out", "a.png"]])
def test_os_errors_are_one_line(cli, args):
    """A name the OS refuses (here: too long for the file system) is the user's input: one line, not a traceback
    from whichever stat() met it first (found by the fuzz test)."""
    assert_user_error(cli(*args), "File name too long", "x" * 300)


def test_prepare_out_is_a_file(cli, workdir):
    corpus = write_config(workdir, "corpus.txt", TEXT)
    assert_user_error(cli("prepare", str(corpus), "--out", str(corpus), "--quiet"), str(corpus))
    assert corpus.read_text(encoding="utf-8") == TEXT


def test_double_dash_as_a_flag_value(cli, ckpt, workdir):
    """`--flag=--` is the value '--' (Python 3.11's argparse left an empty list there: a TypeError in resolve_dtype,
    found by the fuzz test)."""
    assert_user_error(cli("eval", "--model", str(ckpt), "--data", str(workdir / "d"), "--dtype=--"), "'--'")
    assert_user_error(train_with(cli, workdir, "--max-steps=--"), "--max-steps", "'--'")
    r = generate(cli, ckpt, "--max-new-tokens", "3", "--temperature", "0", "--stop=--")
    assert_ok(r)
