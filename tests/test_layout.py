"""The import layering of STYLE.md, kept true by parsing every module's imports: each module imports lmlab
modules from its own layer or below, never above, and model.py needs nothing but torch and config."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lmlab"
LAYERS = [
    {"errors"},
    {"config", "utils"},
    {"model", "tokenizer", "optim", "distributed", "quant", "fastpath", "lora"},
    {"data", "sources", "checkpoint", "metrics", "fetch", "weights.keymap", "weights.load", "weights.gguf_tokenizer",
     "weights.safetensors_dir", "weights.gguf_quant", "weights.gguf_packed"},
    {"weights.hf", "weights.gguf"},  # foreign formats: readers and key tables
    # exporters, then the dispatch by format name; LoRA adapters in and out
    {"weights.gguf_export", "weights.export", "weights.adapter", "weights"},
    {"train", "evaluate", "generate"},
    # "lmlab": the package itself, whose __init__ re-exports api; sft renders through chat, finetune loads through api
    {"chat", "plot", "demo", "api", "lmlab", "bench", "sft", "finetune"},
    {"study.core", "study.text", "study.plots", "study.dropout_topk", "study.dropout", "study.optimizers",
     "study.sampling", "study.__init__", "study"},  # lmlab study: experiments over train/generate/evaluate
    {"serve.scheduler", "serve.protocol", "serve.app", "serve", "serve.__init__"},
    {"cli", "__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PKG).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmlab"):
            found.add(node.module.removeprefix("lmlab.") if node.module != "lmlab" else "lmlab")
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("lmlab.") if a.name != "lmlab" else "lmlab" for a in node.names
                      if a.name.startswith("lmlab")}
    return found


def test_every_module_has_a_layer():
    modules = {_module(p) for p in PKG.rglob("*.py")} - {"__init__", "weights.__init__"}
    assert modules <= set(LAYER), sorted(modules - set(LAYER))


def test_imports_go_downward_only():
    bad = []
    for path in PKG.rglob("*.py"):
        me = _module(path)
        if me in ("__init__", "weights.__init__"):
            continue
        for dep in _imports(path):
            if LAYER[dep] > LAYER[me]:
                bad.append(f"{me} (layer {LAYER[me]}) imports {dep} (layer {LAYER[dep]})")
    assert not bad, bad


def test_model_imports_torch_and_config_only():
    tree = ast.parse((PKG / "model.py").read_text())
    top = {n.names[0].name.split(".")[0] for n in tree.body if isinstance(n, ast.Import)}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert top <= {"__future__", "math", "torch", "lmlab"}, top
    assert _imports(PKG / "model.py") <= {"config", "errors"}
