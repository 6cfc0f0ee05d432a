"""lmlab: pretrain and run GPT-2- and Llama-family language models with PyTorch."""

from lmlab.api import LM, load, model_config
from lmlab.config import PRESETS, ModelConfig, SamplingConfig, preset
from lmlab.errors import LmlabError
from lmlab.model import Transformer

__version__ = "0.1.0"
__all__ = ["LM", "load", "model_config", "ModelConfig", "PRESETS", "preset", "LmlabError", "SamplingConfig",
           "Transformer"]
