"""A whole converted model on the Triton backend (interpreter on CPU, kernels on CUDA) against the torch backend."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fmconvert.pipeline import Options, convert
from fmconvert.runtime.generate import generate
from fmconvert.runtime.load import load

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name,int8", [("llama", True), ("gpt2", False), ("bloom", True), ("gptj", True),
                                       ("gemma", False), ("qwen3", False), ("falcon_new", True),
                                       ("mixtral", True), ("gemma2", False), ("gemma3", True),
                                       ("qwen2_moe", True), ("gpt_bigcode", False), ("olmo2", True),
                                       ("gpt_oss", True), ("gpt_oss", False), ("glm4_moe", True),
                                       ("arcee", True), ("nemotron", True), ("apertus", True),
                                       ("deepseek_v3", True), ("deepseek_v2", False), ("llama4", True),
                                       ("qwen3_5", True), ("qwen3_next", False), ("granite_hybrid", True),
                                       ("nemotron_h", True), ("bamba", False), ("youtu", False),
                                       ("mellum", True), ("jamba", True), ("mamba", False), ("kimi_linear", True),
                                       ("gemma4", True), ("gemma4_moe", True), ("modernbert_decoder", True),
                                       ("olmo_hybrid", True), ("mistral4", True), ("gemma4_e2b", True),
                                       ("codegen", False), ("gemma4_unified", True),
                                       ("bitnet", True), ("laguna", True),
                                       ("mimo_v2_flash", True), ("beam", True), ("falcon_h1", True),
                                       ("bailing_hybrid", True), ("longcat_flash", True),
                                       ("minimax", True), ("hy_v4", True), ("minimax_m3", True), ("aria_text", True),
                                       ("axk2", True), ("deepseek_v4", True), ("gemma3n", True),
                                       ("recurrent_gemma", True), ("qwen4_exp", True),
                                       ("jetmoe", True), ("zamba2", True),
                                       ("diffllama", True), ("xlstm", True), ("doge", True),
                                       ("dots3_note", True)])
def test_triton_backend_matches_torch_backend(model_dir, tmp_path, name, int8):
    out = tmp_path / "out"
    convert(model_dir(name), out, Options(tp=1, int8=int8, group_size=32), progress=False)
    ref = load(out, device="cpu", backend="torch", dequantize=True)
    tri = load(out, device=DEVICE, backend="triton")
    ids = torch.randint(3, 100, (1, 6))
    want = ref(ids)
    got = tri(ids.to(DEVICE)).cpu()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3
    a, _ = generate(ref, ids, max_new_tokens=5)
    b, _ = generate(tri, ids.to(DEVICE), max_new_tokens=5)   # CUDA: replayed from a CUDA graph
    assert a.tolist() == b.cpu().tolist()


# The unfused decode step (RoPE kernel, then torch cache writes) shares its kernels with prefill, which every family
# runs; these families cover its cases (GQA, learned and no positions, windows, q/k norms), the rest run fused only.
# Families whose decode step adds no kernel feature over one listed here (BioGPT over GPT-2, StableLM over Phi, OLMo 1
# over LLaMA with a norm weight of ones) are left to the torch-backend tests, to keep the interpreter's time down.
UNFUSED_TOO = ("mistral", "gpt2", "gemma2", "hunyuan")


def _decode_steps(model, ids, start, steps):
    """Logits of model.decode_step (the graph-safe step) for tokens ids[:, start:start + steps], after an eager
    prefill of ids[:, :start]."""
    cache = model.new_cache(ids.shape[0], start + steps)
    model(ids[:, :start], cache)
    out = []
    for j in range(start, start + steps):
        out.append(model.decode_step(ids[:, j:j + 1], cache, torch.tensor([cache.length], device=ids.device)))
        cache.length += 1
    return torch.stack(out).cpu()


@pytest.mark.parametrize("name,int8", [("llama", True), ("mistral", False), ("gpt2", False), ("bloom", True),
                                       ("gptneox", False), ("phi", True),
                                       ("gemma", True), ("qwen3", True), ("mixtral", True), ("gemma2", True),
                                       ("gemma3", False), ("starcoder2", True), ("granite", True),
                                       ("cohere", False), ("cohere_qk", True), ("olmoe", True),
                                       ("glm4", True), ("gpt_oss", True), ("glm4_moe", True), ("hunyuan", True),
                                       ("ministral3", False), ("deepseek_v2", False), ("llama4", False),
                                       ("qwen3_5", True), ("qwen3_5_moe", False), ("granite_hybrid_dense", True),
                                       ("nemotron_h_dense", False), ("lfm2", True),
                                       ("falcon_mamba", True), ("mamba2", False), ("persimmon", False),
                                       ("gemma4", True), ("lfm3", False), ("modernbert_decoder", False),
                                           ("olmo_hybrid", False), ("mistral4", True), ("gemma4_e2b", True),
                                       ("laguna", True), ("mimo_v2_flash", False),
                                       ("beam", False), ("falcon_h1", False), ("bailing_hybrid", False),
                                       ("longcat_flash", False), ("minimax", False), ("hy_v4", False),
                                       ("minimax_m3", False), ("axk2", False), ("aria_text", False),
                                       ("deepseek_v4", False), ("gemma3n", False),
                                       ("recurrent_gemma", False), ("qwen4_exp", False),
                                       ("jetmoe", True), ("zamba2", False),
                                       ("diffllama", False), ("xlstm", False), ("doge", False),
                                       ("dots3_note", False)])
def test_triton_decode_step_matches_torch_backend(model_dir, tmp_path, name, int8):
    """The fused rope + KV-append decode step (RoPE, learned positions, ALiBi; GQA in mistral; windows, soft caps
    and a second RoPE in Gemma 2/3, decoded past the window) against the torch backend's, with the fusion on (and
    off for UNFUSED_TOO)."""
    out = tmp_path / "out"
    convert(model_dir(name), out, Options(tp=1, int8=int8, group_size=32), progress=False)
    ref = load(out, device="cpu", backend="torch", dequantize=True)
    tri = load(out, device=DEVICE, backend="triton", dequantize=False)     # int8 weights stay on the Triton path
    ids = torch.randint(3, 100, (2, 7))
    want = _decode_steps(ref, ids, 4, 3)
    for fuse in (True, False) if name in UNFUSED_TOO else (True,):
        tri.ops.fuse_decode_append = fuse
        got = _decode_steps(tri, ids.to(DEVICE), 4, 3)
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3, fuse


@pytest.mark.parametrize("name,int8", [("deepseek_v32", True), ("glm_moe_dsa", False)])
def test_triton_backend_sparse_attention_matches_torch_backend(model_dir, tmp_path, name, int8):
    """DeepSeek Sparse Attention with the indexer picking 6 keys of up to 12: a prompt (masked attention), then
    graph-safe decode steps, whose absorbed latent attention kernel reads the chosen cache rows gathered."""
    out = tmp_path / "out"
    convert(model_dir(name, index_topk=6), out, Options(tp=1, int8=int8, group_size=32), progress=False)
    ref = load(out, device="cpu", backend="torch", dequantize=True)
    tri = load(out, device=DEVICE, backend="triton", dequantize=False)
    ids = torch.randint(3, 100, (2, 12))
    want = ref(ids)
    assert ((tri(ids.to(DEVICE)).cpu() - want).abs().max() / want.abs().max()).item() < 1e-3
    want = _decode_steps(ref, ids, 8, 4)
    got = _decode_steps(tri, ids.to(DEVICE), 8, 4)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3


def test_triton_decode_step_crosses_the_longrope_switch(model_dir, tmp_path):
    """LongRoPE's per-step table (short rows, then long ones) read by the fused rope + KV-append kernel, decoding
    from position 14 to 18 across the switch at 16."""
    import tiny
    out = tmp_path / "out"
    convert(model_dir("phi3", **tiny.LONGROPE), out, Options(tp=1, int8=True, group_size=32), progress=False)
    ref = load(out, device="cpu", backend="torch", dequantize=True)
    tri = load(out, device=DEVICE, backend="triton", dequantize=False)
    ids = torch.randint(3, 100, (1, 18))
    want = _decode_steps(ref, ids, 14, 4)
    got = _decode_steps(tri, ids.to(DEVICE), 14, 4)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "glm4_moe", "nemotron_h",
                                  "laguna", "mimo_v2_flash"])
def test_int8_experts_are_routed_on_the_device(model_dir, tmp_path, name):
    """Int8 and float experts on the Triton backend: a decode step's experts run as two launches over (token,
    expert) pairs whose ids never leave the device, so the step is graph-safe; the torch backend, and int8 experts
    dequantized at load, route on the host and say so."""
    from fmconvert.runtime.model import _decode_graph_safe
    out, fout = tmp_path / "int8", tmp_path / "float"
    convert(model_dir(name), out, Options(tp=1, int8=True, group_size=32), progress=False)
    convert(model_dir(name), fout, Options(tp=1), progress=False)
    assert not _decode_graph_safe(load(out, device="cpu", backend="torch"))
    assert not _decode_graph_safe(load(out, device=DEVICE, backend="triton", dequantize=True))
    for tri in (load(out, device=DEVICE, backend="triton", dequantize=False),
                load(fout, device=DEVICE, backend="triton")):
        blk = next(b for b in tri.blocks if "router.weight" in b.t)      # GLM-4.5's first layer is dense
        assert _decode_graph_safe(tri) and blk.device_routed(2)
        assert not blk.device_routed(1000)                           # a long prompt: each expert once, host-routed
        h = torch.randn(2, 1, tri.spec["hidden_size"], device=DEVICE)
        device_side = blk.experts(h)
        blk.device_routed = lambda tokens: False                      # the host-routed path on the same weights
        assert ((device_side - blk.experts(h)).abs().max() / device_side.abs().max()).item() < 1e-3


class _LaunchCounter(TorchDispatchMode):
    """Counts kernel launches: every Triton launch, and every torch op that is not a view or an allocation."""

    def __init__(self):
        super().__init__()
        self.torch_ops, self.triton, self._inside = [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # The interpreter moves a kernel's tensors with torch ops of its own: those are not launches.
        if not (self._inside or func.is_view or name.startswith("empty") or name in ("lift_fresh", "detach")):
            self.torch_ops.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        import triton.runtime.jit as jit

        self._patched = []
        classes = [jit.JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction
            classes.append(InterpretedFunction)
        except ImportError:
            pass
        for cls in classes:
            orig = cls.run

            def run(fn_self, *a, _orig=orig, **k):
                if not k.get("warmup") and not self._inside:
                    self.triton += 1
                self._inside += 1
                try:
                    return _orig(fn_self, *a, **k)
                finally:
                    self._inside -= 1
            cls.run = run
            self._patched.append((cls, orig))
        return super().__enter__()

    def __exit__(self, *exc):
        for cls, orig in self._patched:
            cls.run = orig
        return super().__exit__(*exc)


@pytest.mark.parametrize("family,max_len", [("llama", 8), ("llama", 100), ("qwen3", 100), ("gemma3", 100),
                                            ("gemma4", 100)])
def test_int8_decode_step_launches_eight_or_nine_kernels_per_layer(model_dir, tmp_path, monkeypatch, family,
                                                                   max_len):
    """A graph-captured decode step costs about one launch gap per kernel, so the count per layer is part of
    the design: add+norm, QKV, rope+append, attention, out, add+norm, gate|up+SwiGLU, down; plus the merge of
    the attention's split-K partials when the cache is split (a long cache at small batch). Qwen3's per-head
    q/k norms ride in the rope+append launch; Gemma 3's output norms ride in the next add+norm (its windowed
    layers decode past their window here too). Gemma 4's v norms ride in the rope+append launch too, and its
    scalar on the stream in the next add+norm; its global layers are wider, with one kv head."""
    from fmconvert.kernels import decode_attention_workspace, int8_matmul
    # On CUDA a tiny layer's few rows would take the split-K GEMV (zeroed buffer + epilogue); 7B-sized layers do not.
    monkeypatch.setattr(int8_matmul, "_pick_split", lambda *a: 1)
    # A float lm_head (Gemma's tied embedding) goes to cuBLAS or the float GEMV by a timing made per model: on an
    # H100 the 2- and 4-layer models once chose differently, one launch apart. Pin it (the CPU takes cuBLAS anyway).
    monkeypatch.setenv("FMCONVERT_FLOAT_GEMV", "cublas")
    counts = {}
    for layers in (2, 4):
        out = tmp_path / f"out{layers}"
        kinds = {"layer_types": ["sliding_attention", "full_attention"] * (layers // 2)}
        convert(model_dir(family, num_hidden_layers=layers, **(kinds if family.startswith("gemma") else {})), out,
                Options(tp=1, int8=True, group_size=32), progress=False)
        m = load(out, device=DEVICE, backend="triton", dequantize=False)
        ids = torch.randint(3, 100, (1, 5), device=DEVICE)
        cache = m.new_cache(1, max_len)
        m(ids, cache)
        pos = torch.tensor([cache.length], device=DEVICE)
        m.decode_step(ids[:, :1], cache, pos)            # warm-up: compiles, autotunes
        with _LaunchCounter() as c:
            m.decode_step(ids[:, :1], cache, pos)
        counts[layers] = c

    def splits(k_cache):
        return decode_attention_workspace(torch.empty(1, m.heads, k_cache.shape[-1], device=DEVICE),
                                          k_cache).shape[2]
    if DEVICE == "cpu":                                   # the interpreter's chunks are 32 keys: both paths run
        assert splits(cache.k[1]) == (1 if max_len == 8 else 4)
    if family.startswith("gemma"):                        # windowed layers keep a 4-row ring: never split
        assert cache.ring == [4, 0, 4, 0] and splits(cache.k[2]) == 1
    want = sum(8 + (splits(k) > 1) for k in cache.k[2:])  # the two layers the larger model adds
    assert counts[4].triton - counts[2].triton == want, (counts[4].triton, counts[2].triton, counts[4].torch_ops)
    assert len(counts[4].torch_ops) == len(counts[2].torch_ops), counts[4].torch_ops
    # Once per step: the sequence lengths (pos + 1, and clamped to each ring size), the embedding gather (and
    # Gemma's scale of it) and the lm_head matmul (and Gemma 4's soft cap on the logits: three ops).
    capped = 3 * bool(m.spec["logit_softcap"])
    assert len(counts[2].torch_ops) <= 4 + family.startswith("gemma") + capped, str(counts[2].torch_ops)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_float_decode_through_the_float_gemv(model_dir, tmp_path, monkeypatch, name):
    """Float weights at decode through kernels/float_linear.py (FMCONVERT_FLOAT_GEMV=triton: what the runtime keeps
    where the GEMV times faster than cuBLAS): SwiGLU fused in LLaMA, biases and GeLU in GPT-2."""
    import fmconvert.kernels.float_linear as fl

    out = tmp_path / "out"
    convert(model_dir(name), out, Options(tp=1, int8=False), progress=False)
    ref = load(out, device="cpu", backend="torch")
    tri = load(out, device=DEVICE, backend="triton")
    ids = torch.randint(3, 100, (2, 7))
    want = _decode_steps(ref, ids, 4, 3)
    seen = []
    real = fl.float_gemv
    monkeypatch.setattr(fl, "float_gemv", lambda *a, **kw: seen.append(kw.get("activation", a[3:4])) or real(*a, **kw))
    monkeypatch.setenv("FMCONVERT_FLOAT_GEMV", "triton")
    got = _decode_steps(tri, ids.to(DEVICE), 4, 3)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3
    assert len(seen) >= 3 * 2 * len(tri.blocks)          # every decode step's projections and MLP, at least
