"""The `lmlab` command line: argument parsing and dispatch only; the work lives in the library.

Every user mistake ends as one line on stderr, `lmlab: error: ...`, and exit code 2: argparse's own
errors too (the usage dump is dropped; `--help` still has it).
"""

from __future__ import annotations

import argparse
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

        if not Path(args.name).exists():
            preset(args.name)  # raises: unknown preset, with the nearest name
        lm = lmlab.load(args.name, device="cpu")
        cfg, title = lm.config, f"model {args.name}"
    print(title)
    for key, value in cfg.to_dict().items():
        if (key.startswith("rope_") and cfg.pos != "rope") or (key.startswith("rope_") and key != "rope_theta"
                                                                and cfg.rope_scaling == "none" and key != "rope_scaling"):
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

    run_demo(args.out)
    return 0


def build_parser() -> Parser:
    p = Parser(prog="lmlab", description="Pretrain and run GPT-2- and Llama-family language models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    info = sub.add_parser("info", help="show a preset's (or a model's) architecture and exact parameter count",
                          description="Without a name, list the presets.")
    info.add_argument("name", nargs="?", help="a preset name (lmlab info lists them) or a model path")
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

    demo = sub.add_parser("demo", help="the end-to-end demo: build a tiny model, save it, load it, generate")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes its model")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130
