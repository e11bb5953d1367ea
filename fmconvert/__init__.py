"""fmconvert: Hugging Face checkpoints -> fused, tensor-parallel, int8 serving checkpoints.

Public API: `convert`, `load`, `inject`. Everything else is internal.
"""

__version__ = "0.1.0"


def convert(model_dir, out_dir, **options):
    """Convert a HF model directory. Options: tp, int8, group_size, dtype, max_shard_size, force, allow_pickle."""
    from .convert import Options, convert as _convert
    return _convert(model_dir, out_dir, Options(**options), progress=False)
