"""Text to training data: corpora fetched from PyPI (fetch.py), read in pieces (sources.py), and tokenized into
memory-mapped token files with their meta.json, sampled into batches (tokens.py).

`from lmlab.data import prepare, TokenData, Batches` keeps working: the names of tokens.py are looked up on first
use, so importing lmlab.data.fetch alone needs no torch or numpy.
"""


def __getattr__(name: str):
    import importlib

    tokens = importlib.import_module("lmlab.data.tokens")
    try:
        return getattr(tokens, name)
    except AttributeError:
        raise AttributeError(f"module 'lmlab.data' has no attribute {name!r}") from None
