"""lmlab.train, as the README had users import it (`from lmlab.train import train`): lmlab/training/loop.py."""

from lmlab.training.loop import *  # noqa: F401,F403
from lmlab.training.loop import TrainResult, train, train_job  # noqa: F401
