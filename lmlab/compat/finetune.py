"""lmlab.finetune, as the README had users call it (`lmlab.finetune.finetune(...)`): lmlab/training/finetune.py."""

from lmlab.training.finetune import *  # noqa: F401,F403
from lmlab.training.finetune import FineTune, finetune, finetune_config, lora_config  # noqa: F401
