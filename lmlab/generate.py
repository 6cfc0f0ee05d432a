"""lmlab.generate, as users import it: sampling settings and the engine's entry points (lmlab/infer/)."""

from lmlab.infer.generate import *  # noqa: F401,F403
from lmlab.infer.generate import SamplingConfig, compile_decoding, generate_ids, generate_text, select  # noqa: F401
