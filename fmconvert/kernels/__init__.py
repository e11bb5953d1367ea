"""Triton kernels used by the fmconvert runtime on CUDA (and on CPU under TRITON_INTERPRET=1).

Every kernel file has the same anatomy: @triton.jit kernel(s), a plain launcher, and a pure-torch
`*_reference` beside it. Importing this package needs triton; check `triton_available()` first
when the caller may run without it.
"""
from __future__ import annotations

import importlib.util
import os


def triton_available() -> bool:
    """True when triton imports and can run here: on CUDA, or on CPU through TRITON_INTERPRET=1."""
    try:
        import torch
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


if importlib.util.find_spec("triton") is not None:
    # Without triton only triton_available() is importable (it then returns False).
    from .attention import (  # noqa: E402
        decode_attention,
        decode_attention_reference,
        decode_attention_workspace,
        prefill_attention,
        prefill_attention_reference,
    )
    from .int8_matmul import dequantize, int8_linear, int8_linear_reference  # noqa: E402
    from .norm import add_norm, add_norm_reference  # noqa: E402
    from .rope import apply_rope, apply_rope_reference  # noqa: E402

__all__ = [
    "triton_available",
    "add_norm", "add_norm_reference",
    "int8_linear", "int8_linear_reference", "dequantize",
    "apply_rope", "apply_rope_reference",
    "prefill_attention", "prefill_attention_reference",
    "decode_attention", "decode_attention_reference", "decode_attention_workspace",
]
