"""Modules users import under their old names (lmlab.generate, lmlab.chat, lmlab.train, lmlab.finetune): re-exports
of their homes in the layers' folders, served under those names by lmlab/__init__.py."""
