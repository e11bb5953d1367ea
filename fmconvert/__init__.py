"""fmconvert: Hugging Face checkpoints -> fused, tensor-parallel, int8 serving checkpoints.

Public API: `convert`, `load`, `inject`. Everything else is internal.
"""

__version__ = "0.1.0"


def convert(model_dir, out_dir, **options):
    """Convert a HF model directory. Options: tp, int8, group_size, dtype, max_shard_size, force, allow_pickle."""
    from .pipeline import Options, convert as _convert
    return _convert(model_dir, out_dir, Options(**options), progress=False)


def load(out_dir, **kwargs):
    """Load this process's rank of a converted checkpoint as a FusedModel (see fmconvert.runtime.load.load)."""
    from .runtime.load import load as _load
    return _load(out_dir, **kwargs)


def inject(hf_model, out_dir, **kwargs):
    """Swap a live transformers model's transformer stack for the fused one from OUT_DIR (tp=1)."""
    from .runtime.inject import inject as _inject
    return _inject(hf_model, out_dir, **kwargs)
