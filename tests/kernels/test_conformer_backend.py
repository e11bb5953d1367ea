"""Wav2Vec2-Conformer and Wav2Vec2-BERT on the Triton backend (interpreter on CPU, kernels on CUDA) against the torch
backend: the linears and norms through the kernels, the rotation, the relative terms and the conv module in torch."""

import pytest
import torch

from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backends_agree(tmp_path, hf, int8: bool, shape: tuple, real: int):
    """hf's weights nudged off their init, saved and converted; its last hidden state for random inputs of this
    shape (the second row padded from `real` on) on the Triton backend within 1e-3 of the torch backend's (relative
    to its largest)."""
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    convert(tmp_path / "src", out, Options(int8=int8, group_size=16), progress=False)
    x = torch.randn(shape)
    mask = torch.ones(shape[:2], dtype=torch.long)
    mask[1, real:] = 0
    want = load(out, device="cpu", backend="torch", dequantize=True)(x, attention_mask=mask)[0]
    got = load(out, device=DEVICE, backend="triton")(x.to(DEVICE), attention_mask=mask.to(DEVICE))[0].cpu()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3


@pytest.mark.parametrize("position,int8", [("rotary", False), ("relative", True)])
def test_conformer_on_the_triton_backend(tmp_path, position, int8):
    import transformers
    torch.manual_seed(0)
    config = transformers.Wav2Vec2ConformerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, conv_dim=(16, 16),
        conv_kernel=(10, 3), conv_stride=(5, 2), conv_depthwise_kernel_size=5, feat_extract_norm="layer",
        position_embeddings_type=position, vocab_size=12)
    backends_agree(tmp_path, transformers.Wav2Vec2ConformerModel(config).eval(), int8, (2, 800), 500)


def test_wav2vec2_bert_on_the_triton_backend(tmp_path):
    """Wav2Vec2-BERT's feature rows, relative_key bias, causal conv module and its LayerNorm, in torch beside the
    kernels, int8."""
    import transformers
    torch.manual_seed(0)
    config = transformers.Wav2Vec2BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, conv_depthwise_kernel_size=5,
        left_max_position_embeddings=3, right_max_position_embeddings=2)     # vocab_size null, as w2v-bert-2.0's
    backends_agree(tmp_path, transformers.Wav2Vec2BertModel(config).eval(), True, (2, 9, 160), 6)
