"""Doge beyond the family tests (which run the tiny model through tiny.FAMILIES): its dynamic mask attention against
transformers at tp 1, 2 and 4 (at 4 two ranks share each kv head, splitting its value channels for dt_proj), with
biases, past the keep window of 8 keys; decode steps (eager and graph-safe), a prompt in pieces and left padding;
that the graph-safe step's shapes do not depend on the step; that each piece is applied (the bias, A, the keep
window, the residual weights); the cache that holds each key's bias; and what is refused."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert

NAME = "doge"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_prompt_past_the_keep_window_matches_transformers(model_dir, tmp_path, tp):
    assert max(tiny.errors_against_transformers(model_dir(NAME), NAME, tmp_path, 20, tp=tp)) < 1e-5


@pytest.mark.parametrize("tp", [2, 4])
def test_decode_pieces_and_padding_match_transformers(model_dir, tmp_path, tp):
    """20 tokens: decode steps from 3 on (eager and graph-safe), the prompt in three pieces, and the second row padded
    by 4 on the left; every query past the 8th key keeps 8 of them."""
    convert(model_dir(NAME), tmp_path / "out", Options(tp=tp), progress=False)
    ids = tiny.ids(20, 1)
    want = tiny.hf_logits(NAME, ids)
    assert tiny.decode_matches(tmp_path / "out", tp, ids, want, 3)
    assert tiny.pieces_match(tmp_path / "out", tp, ids, want, cuts=(6, 13))
    assert tiny.padding_matches(tmp_path / "out", tp, NAME, ids, 4)


def test_biases_match_transformers(model_dir, tmp_path):
    """attention_bias gives q, k, v, o and dt_proj biases (dt_proj's added once, after the ranks' partial sums)."""
    override = dict(attention_bias=True, mlp_bias=True)
    assert max(tiny.errors_against_transformers(model_dir(NAME, **override), NAME, tmp_path, 16, **override)) < 1e-5


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    moved = tiny.moved_by(NAME, model_dir(NAME), tmp_path / "out", 16, 2)

    def each(f):
        return lambda m: [f(b) for b in m.blocks]

    def put(slot, f):
        return each(lambda b: b.t.__setitem__(slot, f(b.t[slot])))

    assert moved(lambda m: None) < 1e-5
    assert moved(put("dmask_dt.weight", lambda w: -w)) > 1e-3          # the bias, from each key's values
    assert moved(put("dmask_a", lambda a: 2 * a)) > 1e-3
    assert moved(each(lambda b: setattr(b, "dyn_window", 64))) > 1e-3     # every key kept
    assert moved(each(lambda b: setattr(b, "dyn_window", 7))) > 1e-3      # one fewer
    assert moved(put("attn_residual", torch.ones_like)) > 1e-3
    assert moved(put("mlp_residual", torch.ones_like)) > 1e-3


class _Shapes(TorchDispatchMode):
    """Every op's name and output shapes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((func.overloadpacket.__name__,
                         tuple(tuple(o.shape) for o in flat if isinstance(o, torch.Tensor))))
        return out


def test_the_graph_safe_step_has_the_same_ops_and_shapes_at_every_step(model_dir, tmp_path):
    """Before the keep window fills and after it, the step runs the same ops on the same shapes (what a CUDA graph
    replays), with nothing read back to the host."""
    from fmconvert.runtime.load import load
    from fmconvert.runtime.model import _decode_graph_safe
    convert(model_dir(NAME), tmp_path / "out", Options(tp=1), progress=False)
    m = load(tmp_path / "out")
    ids = tiny.ids(14, 2)
    cache = m.new_cache(2, 16)
    m(ids[:, :3], cache)
    seen = []
    for j in (3, 12):
        cache.length = j
        with _Shapes() as rec:
            m.decode_step(ids[:, j:j + 1], cache, torch.tensor([j]))
        seen.append(rec.ops)
    assert _decode_graph_safe(m) and seen[0] == seen[1]
    assert not any(name in ("_local_scalar_dense", "item", "nonzero") for name, _ in seen[0])


def test_the_cache_holds_each_keys_bias_and_inspect_counts_it(model_dir, tmp_path):
    """Per token and layer, a rank caches its kv head's key and value (16 each) and its bias: what inspect reports."""
    from fmconvert.manifest import kv_cache_bytes
    m = tiny.converted_manifest(model_dir(NAME), tmp_path / "out", tp=2)
    full, windowed, _ = kv_cache_bytes(m["model"], m["parallel"], 4)
    cache = tiny.on_ranks(tmp_path / "out", 2, lambda mm: mm.new_cache(1, 10))[1]
    held = sum(t[0, :, :1].numel() for t in cache.k + cache.v + cache.dyn_bias) * 4
    assert full == held == 2 * (2 * 16 + 1) * 4 and windowed == 0


def test_the_mixture_a_window_and_an_empty_keep_window_are_refused(model_copy, tmp_path):
    src = model_copy(NAME)
    tiny.refuses(src, tmp_path / "a", r"does not support \(is_moe\)", is_moe=True)
    tiny.refuses(src, tmp_path / "b", r"does not support \(sliding_window\)", is_moe=False, sliding_window=4)
    tiny.refuses(src, tmp_path / "c", "keep_window_size must be a positive integer", sliding_window=None,
                 keep_window_size=0)


def test_tp_must_split_the_value_channels_evenly(model_dir, tmp_path):
    """8 heads of 2 over one kv head: at tp 4 the four ranks sharing it cannot split its 2 value channels."""
    src = model_dir(NAME, hidden_size=16, num_attention_heads=8, num_key_value_heads=1)
    with pytest.raises(FmError, match="value channels"):
        convert(src, tmp_path / "out", Options(tp=4), progress=False)
