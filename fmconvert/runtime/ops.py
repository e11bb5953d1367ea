"""The op boundary: every fused operation a block runs, with a pure-PyTorch implementation (the oracle) and a
Triton backend that routes the same calls to `fmconvert.kernels` where a kernel exists.

Shapes: x [B, T, hidden]; q [B, Hq, T, D]; k, v [B, Hkv, S, D]; KV caches [B, Hkv, S_max, D].
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import int8_gemv_cpu as _gemv_cpu


class ExpertWeights(list):
    """A mixture's experts of one slot: one weight per expert (a float tensor or an Int8Weight), all views of
    `stacked`, the [E * N, K] tensor as loaded (an Int8Weight when int8), so a kernel can index experts on the
    device."""

    def __init__(self, weights, stacked):
        super().__init__(weights)
        self.stacked = stacked


@dataclass
class Int8Weight:
    """w[n, k] = q[n, k] * scale[n, k // group_size]; q int8 [N, K], scale [N, K / group_size].

    `packed`: the same weight reordered for the CPU int8 GEMV (kernels/int8_gemv_cpu.py), set at load on CPU."""

    q: torch.Tensor
    scale: torch.Tensor
    group_size: int
    packed: object = None

    @property
    def shape(self):
        return self.q.shape

    def dequantize(self, dtype) -> torch.Tensor:
        N, K = self.q.shape
        G, g = K // self.group_size, self.group_size
        if self.q.device.type != "cpu" or N * K <= _DEQUANT_STEP:
            w = self.q.float().view(N, G, g) * self.scale.float().unsqueeze(-1)
            return w.view(N, K).to(dtype)
        # CPU, big weight: the same float32 product, a few rows at a time through one cache-sized buffer, instead
        # of two float32 copies of the whole weight.
        out = torch.empty(N, K, dtype=dtype)
        for lo, hi, b in self._cpu_blocks():
            out[lo:hi].copy_(b)
        return out

    def _cpu_blocks(self):
        """(lo, hi, rows lo:hi dequantized to float32 [hi - lo, K]), a few hundred rows at a time through one
        L2-sized buffer that each step overwrites."""
        N, K = self.q.shape
        G, g = K // self.group_size, self.group_size
        rows = max(1, min(N, _DEQUANT_STEP // K))
        buf = torch.empty(rows, G, g, dtype=torch.float32)
        for lo in range(0, N, rows):
            hi = min(lo + rows, N)
            b = buf[:hi - lo].copy_(self.q[lo:hi].view(hi - lo, G, g))
            yield lo, hi, b.mul_(self.scale[lo:hi].float().unsqueeze(-1)).view(hi - lo, K)

    def matmul_cpu(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        """x @ w.T + bias on CPU without a dequantized copy of the whole weight: a few hundred rows at a time are
        dequantized into one L2-sized buffer and multiplied there. Same float32 products as dequantize(), so the
        same result; for a prompt of 8 tokens and a 11264x2048 weight it is 7x faster than dequantize() + F.linear
        (and faster than a float32 weight: a quarter of the bytes come from memory)."""
        N, K = self.q.shape
        x2 = x.reshape(-1, K)
        y = torch.empty(x2.shape[0], N, dtype=x.dtype)
        for lo, hi, b in self._cpu_blocks():
            y[:, lo:hi] = x2 @ (b if x.dtype == torch.float32 else b.to(x.dtype)).t()
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], N)

    def rows(self, idx: torch.Tensor, dtype) -> torch.Tensor:
        """Dequantized rows (embedding lookup of an int8 table)."""
        q, s = self.q[idx].float(), self.scale[idx].float()
        return (q.unflatten(-1, (-1, self.group_size)) * s.unsqueeze(-1)).flatten(-2).to(dtype)

    def to(self, device):
        return Int8Weight(self.q.to(device), self.scale.to(device), self.group_size)


def activate(y: torch.Tensor, activation) -> torch.Tensor:
    """activation: a name, or ("swiglu_oai", alpha, limit): GPT-OSS's clamped SwiGLU over gate|up, where the gate
    is clamped above at limit, up to [-limit, limit], and out = gate * sigmoid(alpha * gate) * (up + 1); or
    ("swiglu_limit", limit): the same clamps, then the plain SwiGLU silu(gate) * up (HY-V4's experts)."""
    if activation is None:
        return y
    if isinstance(activation, tuple) and activation[0] == "xielu":
        return _xielu(y, *activation[1:])
    if isinstance(activation, tuple) and activation[0] == "swiglu_limit":   # HY-V4's experts: clamped, then SwiGLU
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate.clamp(max=activation[1])) * up.clamp(-activation[1], activation[1])
    if isinstance(activation, tuple):
        name, alpha, limit = activation
        if name != "swiglu_oai":
            raise ValueError(f"unknown activation {activation!r}")
        gate, up = y.chunk(2, dim=-1)
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return gate * torch.sigmoid(gate * alpha) * (up + 1)
    if activation == "swiglu":
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "geglu":
        gate, up = y.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
    if activation == "geglu_erf":            # ModernBERT: the exact (erf) GELU over the gate
        gate, up = y.chunk(2, dim=-1)
        return F.gelu(gate) * up
    if activation == "reglu2":               # BitNet: ReLU squared over the gate
        gate, up = y.chunk(2, dim=-1)
        return F.relu(gate).square() * up
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "relu":
        return F.relu(y)
    if activation == "relu2":                # Arcee: ReLU squared
        return F.relu(y).square()
    if activation == "silu":
        return F.silu(y)
    if activation == "quick_gelu":           # CLIP: x sigmoid(1.702 x)
        return y * torch.sigmoid(1.702 * y)
    raise ValueError(f"unknown activation {activation!r}")


def _xielu(y, a, b, beta, eps):
    """Apertus's xIELU with one layer's parameters (floats, see Block: a = softplus(alpha_p),
    b = beta + softplus(alpha_n)): a x^2 + beta x above 0, (expm1(min(x, eps)) - x) b + beta x below. In fp32,
    rounded once."""
    x = y.float()
    out = torch.where(x > 0, a * x * x + beta * x, (torch.expm1(x.clamp(max=eps)) - x) * b + beta * x)
    return out.to(y.dtype)


_DEQUANT_STEP = 1 << 19     # elements per step of a CPU dequantization (a 2 MB float32 buffer: one core's L2)


def _sdpa_has_gqa() -> bool:
    try:
        F.scaled_dot_product_attention(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1),
                                       enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


_SDPA_GQA = _sdpa_has_gqa()


def rope_tables(inv_freq: torch.Tensor, n_positions: int, attention_scaling: float = 1.0):
    """cos, sin [n_positions, rotary_dim / 2] in fp32, scaled the way HF scales them."""
    t = torch.arange(n_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


class TorchOps:
    """The reference backend: plain PyTorch, any device."""

    name = "torch"

    def add_norm(self, x, residual, weight, bias, eps, kind, pre_weight=None, x_scale=1.0, gain=None):
        """(norm(h), h) with h = x * x_scale + residual (Granite scales each half's output), times gain (Gemma 4's
        layer scalar, a [1] tensor) where given. pre_weight: x is first normed by it (Gemma 2/3's output norms)."""
        if pre_weight is not None:
            x = self.add_norm(x, None, pre_weight, None, eps, kind)[0]
        if residual is not None and x_scale != 1.0:
            x = x * x_scale
        h = x if residual is None else x + residual
        if gain is not None:
            h = h * gain
        hf = h.float()
        if kind == "rms":
            y = (hf * torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
        elif kind == "rms_fp32":             # Gemma 4: the weight applied in fp32, rounded once
            y = (hf * torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
        elif kind == "rms_plus_one":         # Gemma: the scale is 1 + weight, applied in fp32, rounded once
            y = (hf * torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).to(x.dtype)
        else:                                # layer, or layer_plus_one (Nemotron: LayerNorm scaled by 1 + weight)
            w = weight.float() + 1.0 if kind == "layer_plus_one" else weight.float()
            y = F.layer_norm(hf, (h.shape[-1],), w, None if bias is None else bias.float(), eps)
            y = y.to(x.dtype)
        return y, h

    def linear(self, x, weight, bias=None, activation=None):
        if isinstance(weight, Int8Weight):
            if weight.packed is not None and x.numel() <= _gemv_cpu.MAX_ROWS * x.shape[-1] and _gemv_cpu.usable():
                try:
                    return activate(_gemv_cpu.int8_gemv(x, weight.packed, bias), activation)    # decode on CPU
                except Exception:
                    warnings.warn(f"the CPU int8 kernel failed to build ({_gemv_cpu._failed}); int8 weights are "
                                  "dequantized at every call from now on", RuntimeWarning, stacklevel=2)
            if weight.q.device.type == "cpu":
                return activate(weight.matmul_cpu(x, bias), activation)
            weight = weight.dequantize(x.dtype)
        return activate(F.linear(x, weight, bias), activation)

    def rope(self, q, k, cos, sin, positions, style, rotary_dim):
        """q [B, T, Hq, D], k [B, T, Hkv, D]; positions [B, T]."""
        c, s = self._rope_rows(cos, sin, positions, style)
        if q.dtype == k.dtype and q.shape[-1] == k.shape[-1]:
            # q and k rotate with the same angles: one pass over both heads, then split (same math per element)
            qk = _rotate(torch.cat([q, k], dim=2), c, s, style, rotary_dim, expanded=True)
            return qk.split([q.shape[2], k.shape[2]], dim=2)
        return (_rotate(q, c, s, style, rotary_dim, expanded=True),
                _rotate(k, c, s, style, rotary_dim, expanded=True))

    def _rope_rows(self, cos, sin, positions, style):
        """cos/sin at these positions, shaped (B, T, 1, rot) for neox or (B, T, 1, rot/2) for gptj. Every layer of
        a forward passes the same positions tensor: gathered once per forward (see begin_forward), not per layer."""
        memo = getattr(self, "_rope_memo", None)
        if memo is not None and memo[0] is positions and memo[1] is cos and memo[2] is sin and memo[3] == style:
            return memo[4], memo[5]
        c, s = cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)      # (B, T, 1, rot/2)
        if style == "neox":
            c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)
        self._rope_memo = (positions, cos, sin, style, c, s)
        return c, s

    def decode_append(self, q, k, v, k_cache, v_cache, pos_t, cos, sin, style, rotary_dim, qk_norm=None,
                      ring=False, v_norm=None):
        """One new token per sequence at position pos_t (device tensor [1]): rotate q and k (cos None: no RoPE),
        write k and v into the caches [B, Hkv, S_max, D] there (ring: at row pos_t % S_max); returns q [B, Hq, D].
        qk_norm: (q weight, k weight, eps, norm kind, q bias, k bias) to normalise each q and k head first (Qwen3;
        the biases: Persimmon), or None. v_norm: (weight, eps) to RMS-normalise each v head (Gemma 4), or None."""
        if v_norm is not None:
            v = self.add_norm(v, None, v_norm[0], None, v_norm[1], "rms")[0]
        if qk_norm is not None:
            q = self.add_norm(q, None, qk_norm[0], qk_norm[4], qk_norm[2], qk_norm[3])[0]
            k = self.add_norm(k, None, qk_norm[1], qk_norm[5], qk_norm[2], qk_norm[3])[0]
        if cos is not None:
            q, k = self.rope(q, k, cos, sin, pos_t.view(1, 1).expand(q.shape[0], 1), style, rotary_dim)
        row = pos_t % k_cache.shape[2] if ring else pos_t
        k_cache.index_copy_(2, row, k.transpose(1, 2))
        v_cache.index_copy_(2, row, v.transpose(1, 2))
        return q[:, 0]

    def begin_forward(self):
        """A new forward: positions may be a tensor seen before, with new contents."""
        self._rope_memo = None

    def attention(self, q, k, v, scale, causal, alibi_slopes=None, key_padding_mask=None, window=0, softcap=0.0,
                  sinks=None, chunk=0, bias=None):
        """bias [Hq, T, S] (or [B, Hq, T, S]): added to the scores, already scaled (MPNet's and T5's relative
        positions, DeBERTa's position terms). window: a query at position p sees keys p - window < j <= p, or
        without `causal` (an encoder's local layers, ModernBERT) p - window < j < p + window (0: no window).
        softcap: scores become softcap * tanh(score / softcap) before masking (0: none). sinks [Hq]: a logit per
        head that joins each softmax's denominator and nothing else (GPT-OSS). chunk: a query at p sees keys j <= p
        in its own aligned chunk, j // chunk == p // chunk (Llama 4; 0: none)."""
        B, Hq, T, D = q.shape
        S = k.shape[2]
        if window >= S:
            window = 0                          # the window reaches past the first key: it masks nothing
        if chunk >= S:
            chunk = 0                           # every key lies in the first chunk
        gqa = {}
        if Hq != k.shape[1]:
            if _SDPA_GQA and not softcap and sinks is None:
                gqa = {"enable_gqa": True}      # kv heads shared in place, not copied per step
            else:
                rep = Hq // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        plain = (alibi_slopes is None and key_padding_mask is None and not window and not softcap and sinks is None
                 and not chunk and bias is None)
        if causal and T == S and T > 1 and plain:
            # A whole prompt from position 0: sdpa's own causal path, about twice as fast as a mask on CPU
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
        mask = None
        if causal and T == 1 and alibi_slopes is None and not window and not chunk and bias is None:
            pass    # one query at the last position sees every key: the causal mask is all true
        elif causal or alibi_slopes is not None or window or bias is not None:
            qpos = torch.arange(S - T, S, device=q.device).unsqueeze(1)
            kpos = torch.arange(S, device=q.device).unsqueeze(0)
            if alibi_slopes is not None or bias is not None:
                mask = bias.float() if alibi_slopes is None else \
                    alibi_slopes.float().view(Hq, 1, 1) * (kpos - qpos).float()           # (Hq, T, S)
                if causal:
                    mask = mask.masked_fill(kpos > qpos, float("-inf"))
                mask = mask.to(q.dtype)
            else:
                mask = kpos <= qpos if causal else torch.ones(T, S, dtype=torch.bool, device=q.device)
            if chunk:
                mask = mask & (kpos // chunk == qpos // chunk) if mask.dtype == torch.bool else \
                    mask.masked_fill(kpos // chunk != qpos // chunk, float("-inf"))
            if window:
                near = kpos > qpos - window
                if not causal:          # an encoder's window reaches as far after the query as before it
                    near = near & (kpos < qpos + window)
                mask = mask & near if mask.dtype == torch.bool else mask.masked_fill(~near, float("-inf"))
        if key_padding_mask is not None:
            kp = key_padding_mask.bool().view(B, 1, 1, S)
            mask = kp if mask is None else (mask & kp if mask.dtype == torch.bool else
                                            mask.masked_fill(~kp, float("-inf")))
        if softcap or sinks is not None:
            return _explicit_attention(q, k, v, scale, mask, softcap, sinks)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)

    def decode_attention(self, q, k_cache, v_cache, seq_lens, scale, alibi_slopes=None, window=0, softcap=0.0,
                         sinks=None, chunk=0, keep=None, keep_block=0, bias=None):
        """q [B, Hq, D] against the whole static cache, masked by seq_lens: graph-safe, no slicing by length.
        keep [B, Hkv, blocks] (MiniMax-M3): the blocks of keep_block keys each kv head's queries see. bias [Hq, S]:
        added to the scores of each cache row (T5's decoder: its relative bias at the step's position)."""
        B, Hq, D = q.shape
        S = k_cache.shape[2]
        kpos = torch.arange(S, device=q.device)
        valid = kpos.view(1, S) < seq_lens.view(B, 1)                                  # (B, S)
        if window:
            valid = valid & (kpos.view(1, S) >= seq_lens.view(B, 1) - window)
        if chunk:                             # the query (at seq_len - 1) sees its chunk's keys only
            valid = valid & (kpos.view(1, S) >= (seq_lens.view(B, 1) - 1) // chunk * chunk)
        mask = torch.zeros(B, 1, 1, S, dtype=q.dtype, device=q.device).masked_fill(~valid.view(B, 1, 1, S),
                                                                                  float("-inf"))
        if alibi_slopes is not None:
            rel = (kpos.view(1, S) - (seq_lens.view(B, 1) - 1)).to(torch.float32)     # (B, S)
            mask = mask + (alibi_slopes.float().view(1, Hq, 1, 1) * rel.view(B, 1, 1, S)).to(q.dtype)
        if bias is not None:
            mask = mask + bias.to(q.dtype).view(1, Hq, 1, S)
        rep = Hq // k_cache.shape[1]
        k, v = k_cache, v_cache
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if keep is not None:
            seen = keep.bool().repeat_interleave(keep_block, -1)[..., :S].repeat_interleave(rep, 1)     # (B, Hq, S)
            mask = mask.masked_fill(~seen.unsqueeze(2), float("-inf"))
        if softcap or sinks is not None or keep is not None:     # a head that sees no key: zeros, not NaN
            return _explicit_attention(q.unsqueeze(2), k, v, scale, mask, softcap, sinks).squeeze(2)
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale).squeeze(2)

    def mla_decode(self, q, cache, seq_lens, scale, kv_rank, sinks=None):
        """Latent attention's decode step, absorbed: q [B, H, kv_rank + rope] (each head's q_nope already taken into
        the latent space, then its rotated part) against the one-head latent cache [B, 1, S_max, kv_rank + rope],
        first seq_lens[b] rows valid; the values are the rows' first kv_rank columns. Returns [B, H, kv_rank].
        sinks [H] (HY-V4): a logit per head in each softmax's denominator only. Graph-safe: masked by seq_lens,
        never sliced."""
        B, H, D = q.shape
        S = cache.shape[2]
        rows = cache[:, 0]                                    # (B, S, D): one latent head read by every q head
        s = torch.bmm(q.float(), rows.float().transpose(1, 2)) * scale                   # (B, H, S), two matmuls
        valid = torch.arange(S, device=q.device).view(1, 1, S) < seq_lens.view(B, 1, 1)  # in all, no head copies
        s = s.masked_fill(~valid, float("-inf"))
        if sinks is not None:
            p = torch.cat([s, sinks.float().view(1, H, 1).expand(B, H, 1)], -1).softmax(-1)[..., :-1]
            return torch.bmm(p, rows[..., :kv_rank].float()).to(q.dtype)
        p = s.softmax(-1).nan_to_num(0.0)
        return torch.bmm(p, rows[..., :kv_rank].float()).to(q.dtype)


    # -- Gated DeltaNet (a hybrid's linear-attention layers) ----------------------------------------------------
    def causal_conv1d(self, x, weight, bias, state, silu=True):
        """A causal depthwise conv over time, SiLU after. x [B, T, C] (may be a view into a wider projection),
        weight [C, taps], state [B, C, taps - 1]: the inputs before x, oldest first, updated in place to the last
        ones (None: zeros, nothing kept). fp32 math, [B, T, C] in x's dtype."""
        B, T, C = x.shape
        prev = state.to(x.dtype) if state is not None else x.new_zeros(B, C, weight.shape[1] - 1)
        full = torch.cat([prev, x.transpose(1, 2)], dim=-1)                          # (B, C, taps - 1 + T)
        y = F.conv1d(full.float(), weight.float().unsqueeze(1), None if bias is None else bias.float(), groups=C)
        if state is not None:
            state.copy_(full[..., full.shape[-1] - state.shape[-1]:])
        return (F.silu(y) if silu else y).transpose(1, 2).to(x.dtype)

    def gated_rms_norm(self, x, z, weight, eps, group_size=None, gate_first=False, gate="silu"):
        """A linear mixer's output norm over groups of group_size channels (None: the last dim), x, z [..., D].
        Gated DeltaNet: RMS (fp32, rounded to x's dtype) times the weight, times silu(z) in fp32, rounded once
        more. gate_first (Mamba2): x times silu(z) in fp32, then the RMS, rounded to x's dtype, times the weight.
        gate="sigmoid" (KDA): RMS times the weight times sigmoid(z), all in fp32, rounded once."""
        if gate == "sigmoid":
            xf = x.float()
            n = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
            return (n * weight.float() * torch.sigmoid(z.float())).to(x.dtype)
        xf = x.float()
        if gate_first:
            xf = xf * F.silu(z.float())
        g = xf.unflatten(-1, (-1, group_size or x.shape[-1]))
        n = (g * torch.rsqrt(g.square().mean(-1, keepdim=True) + eps)).flatten(-2)
        y = weight * n.to(x.dtype)
        return y if gate_first else (y * F.silu(z.float())).to(x.dtype)

    def ssm_scan(self, x, dt, A, Bm, Cm, D, state):
        """Mamba2's selective scan over T tokens from `state` [B, H, P, N] (fp32, updated in place): x [B, T, H, P],
        dt [B, T, H] fp32 (the final step), A [H] fp32 (negative), Bm, Cm [B, T, G, N] (head h reads group
        h // (H / G)), D [H] fp32 or None. Per token: S = exp(dt A) S + dt x B^T; y = S C + D x. Returns
        [B, T, H, P] in x's dtype. A prompt goes chunk by chunk (`ssm_scan_chunked`)."""
        if x.shape[1] > 1:
            return ssm_scan_chunked(x, dt, A, Bm, Cm, D, state)
        H, G = x.shape[2], Bm.shape[2]
        xf = x[:, 0].float()                                                        # (B, H, P)
        b, c = (t[:, 0].float().repeat_interleave(H // G, dim=1) for t in (Bm, Cm))  # (B, H, N)
        d = dt[:, 0]                                                                # (B, H)
        S = state * torch.exp(d * A)[..., None, None] + (d[..., None] * xf)[..., None] * b[:, :, None, :]
        state.copy_(S)
        y = torch.einsum("bhpn,bhn->bhp", S, c)
        if D is not None:
            y = y + D[:, None] * xf
        return y.unsqueeze(1).to(x.dtype)

    def linear_scan(self, a, x, state):
        """RecurrentGemma's diagonal recurrence from `state` [B, W] (fp32, updated in place): s = a s + x per token,
        returns the states [B, T, W] in x's dtype (kernels/rglru_scan.py)."""
        s, out = state.clone(), torch.empty_like(x)
        for t in range(x.shape[1]):
            s = a[:, t].float() * s + x[:, t].float()
            out[:, t] = s.to(x.dtype)
        state.copy_(s)
        return out

    def mlstm(self, q, k, v, i, f, state, eps):
        """xLSTM's mLSTM over T tokens from `state` (fp32, updated in place; kernels/mlstm.py has the contract). A
        prompt goes chunk by chunk (`mlstm_chunked`: matmuls, not T small steps); a decode step is one token."""
        return mlstm_chunked(q, k, v, i, f, state, eps, chunk=64 if q.shape[1] > 1 else 1)

    def mamba_scan(self, x, dt, A, Bm, Cm, D, z, state, chunk=64):
        """Mamba (1)'s selective scan over T tokens from `state` [B, Dc, N] (fp32, updated in place): x, z [B, T, Dc],
        dt [B, T, Dc] (dt_proj's output, bias included; softplus here), A [Dc, N] fp32 (negative), Bm, Cm [B, T, N]
        (shared by every channel), D [Dc] fp32 or None. Per token: S = exp(dt A) S + dt x B^T; y = (S C + D x) *
        silu(z). Returns [B, T, Dc] in x's dtype. The decays of up to `chunk` tokens are formed at once, the
        recurrence itself is token by token (each channel decays each state at its own rate: no segment sums)."""
        T = x.shape[1]
        ys = []
        for t0 in range(0, T, chunk):
            xs, sl = x[:, t0:t0 + chunk].float(), slice(t0, t0 + chunk)
            d = F.softplus(dt[:, sl].float())                                     # (B, c, Dc)
            dA = torch.exp(d[..., None] * A)                                       # (B, c, Dc, N)
            dBx = (d * xs)[..., None] * Bm[:, sl, None, :].float()
            c = Cm[:, sl].float()
            S, out = state, []
            for i in range(xs.shape[1]):
                S = dA[:, i] * S + dBx[:, i]
                out.append(torch.einsum("bdn,bn->bd", S, c[:, i]))
            state.copy_(S)
            y = torch.stack(out, dim=1)
            if D is not None:
                y = y + D * xs
            if z is not None:
                y = y * F.silu(z[:, sl].float())
            ys.append(y.to(x.dtype))
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)

    def lightning(self, q, k, v, slope, state, chunk: int = 64):
        """MiniMax's lightning attention over T tokens from `state` [B, H, D, D] (fp32, updated in place): q, k, v
        [B, T, H, D], slope [H] fp32. Per token: S = exp(-slope) S + k^T v; o = q S. Returns [B, T, H, D] in v's
        dtype. Chunk by chunk: within a chunk, (q k^T, decayed by distance) v plus q (decayed) times the state it
        started from; then the state advances by the chunk's decayed k^T v. A decode step is a chunk of one."""
        B, T, H, D = q.shape
        qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))      # [B, H, T, D]
        s = slope.float().view(1, H, 1, 1)
        S, out = state, []
        for lo in range(0, T, chunk):
            qc, kc, vc = qf[:, :, lo:lo + chunk], kf[:, :, lo:lo + chunk], vf[:, :, lo:lo + chunk]
            n = qc.shape[2]
            pos = torch.arange(1, n + 1, device=q.device, dtype=torch.float32)
            dist = pos[:, None] - pos[None, :]                                # query i, key j: i - j
            within = torch.where(dist >= 0, torch.exp(-s * dist.clamp(min=0)), 0.0)     # [1, H, n, n]
            o = (qc * torch.exp(-s * pos[:, None])) @ S + ((qc @ kc.transpose(-1, -2)) * within) @ vc
            S = S * torch.exp(-s * n) + (kc * torch.exp(-s * (n - pos)[:, None])).transpose(-1, -2) @ vc
            out.append(o)
        state.copy_(S)
        return torch.cat(out, dim=2).transpose(1, 2).to(v.dtype)

    def gated_delta(self, q, k, v, g, beta, state, scale):
        """The gated delta rule over T tokens from `state` [B, Hv, Dk, Dv] (fp32, updated in place): q, k [B, T, Hk,
        Dk] (L2-normalised here, q then times scale), v [B, T, Hv, Dv], g (log decay) and beta [B, T, Hv] fp32.
        Per token: S = exp(g) S; S += k (beta (v - k^T S))^T; o = q^T S. Returns [B, T, Hv, Dv] in v's dtype.
        A prompt goes chunk by chunk (`gated_delta_chunked`: matmuls, not T small steps). KDA's g [B, T, Hv, Dk]
        decays each key row of S by its own factor; it runs token by token."""
        if g.dim() == 4:             # KDA: a decay per key channel, g [B, T, Hv, Dk]; token by token
            return torch.cat([self._delta_step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], g[:, i:i + 1, ..., None],
                                               beta[:, i:i + 1], state, scale) for i in range(q.shape[1])], dim=1)
        if q.shape[1] > 1:
            return gated_delta_chunked(q, k, v, g, beta, state, scale)
        return self._delta_step(q, k, v, g[..., None, None], beta, state, scale)

    @staticmethod
    def _delta_step(q, k, v, g, beta, state, scale):
        """One token of the gated delta rule; g [B, 1, Hv, Dk or 1, 1] broadcasts over the state's [Dk, Dv]."""
        B, _, Hk, _ = q.shape
        Hv = v.shape[2]
        qf, kf = (_l2norm(x[:, 0].float()) for x in (q, k))
        qf, kf = (x.repeat_interleave(Hv // Hk, dim=1) for x in (qf, kf))     # (B, Hv, Dk)
        S = state * g[:, 0].exp()
        u = beta[:, 0, :, None] * (v[:, 0].float() - torch.einsum("bhk,bhkv->bhv", kf, S))
        S = S + kf[..., None] * u[..., None, :]
        state.copy_(S)
        return torch.einsum("bhk,bhkv->bhv", qf * scale, S).unsqueeze(1).to(v.dtype)


# e^-80 ~ 2e-35: decays below it are taken as 0. Left in, the subnormal values they turn into make CPU matmuls
# several times slower, for terms that are far below fp32's resolution of the sums they join.
_MIN_EXPONENT = -80.0


def _exp_floor(v):
    return v.masked_fill(v < _MIN_EXPONENT, float("-inf")).exp()


def ssm_scan_chunked(x, dt, A, Bm, Cm, D, state, chunk=64) -> torch.Tensor:
    """The Mamba2 scan (see kernels.selective_scan) chunk by chunk, in fp32; same arguments and results as
    `kernels.ssm_scan_reference` in a few matmuls per chunk of C tokens. With a_t = dt_t A (<= 0), gamma_t its
    cumulative sum from the chunk start and S0 the state there, unrolling gives

        S_t = e^gamma_t S0 + sum_{s<=t} e^(gamma_t - gamma_s) dt_s x_s B_s^T
        y_t = e^gamma_t S0 C_t + sum_{s<=t} e^(gamma_t - gamma_s) (C_t.B_s) dt_s x_s + D x_t

    The second term is a causal attention with the decay mask L[t, s] = e^(a_{s+1} + ... + a_t) (a segment sum),
    computed for every chunk at once; only the state hand-off from chunk to chunk runs in sequence. Every exponent
    is <= 0, so nothing overflows. T is padded to a multiple of chunk (a prompt of T <= chunk is one chunk of T
    tokens); state is updated in place."""
    Bsz, T, H, P = x.shape
    G, N = Bm.shape[2:]
    if chunk < 1 or G == 0 or H % G:
        raise ValueError(f"chunk must be >= 1 and the heads a multiple of the groups, got chunk={chunk}, {H} heads "
                         f"and {G} groups")
    R = H // G
    C = max(1, min(int(chunk), T))
    NC = -(-T // C)
    pad = NC * C - T
    xf = x.float()
    # Padded tokens have dt = 0: they decay nothing and write nothing.
    dtf = F.pad(dt.float(), (0, 0, 0, pad))                                                 # [B, NC * C, H]
    xdt = (F.pad(xf, (0, 0, 0, 0, 0, pad)) * dtf[..., None]).view(Bsz, NC, C, G, R, P)
    # Heads split as (G, R): a group's B and C serve its R heads, so their products are computed once a group
    # and the state's matmuls run on [R * P, N] blocks.
    Bf, Cf = (F.pad(t.float(), (0, 0, 0, 0, 0, pad)).view(Bsz, NC, C, G, N).permute(0, 3, 1, 2, 4)
              for t in (Bm, Cm))                                                            # [B, G, NC, C, N]
    a = (dtf * A.float()).view(Bsz, NC, C, G, R).permute(0, 3, 4, 1, 2)                   # [B, G, R, NC, C]

    gam = a.cumsum(-1)                                                    # log decay since the chunk start
    # seg[t, s] = a_{s+1} + ... + a_t, summed directly rather than as gamma_t - gamma_s, which would lose the
    # small differences of a long, strongly decaying chunk; -inf above the diagonal, so exp gives the causal mask.
    strict = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1)
    seg = a[..., :, None].expand(*a.shape, C).masked_fill(~strict, 0.0).cumsum(-2)
    causal = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()
    L = _exp_floor(seg.masked_fill(~causal, float("-inf")))                                    # [B, G, R, NC, C, C]
    scores = (Cf @ Bf.transpose(-1, -2))[:, :, None]                                     # [B, G, 1, NC, C, C]
    y = (scores * L) @ xdt.permute(0, 3, 4, 1, 2, 5)                                     # [B, G, R, NC, C, P]
    y = y.permute(0, 3, 4, 1, 2, 5).contiguous()                                         # [B, NC, C, G, R, P]
    # Writes decayed to the chunk end, laid out [B, G, NC, R * P, C] for one matmul with B a chunk.
    x_out = xdt * _exp_floor(gam[..., -1:] - gam).permute(0, 3, 4, 1, 2)[..., None]
    x_out = x_out.permute(0, 3, 1, 4, 5, 2).reshape(Bsz, G, NC, R * P, C)
    c_in = _exp_floor(gam).permute(0, 3, 4, 1, 2)[..., None]                   # reads S0 decayed to token t
    chunk_decay = _exp_floor(gam[..., -1])[..., None, None]                     # [B, G, R, NC, 1, 1]

    S = state.float().reshape(Bsz, G, R, P, N)
    for n in range(NC):
        y_in = (Cf[:, :, n] @ S.reshape(Bsz, G, R * P, N).transpose(-1, -2)).view(Bsz, G, C, R, P)
        y[:, n] += c_in[:, n] * y_in.transpose(1, 2)                                     # [B, C, G, R, P]
        S = S * chunk_decay[:, :, :, n] + (x_out[:, :, n] @ Bf[:, :, n]).view(Bsz, G, R, P, N)
    state.copy_(S.reshape(Bsz, H, P, N))
    y = y.view(Bsz, NC * C, H, P)[:, :T]
    if D is not None:
        y = y + D.float()[:, None] * xf
    return y.to(x.dtype, memory_format=torch.contiguous_format)


def _l2norm(x):
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + 1e-6)


def mlstm_chunked(q, k, v, i, f, state, eps, chunk=64) -> torch.Tensor:
    """xLSTM's mLSTM (kernels/mlstm.py's recurrence) chunk by chunk, in fp32. With b_t the cumulative logsigmoid(f)
    from a chunk's start and (C0, n0, m0) the state there, unrolling gives each token's stabilizer
    m_t = max(b_t + m0, max_{s<=t} i_s + b_t - b_s) (what the recurrence's running max is), and
    C_t = e^(b_t + m0 - m_t) C0 + sum_{s<=t} e^(i_s + b_t - b_s - m_t) k_s v_s^T (n_t likewise with k_s): so a
    chunk's outputs are a masked [C, C] weight matrix times its values plus the state's share, and the state moves to
    the chunk's end in one step. Every exponent is <= 0. state [B, H, dk + 1, dv + 1] is updated in place."""
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))          # [B, H, T, d]
    ig, lf = i.float().transpose(1, 2), F.logsigmoid(f.float()).transpose(1, 2)      # [B, H, T]
    qf = qf * DK ** -0.5
    C, n, m = state[..., :DK, :DV].clone(), state[..., :DK, DV].clone(), state[..., DK, 0].clone()
    out = []
    for lo in range(0, T, chunk):
        qc, kc, vc = qf[:, :, lo:lo + chunk], kf[:, :, lo:lo + chunk], vf[:, :, lo:lo + chunk]
        b = lf[:, :, lo:lo + chunk].cumsum(-1)                                        # [B, H, c]
        a = ig[:, :, lo:lo + chunk] - b                                             # i_s - b_s
        c = b.shape[-1]
        causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        logw = (b[..., :, None] + a[..., None, :]).masked_fill(~causal, float("-inf"))    # [B, H, t, s]
        mt = torch.maximum(b + m[..., None], logw.amax(-1))                         # [B, H, c]
        w = torch.exp(logw - mt[..., None])
        old = torch.exp(b + m[..., None] - mt)                                      # the state's share
        scores = (qc @ kc.transpose(-1, -2)) * w
        num = scores @ vc + old[..., None] * (qc @ C)
        qn = scores.sum(-1) + old * (qc @ n[..., None])[..., 0]
        den = torch.maximum(qn.abs(), torch.exp(-mt)) + eps
        out.append(num / den[..., None])
        mend = mt[..., -1]                                                          # the chunk's last stabilizer
        decay = torch.exp(b[..., -1:] + a - mend[..., None])                        # [B, H, c]
        carry = torch.exp(b[..., -1] + m - mend)
        C = carry[..., None, None] * C + (kc * decay[..., None]).transpose(-1, -2) @ vc
        n = carry[..., None] * n + (kc * decay[..., None]).sum(-2)
        m = mend
    state[..., :DK, :DV] = C
    state[..., :DK, DV] = n
    state[..., DK, 0] = m
    return torch.cat(out, 2).transpose(1, 2).to(v.dtype)


def gated_delta_chunked(q, k, v, g, beta, state, scale, chunk=64) -> torch.Tensor:
    """The gated delta rule (see TorchOps.gated_delta) chunk by chunk, in fp32: the torch backend's prompt path,
    equal to the token-by-token recurrence (`kernels.gated_delta_reference`) in a few matmuls per chunk of C
    tokens. Inside a chunk, with gamma_t the cumulative sum of g from its start and S0 the state there, unrolling
    gives S_t = e^gamma_t S0 + sum_{s<=t} e^(gamma_t - gamma_s) k_s u_s^T, so the C deltas solve one unit lower
    triangular system (I + A) U = beta V - beta e^gamma K S0 with A[t, s] = beta_t e^(gamma_t - gamma_s) k_t.k_s
    (s < t). Its solution is U = Uv - W S0 with Uv and W independent of S0: every chunk solves at once, and only
    a few matmuls per chunk stay sequential. Every exponent is <= 0, so nothing overflows. T is padded to a
    multiple of chunk (a prompt of T <= chunk is one chunk of T tokens); state is updated in place."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    if chunk < 1 or Hv % Hk:
        raise ValueError(f"chunk must be >= 1 and the value heads a multiple of the key heads, got chunk={chunk}, "
                         f"{Hv} and {Hk} heads")
    G = Hv // Hk
    C = max(1, min(int(chunk), T))
    N = -(-T // C)
    pad = N * C - T
    qf, kf = _l2norm(q.float()) * scale, _l2norm(k.float())
    # Padded tokens have k = v = 0, beta = 0 and g = 0: they write nothing and decay nothing.
    qf, kf, vf = (torch.nn.functional.pad(t.float(), (0, 0, 0, 0, 0, pad)) for t in (qf, kf, v))
    g, beta = (torch.nn.functional.pad(t.float(), (0, 0, 0, pad)) for t in (g, beta))
    # Heads split as (Hk, G): a key head's q.k and k.k products are computed once for its G value heads.
    qf, kf = (t.view(B, N, C, Hk, 1, Dk).permute(0, 3, 4, 1, 2, 5) for t in (qf, kf))       # [B, Hk, 1, N, C, Dk]
    vf = vf.view(B, N, C, Hk, G, Dv).permute(0, 3, 4, 1, 2, 5)                             # [B, Hk, G, N, C, Dv]
    g, beta = (t.view(B, N, C, Hk, G).permute(0, 3, 4, 1, 2) for t in (g, beta))           # [B, Hk, G, N, C]

    gam = g.cumsum(-1)                                                   # log decay since the chunk start
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[t, s] = e^(gamma_t - gamma_s) for s <= t, else 0 (masked before the exp, where it would be > 0).
    decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(~causal, float("-inf")).exp()   # [.., C, C]
    # Strictly lower A; the unitriangular solve takes the diagonal as 1, i.e. solves with I + A.
    A = ((kf @ kf.transpose(-1, -2)) * decay * beta[..., :, None]).tril(-1)
    # One solve for both right-hand sides: U = Uv - W S0, with Uv = (I + A)^-1 beta V, W = (I + A)^-1 beta e^gamma K.
    rhs = torch.cat([vf * beta[..., None], kf * (beta * gam.exp())[..., None]], -1)
    X = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    Uv, W = X[..., :Dv], X[..., Dv:]
    attn = (qf @ kf.transpose(-1, -2)) * decay                            # [B, Hk, G, N, C, C], causal
    q_in = qf * gam.exp()[..., None]                                      # reads S0 decayed to token t
    k_out = kf * (gam[..., -1:] - gam).exp()[..., None]                   # writes decayed to the chunk end
    chunk_decay = gam[..., -1].exp()[..., None, None]                     # [B, Hk, G, N, 1, 1]

    S = state.float().reshape(B, Hk, G, Dk, Dv)
    o = torch.empty(B, Hk, G, N, C, Dv, dtype=torch.float32, device=v.device)
    for n in range(N):
        U = Uv[:, :, :, n] - W[:, :, :, n] @ S                                               # [B, Hk, G, C, Dv]
        o[:, :, :, n] = q_in[:, :, :, n] @ S + attn[:, :, :, n] @ U
        S = S * chunk_decay[:, :, :, n] + k_out[:, :, :, n].transpose(-1, -2) @ U
    state.copy_(S.reshape(B, Hv, Dk, Dv))
    o = o.reshape(B, Hv, N * C, Dv)[:, :, :T].transpose(1, 2)
    return o.to(v.dtype, memory_format=torch.contiguous_format)


def _explicit_attention(q, k, v, scale, mask, cap, sinks):
    """Attention in fp32 with what sdpa has no hook for: Gemma 2's soft-capped scores (cap > 0), GPT-OSS's sinks
    (a logit per head [H] that joins the softmax's denominator, then is dropped). q [B, H, T, D], k and v
    [B, H, S, D]; mask bool (True = attend) or additive, broadcastable to [B, H, T, S]."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if cap:
        s = torch.tanh(s / cap) * cap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    if sinks is None:
        return torch.matmul(s.softmax(-1).nan_to_num(0.0), v.float()).to(q.dtype)
    sink = sinks.float().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
    p = torch.cat([s, sink], dim=-1).softmax(-1)[..., :-1]
    return torch.matmul(p, v.float()).to(q.dtype)


def _rotate(x, c, s, style, rotary_dim, expanded=False):
    """expanded: c, s already hold [c, c] for neox (see TorchOps._rope_rows)."""
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    if style == "neox":
        x1, x2 = rot.chunk(2, dim=-1)
        c2, s2 = (c, s) if expanded else (torch.cat([c, c], -1), torch.cat([s, s], -1))
        out = rot * c2 + torch.cat([-x2, x1], -1) * s2
    else:  # gptj: interleaved pairs
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
    out = out.to(x.dtype)
    return out if rest.shape[-1] == 0 else torch.cat([out, rest], -1)


class TritonOps(TorchOps):
    """Kernels from fmconvert.kernels where they exist. Float matmuls go to cuBLAS, except at decode, where cuBLAS and
    the float GEMV kernel are timed once per shape on the card and the faster is kept."""

    name = "triton"

    def __init__(self):
        from .. import kernels
        from ..kernels.float_linear import DECODE_MAX_M
        self.k = kernels
        self._gemv_choice: dict = {}
        self._gemv_max_m = DECODE_MAX_M

    def add_norm(self, x, residual, weight, bias, eps, kind, pre_weight=None, x_scale=1.0, gain=None):
        return self.k.add_norm(x.contiguous(), None if residual is None else residual.contiguous(), weight, bias,
                               eps, kind, pre_weight=pre_weight, x_scale=x_scale, gain=gain)

    def linear(self, x, weight, bias=None, activation=None):
        if isinstance(activation, tuple) and activation[0] == "xielu":    # no kernel epilogue: applied after
            return activate(self.linear(x, weight, bias), activation)
        if isinstance(weight, Int8Weight):
            return self.k.int8_linear(x, weight.q, weight.scale, weight.group_size, bias=bias, activation=activation)
        if self._use_float_gemv(x, weight, bias, activation):
            return self.k.float_gemv(x, weight, bias, activation)
        return self._cublas_linear(x, weight, bias, activation)

    def _cublas_linear(self, x, weight, bias, activation):
        if activation in ("swiglu", "geglu", "geglu_erf", "reglu2") or isinstance(activation, tuple):
            return self.k.gated(F.linear(x, weight, bias), activation)   # cuBLAS, then one kernel (torch: several)
        return super().linear(x, weight, bias, activation)

    def _use_float_gemv(self, x, weight, bias, activation) -> bool:
        """Whether a float linear of a few rows goes to kernels/float_linear.py rather than cuBLAS: whichever ran faster
        for this shape when both were timed here (cold L2, no launch overhead). Timed at the first call outside a
        CUDA graph capture (GraphDecoder's warm-up steps); a capture that comes first takes cuBLAS.
        FMCONVERT_FLOAT_GEMV=cublas or =triton skips the timing (benchmarks, tests)."""
        mode = os.environ.get("FMCONVERT_FLOAT_GEMV", "auto")
        if (mode == "cublas" or type(weight) is not torch.Tensor or weight.dim() != 2 or not weight.is_floating_point()
                or weight.dtype == torch.float64 or x.dtype == torch.float64 or not weight.shape[1]
                or not x.numel() or not weight.shape[0] or x.numel() > self._gemv_max_m * weight.shape[1]):
            return False
        if mode == "triton":
            return True
        key = (x.numel() // weight.shape[1], tuple(weight.shape), weight.dtype, x.dtype, repr(activation),
               bias is not None, x.device)
        choice = self._gemv_choice.get(key)
        if choice is None:
            choice = self._time_float_gemv(x, weight, bias, activation)
            if choice is None:          # cannot be timed here: cuBLAS this time, timed at a later call
                return False
            self._gemv_choice[key] = choice
        return choice

    def timed_choices(self) -> str:
        """The decode-step kernel choices timed so far in this process, for `generate`'s summary ("" before any)."""
        from ..kernels.int8_matmul import _DECODE_CHOICE
        parts = []
        if self._gemv_choice:
            n = sum(self._gemv_choice.values())
            total = len(self._gemv_choice)
            parts.append(f"float GEMV on {n} of {total} shapes, cuBLAS on {total - n}")
        if _DECODE_CHOICE:
            n = sum(v == "gemm" for v in _DECODE_CHOICE.values())
            parts.append(f"int8 tensor-core GEMM on {n} of {len(_DECODE_CHOICE)} shapes, GEMV on "
                         f"{len(_DECODE_CHOICE) - n}")
        return "; ".join(parts)

    def _time_float_gemv(self, x, weight, bias, activation):
        """True when the float GEMV ran faster than cuBLAS on this call's shape and agreed with it; None off CUDA or
        inside a capture."""
        if not x.is_cuda or torch.cuda.is_current_stream_capturing():
            return None
        from ..kernels.float_linear import gpu_ms
        return self._float_gemv_wins(x, weight, bias, activation, gpu_ms)

    def _float_gemv_wins(self, x, weight, bias, activation, time_ms) -> bool:
        from ..kernels._common import candidate_wins
        return candidate_wins(lambda: self._cublas_linear(x, weight, bias, activation),
                              lambda: self.k.float_gemv(x, weight, bias, activation), time_ms)

    def rope(self, q, k, cos, sin, positions, style, rotary_dim):
        return self.k.apply_rope(q, k, cos, sin, positions, style=style, rotary_dim=rotary_dim)

    # One fused launch for RoPE and both cache writes in a decode step; False selects the three-kernel path
    # (benchmarks/gpu_check.py times both in one run).
    fuse_decode_append = True

    def decode_append(self, q, k, v, k_cache, v_cache, pos_t, cos, sin, style, rotary_dim, qk_norm=None,
                      ring=False, v_norm=None):
        fusable_norm = qk_norm is None or (qk_norm[3] in ("rms", "rms_fp32", "rms_plus_one") and cos is not None
                                           and qk_norm[4] is None)
        fusable_norm = fusable_norm and (v_norm is None or qk_norm is None or v_norm[1] == qk_norm[2])  # one eps
        if not self.fuse_decode_append or not fusable_norm:
            return super().decode_append(q, k, v, k_cache, v_cache, pos_t, cos, sin, style, rotary_dim, qk_norm,
                                         ring, v_norm)
        norms = {}
        if v_norm is not None:                   # Gemma 4: v heads normed too
            norms.update(v_norm=v_norm[0], eps=v_norm[1])
        if qk_norm is not None:
            norms.update(q_norm=qk_norm[0], k_norm=qk_norm[1], eps=qk_norm[2], plus_one=qk_norm[3] == "rms_plus_one")
        return self.k.rope_append(q, k, v, k_cache, v_cache, pos_t, cos, sin, style or "neox", rotary_dim,
                                  ring=ring, **norms)

    def attention(self, q, k, v, scale, causal, alibi_slopes=None, key_padding_mask=None, window=0, softcap=0.0,
                  sinks=None, chunk=0, bias=None):
        if chunk >= k.shape[2]:
            chunk = 0
        if (window and not causal) or bias is not None:
            # an encoder's two-sided window (ModernBERT), or a score bias (MPNet): the kernels' windows are causal
            # and they take no bias, so a mask through SDPA
            if window < k.shape[2] or bias is not None:
                return super().attention(q, k, v, scale, causal, alibi_slopes, key_padding_mask, window, softcap,
                                         sinks, chunk, bias)
            window = 0                  # it reaches every key
        if (q.is_cuda and alibi_slopes is None and key_padding_mask is None and q.shape[2] == k.shape[2]
                and not window and not softcap and sinks is None and not chunk):
            # Plain causal prefill goes to torch SDPA (flash attention); gpu_kernels.py times it against ours.
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        return self.k.prefill_attention(q, k, v, scale, causal=causal, alibi_slopes=alibi_slopes,
                                        key_padding_mask=key_padding_mask, window=window, softcap=softcap,
                                        sinks=sinks, chunk=chunk)

    def decode_attention(self, q, k_cache, v_cache, seq_lens, scale, alibi_slopes=None, window=0, softcap=0.0,
                         sinks=None, chunk=0, keep=None, keep_block=0, bias=None):
        if bias is not None:        # T5's decoder: the kernel takes no bias; torch's graph-safe step does
            return super().decode_attention(q, k_cache, v_cache, seq_lens, scale, alibi_slopes, window, softcap,
                                            sinks, chunk, keep, keep_block, bias)
        return self.k.decode_attention(q, k_cache, v_cache, seq_lens, scale, alibi_slopes=alibi_slopes,
                                       window=window, softcap=softcap, sinks=sinks, chunk=chunk, keep=keep,
                                       keep_block=keep_block)

    def mla_decode(self, q, cache, seq_lens, scale, kv_rank, sinks=None):
        return self.k.mla_decode(q, cache, seq_lens, scale, kv_rank, sinks=sinks)

    def causal_conv1d(self, x, weight, bias, state, silu=True):
        return self.k.causal_conv1d(x, weight, bias, state, silu=silu)

    def gated_rms_norm(self, x, z, weight, eps, group_size=None, gate_first=False, gate="silu"):
        return self.k.gated_rms_norm(x, z, weight, eps, group_size=group_size, gate_first=gate_first, gate=gate)

    def ssm_scan(self, x, dt, A, Bm, Cm, D, state):
        return self.k.ssm_scan(x, dt, A, Bm, Cm, D, state)

    def mamba_scan(self, x, dt, A, Bm, Cm, D, z, state):
        return self.k.mamba_scan(x, dt, A, Bm, Cm, D, z, state)

    def linear_scan(self, a, x, state):
        return self.k.linear_scan(a.contiguous(), x.contiguous(), state)

    def mlstm(self, q, k, v, i, f, state, eps):
        return self.k.mlstm_scan(q, k, v, i, f, state, eps)

    def gated_delta(self, q, k, v, g, beta, state, scale):
        return self.k.gated_delta(q, k, v, g, beta, state, scale)

    def expert_linear(self, x, stacked, n_experts: int, experts, x_every: int, activation, bias=None):
        """Rows of (token, expert) pairs from one [E * N, K] stack, int8 (an Int8Weight) or float; the expert ids
        stay on the device. bias: [E, N] or None."""
        if not isinstance(stacked, Int8Weight):
            return self.k.expert_linear(x, stacked.view(n_experts, -1, stacked.shape[1]), experts, x_every,
                                        activation, bias=bias)
        q, s = stacked.q, stacked.scale
        return self.k.int8_expert_linear(x, q.view(n_experts, -1, q.shape[1]), s.view(n_experts, -1, s.shape[1]),
                                         stacked.group_size, experts, x_every, activation, bias=bias)


def make_ops(backend: str, device: torch.device):
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _triton_ok() else "torch"
    if backend == "torch":
        return TorchOps()
    if backend == "triton":
        return TritonOps()
    raise ValueError(f"unknown backend {backend!r} (auto, torch, triton)")


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False
