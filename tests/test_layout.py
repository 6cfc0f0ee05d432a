"""The import layering of STYLE.md, kept true by parsing every module's imports.

`ls lmlab/` is the architecture: every file and folder there has a layer below, and a module imports only from
its own layer or below, between folders too. Inside a folder the modules have an order of their own (the foreign
formats' readers below their exporters, the training loop below the fine-tune job that runs it). model.py needs
nothing but torch and config.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lmlab"
# What `ls lmlab/` shows, bottom to top. A folder's name stands for every module in it.
LAYERS = [
    {"errors.py"},
    {"config.py", "utils.py"},  # every knob, once; small helpers
    # the model, and what wraps it from outside
    {"model.py", "tokenizer.py", "templates.py", "quant.py", "lora.py", "fuse.py"},
    {"data", "checkpoint.py"},  # text -> token files; our checkpoint format and the last step of every loader
    {"weights"},  # foreign formats in and out: HF, GGUF, PEFT
    {"infer"},  # sampling, the one engine, text, chat sessions, evaluation
    {"api.py", "__init__.py"},  # the front door (lmlab.load, LM)
    {"training"},  # the loop, its jobs (pretrain, fine-tune), optimizers, torchrun, metrics, fast paths
    {"compat"},  # lmlab.generate, .chat, .train and .finetune as users import them: re-exports of infer/, training/
    {"serve", "study", "bench.py", "demo.py"},  # what runs over the library: the server, studies, benchmarks, demo
    {"cli.py", "__main__.py"},  # parsing and dispatch
]
# Inside a folder, bottom to top (a name missing here is a module the test below reports).
INSIDE = {
    "data": [{"fetch"}, {"sources"}, {"tokens"}, {"__init__"}],
    "weights": [{"keymap", "gguf_tokenizer", "safetensors_dir", "gguf_quant", "gguf_packed", "packed_cache"},
                {"hf", "gguf"},
                {"gguf_export", "export", "adapter"}, {"__init__"}],
    "infer": [{"sampling", "text", "evaluate"}, {"engine", "distribution"}, {"generate"}, {"chat"},
              {"__init__"}],
    "training": [{"optim", "distributed", "metrics", "fastpath", "runs"}, {"loop", "plot"}, {"sft"}, {"finetune"},
                 {"__init__"}],
    "compat": [{"generate", "chat", "train", "finetune"}, {"__init__"}],
    "serve": [{"scheduler", "reports"}, {"protocol"}, {"app", "loads"}, {"lab"}, {"__init__"}],
    "study": [{"plots", "text", "core"}, {"dropout_topk"}, {"dropout", "optimizers", "sampling"}, {"__init__"}],
}
TOP = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PKG).with_suffix("").parts)


def _entry(module: str) -> str:
    """The name `ls lmlab/` shows for a module: its folder, or its file."""
    return module.split(".")[0] if "." in module else f"{module}.py"


def _inner(module: str) -> int:
    folder, _, name = module.partition(".")
    return next(i for i, names in enumerate(INSIDE[folder]) if (name or "__init__") in names)


def _imports(path: Path) -> set[str]:
    """The lmlab modules `path` imports (`from lmlab.study import plots` is the module study.plots)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmlab"):
            base = node.module.removeprefix("lmlab").removeprefix(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if (PKG / (sub.replace(".", "/") + ".py")).exists() else base or "__init__")
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("lmlab.") for a in node.names if a.name.startswith("lmlab.")}
    return {m if (PKG / (m.replace(".", "/") + ".py")).exists() else f"{m}.__init__" for m in found}


def test_at_most_16_modules_at_the_root():
    """The layers are folders: `ls lmlab/` shows at most 16 modules beside them."""
    assert len(list(PKG.glob("*.py"))) <= 16, sorted(p.name for p in PKG.glob("*.py"))


def test_ls_lmlab_is_the_layering():
    """Every file and folder of lmlab/ (the static page folder of serve aside) has its layer, every module in a
    folder its place inside it, and no layer names something that is not there."""
    shown = {p.name for p in PKG.iterdir() if p.name != "__pycache__" and (p.is_dir() or p.suffix == ".py")}
    assert shown == set(TOP), (sorted(shown - set(TOP)), sorted(set(TOP) - shown))
    for folder, order in INSIDE.items():
        modules = {p.stem for p in (PKG / folder).glob("*.py")}
        assert modules == set().union(*order), (folder, sorted(modules ^ set().union(*order)))


def test_imports_go_downward_only():
    bad = []
    for path in PKG.rglob("*.py"):
        me = _module(path)
        for dep in _imports(path):
            a, b = _entry(me), _entry(dep)
            if TOP[b] > TOP[a]:
                bad.append(f"{me} ({a}, layer {TOP[a]}) imports {dep} ({b}, layer {TOP[b]})")
            elif a == b and a in INSIDE and _inner(dep) > _inner(me):
                bad.append(f"{me} imports {dep}, above it inside {a}/")
    assert not bad, bad


def test_model_imports_torch_and_config_only():
    tree = ast.parse((PKG / "model.py").read_text())
    top = {n.names[0].name.split(".")[0] for n in tree.body if isinstance(n, ast.Import)}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert top <= {"__future__", "math", "torch", "lmlab"}, top
    assert _imports(PKG / "model.py") <= {"config", "errors"}


def test_old_import_paths_are_the_new_objects():
    """The modules the README documented before the layers became folders (`lmlab.generate.SamplingConfig`,
    `from lmlab.train import train`, `lmlab.chat.CHAT_SAMPLING`, `lmlab.finetune.finetune(...)`) still import (from
    lmlab/compat/, under their old names), and hold the very objects of their new homes, the chat templates that
    lived in lmlab.chat included; `lmlab.generate` works as an attribute too."""
    import lmlab.chat
    import lmlab.finetune
    import lmlab.train
    from lmlab.train import train

    from lmlab import config, templates
    from lmlab.compat import generate as compat_generate
    from lmlab.infer import chat
    from lmlab.infer import generate as infer_generate
    from lmlab.training import finetune, loop

    assert lmlab.generate is compat_generate and lmlab.generate.SamplingConfig is config.SamplingConfig
    assert lmlab.generate.generate_ids is infer_generate.generate_ids

    assert train is loop.train and lmlab.train.TrainResult is loop.TrainResult
    assert lmlab.train.train_job is loop.train_job and lmlab.train.Pretrain is loop.Pretrain
    assert lmlab.chat.CHAT_SAMPLING is config.CHAT_SAMPLING is chat.CHAT_SAMPLING
    for name in ("ChatSession", "reply", "answer", "repl", "read_messages", "fit_conversation"):
        assert getattr(lmlab.chat, name) is getattr(chat, name), name
    for name in ("render_chat", "chat_prompt_ids", "check_messages", "chat_stop", "ROLES", "PLAIN_TEMPLATE"):
        assert getattr(lmlab.chat, name) is getattr(templates, name), name
    for name in ("finetune", "finetune_config", "lora_config", "FineTune", "ADAPTER_FILE", "LORA_LR"):
        assert getattr(lmlab.finetune, name) is getattr(finetune, name), name
