"""MiniMax-Text-01 / M1 beyond the family tests (which run the tiny model through tiny.FAMILIES): the lightning
attention op against its recurrence token by token, the config's variants against transformers at tp 1, 2 and 4,
that each of its own pieces is applied (the decay, the residual's factors, the output norm over every rank's heads),
what the manifest records, and an unsupported activation."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.ops import TorchOps


def _recurrence(q, k, v, slope, state):
    """S = exp(-slope) S + k^T v; o = q S, one token at a time, in fp64."""
    S, out = state.double().clone(), []
    decay = torch.exp(-slope.double()).view(1, -1, 1, 1)
    for t in range(q.shape[1]):
        S = decay * S + k[:, t].double()[..., :, None] * v[:, t].double()[..., None, :]
        out.append(torch.einsum("bhd,bhde->bhe", q[:, t].double(), S))
    return torch.stack(out, 1), S


@pytest.mark.parametrize("B,T,H,D,chunk", [(1, 1, 1, 4, 64), (2, 7, 3, 5, 4), (1, 33, 2, 8, 16), (3, 130, 4, 16, 64)])
def test_lightning_matches_its_recurrence(B, T, H, D, chunk):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    slope = torch.rand(H, generator=g) * 0.5 + 0.01
    state = torch.randn(B, H, D, D, generator=g)                 # continuing a sequence, not starting one
    want, want_state = _recurrence(q, k, v, slope, state)
    got = TorchOps().lightning(q, k, v, slope, state, chunk=chunk)
    scale = want.abs().max()
    assert ((got.double() - want).abs().max() / scale).item() < 1e-5
    assert ((state.double() - want_state).abs().max() / want_state.abs().max()).item() < 1e-5


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("override", [
    {},
    dict(block_size=256),                                    # one block: transformers' other prompt path
    dict(full_attn_alpha_factor=1.0, full_attn_beta_factor=1.0, linear_attn_alpha_factor=1.0,
         linear_attn_beta_factor=1.0, mlp_alpha_factor=1.0, mlp_beta_factor=1.0),
])
def test_each_variant_matches_transformers(model_dir, tmp_path, override, tp):
    src = model_dir("minimax", **override)
    assert max(tiny.errors_against_transformers(src, "minimax", tmp_path, 12, tp=tp, **override)) < 1e-5


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    """A slower decay, other residual factors, or the output norm over this rank's heads alone move the logits."""
    convert(model_dir("minimax"), tmp_path / "out", Options(tp=2), progress=False)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny.build("minimax")(ids).logits

    def run(change=None):
        def fn(m):
            if change:
                change(m)
            return m(ids)
        return max(tiny.rel(g, want) for g in tiny.on_ranks(tmp_path / "out", 2, fn))

    assert run() < 1e-5
    assert run(lambda m: setattr(m.blocks[0], "slope", m.blocks[0].slope * 0.5)) > 1e-3
    assert run(lambda m: m.spec["residual_factors"].update(mlp=[1.0, 1.0])) > 1e-3
    assert run(lambda m: setattr(m.blocks[2], "_sub_norm", lambda x, w, n, eps=None: torch.nn.functional.rms_norm(
        x, (x.shape[-1],), w, eps))) > 1e-3


def test_the_manifest_records_lightning_and_the_factors(model_dir, tmp_path):
    m = tiny.converted_manifest(model_dir("minimax"), tmp_path / "out", tp=2, int8=True, group_size=16)
    sp = m["model"]
    assert sp["lightning"] and sp["linear_layers"] == [0, 2] and sp["residual"] == "normed"
    assert sp["residual_factors"] == {"attn": [1.5, 0.9], "linear": [2.0, 1.1], "mlp": [1.7, 0.8]}
    t = m["ranks"][1]["tensors"]
    assert t["layers.0.lin_qkv.weight"]["shape"] == [3 * 2 * 16, 64] and t["layers.0.lin_out_norm.weight"]["shape"] == [32]
    assert t["layers.0.lin_gate.weight"]["dtype"] == "int8" and "layers.1.lin_qkv.weight" not in t
    shapes = tiny.on_ranks(tmp_path / "out", 2, lambda mm: [None if s is None else tuple(s.shape)
                                                            for s in mm.new_cache(1, 8).state])
    assert shapes[0] == [(1, 2, 16, 16), None, (1, 2, 16, 16), None]     # this rank's heads' states, no conv


def test_an_activation_other_than_silu_is_refused(model_copy, tmp_path):
    src = model_copy("minimax")
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FmError, match="lightning attention with hidden_act 'gelu' is not supported"):
        convert(src, tmp_path / "out", Options(), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("override", [dict(rotary_dim=8),                  # as the published config.json names it
                                      dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                            "partial_rotary_factor": 0.5})])
def test_rope_turns_the_checkpoints_width(model_dir, tmp_path, override, tp):
    """RoPE over the first rotary_dim dimensions of each head, as MiniMax trained it; transformers' class turns the
    whole head, so the reference is narrowed (verify.checkpoint_rope_width), and only for as long as asked."""
    from transformers.models.minimax import modeling_minimax

    from fmconvert.verify import checkpoint_rope_width
    src = model_dir("minimax", **override)
    convert(src, tmp_path / "out", Options(tp=tp), progress=False)
    pos = json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]["position"]
    assert pos["rotary_dim"] == 8
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    hf = tiny.build("minimax", **override)
    whole, inv = modeling_minimax.apply_rotary_pos_emb, hf.model.rotary_emb.inv_freq
    with torch.no_grad():
        wide = hf(ids).logits
        with checkpoint_rope_width(hf, 8, pos["theta"]) as note:
            want = hf(ids).logits
    assert "first 8 dimensions" in note
    assert modeling_minimax.apply_rotary_pos_emb is whole and hf.model.rotary_emb.inv_freq is inv
    assert tiny.rel(wide, want) > 1e-5                      # the narrowing changes transformers' answer
    got = tiny.on_ranks(tmp_path / "out", tp, lambda m: m(ids))
    assert max(tiny.rel(g, want) for g in got) < 1e-5


def test_verify_narrows_the_reference(model_dir, tmp_path):
    from fmconvert.verify import verify
    src = model_dir("minimax", rotary_dim=8)
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    r = verify(src, tmp_path / "out", tokens=32)
    assert not r["failures"] and "first 8 dimensions" in r["end_to_end"]["reference_note"]
    full = model_dir("minimax")
    convert(full, tmp_path / "full", Options(tp=2), progress=False)
    r = verify(full, tmp_path / "full", tokens=32)
    assert not r["failures"] and "reference_note" not in r["end_to_end"]
