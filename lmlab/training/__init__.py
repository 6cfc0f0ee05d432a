"""Training: the one visible loop (loop.py) and its jobs (pretraining there, fine-tuning in finetune.py over
sft.py's instruction data), optimizers and schedules, torchrun scale-out, the run's event log, the speed-only
fast paths, loss-curve plots, and what a run directory says about itself (runs.py: settings and status).
`from lmlab.training import train` is the library call behind `lmlab train`."""


def __getattr__(name: str):
    if name in ("train", "train_job", "TrainResult"):
        import importlib

        return getattr(importlib.import_module("lmlab.training.loop"), name)
    raise AttributeError(f"module 'lmlab.training' has no attribute {name!r}")
