"""lmlab: pretrain and run GPT-2- and Llama-family language models with PyTorch.

Where users import modules that have since moved into the layers' folders (`lmlab.generate.SamplingConfig`,
`from lmlab.train import train`, `lmlab.chat`, `lmlab.finetune`), those names are served from lmlab/compat/ by the
small import hook below, so `ls lmlab/` shows the layers and not four one-line modules.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from lmlab.api import LM, load, model_config
from lmlab.config import PRESETS, ModelConfig, SamplingConfig, preset
from lmlab.errors import LmlabError
from lmlab.model import Transformer

__version__ = "0.1.0"
__all__ = ["LM", "load", "model_config", "ModelConfig", "PRESETS", "preset", "LmlabError", "SamplingConfig",
           "Transformer"]

MOVED = ("generate", "chat", "train", "finetune")  # lmlab.NAME is lmlab.compat.NAME


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import lmlab.NAME` for a NAME in MOVED gives the module lmlab.compat.NAME itself (the same object)."""

    def find_spec(self, name, path, target=None):
        if name.startswith("lmlab.") and name.removeprefix("lmlab.") in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("lmlab.compat." + spec.name.removeprefix("lmlab."))

    def exec_module(self, module) -> None:
        pass  # already executed under its own name


if not any(isinstance(f, _Moved) for f in sys.meta_path):
    sys.meta_path.append(_Moved())


def __getattr__(name: str):
    """`lmlab.generate` as an attribute, without an import of it first."""
    if name in MOVED:
        return importlib.import_module(f"lmlab.{name}")
    raise AttributeError(f"module 'lmlab' has no attribute {name!r}")
