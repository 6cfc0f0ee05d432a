"""lmlab.generate, as users import it: sampling settings, filters and the engine's entry points (lmlab/infer/)."""

from lmlab.infer.generate import *  # noqa: F401,F403
from lmlab.infer.generate import (  # noqa: F401
    SamplingConfig,
    TextStream,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    compile_decoding,
    fit_prompts,
    generate_ids,
    generate_text,
    process_logits,
    select,
    stream_text,
)
