"""The `fmconvert` command line: convert, inspect, verify, generate, transcribe, embed.

Every failure the user can act on prints one line (`error: ...`) and exits non-zero; no tracebacks unless
FMCONVERT_DEBUG=1.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click

from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_IO, FmError
from .policy import audio_front


def _console(stderr: bool = False):
    from rich.console import Console
    return Console(stderr=stderr, highlight=False)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="fmconvert")
def cli():
    """Turn a Hugging Face checkpoint into a fused, tensor-parallel, int8 serving checkpoint.

    \b
    Typical session:
      fmconvert convert --tp 2 --int8 MODEL_DIR OUT_DIR   # offline, on a CPU
      fmconvert inspect OUT_DIR                            # what was written, and the int8 error per tensor
      fmconvert verify MODEL_DIR OUT_DIR                   # numerical parity with the original
      fmconvert generate OUT_DIR --prompt "Once upon a time"
      fmconvert transcribe OUT_DIR talk.wav                # Whisper: speech to text
      torchrun --nproc-per-node 2 -m fmconvert generate OUT_DIR --prompt "..."   # tp=2

    \b
    Supported families (one table each in fmconvert/configs/, listed in its README.md), among them:
      LLaMA 1-3 / Mistral / Qwen2, Qwen3, Phi-3 / Phi-4-mini, Gemma 1-4, Granite, Cohere, OLMo 1-3, GLM-4,
      EXAONE 3 / 4, SmolLM3, StableLM, StarCoder2, Nemotron, Apertus, Hunyuan, ERNIE 4.5, BitNet
      mixtures: Mixtral, DBRX, Qwen2/3-MoE, OLMoE, GLM-4.5, DeepSeek-V2/V3, Kimi K2, Mistral 4, GPT-OSS, Llama 4,
        MiniMax-M2 / M3, Laguna, MiMo-V2-Flash, Beam,
        DeepSeek-V3.2, GLM-5, HY-V4, A.X K1 / K2, Sarvam-30B / 105B, LongCat-Flash
      hybrids and state spaces: Qwen3.5, Qwen3-Next, OLMo Hybrid, Granite 4.0-H, Nemotron-H, Jamba, LFM2, LFM3,
        Falcon-H1, Kimi Linear, Ling 2.5 hybrids, MiniMax-Text-01 / M1, Mamba 1/2
      older: GPT-2, GPT-BigCode, OPT, BLOOM, MPT, Falcon, GPT-NeoX, GPT-J, CodeGen, GPT-Neo, Phi,
        ModernBERT's decoder
      encoder-decoders: T5 / Flan-T5 / mT5 / UMT5, BART / mBART, Marian, Pegasus, M2M100 / NLLB, Blenderbot;
        speech (fmconvert transcribe): Whisper
      encoders (fmconvert embed, classify): BERT, RoBERTa, XLM-RoBERTa (and XL), CamemBERT, data2vec-text,
        ELECTRA, ALBERT, DistilBERT, ModernBERT, MPNet, DeBERTa-v2/v3, NomicBERT, GTE, EuroBERT, Jina v3; the text
        encoders of diffusion models: CLIP's and T5's
      vision-language, language model only: Gemma 3/4, LLaVA, Mistral 3, Llama 4, Qwen2/2.5/3/3.5-VL, GLM-4.5V,
        MiniMax-M3, Aria
    An unknown architecture is refused with the list of known ones; one looked at and not served (Inkling), with why.
    """


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--tp", default=1, show_default=True, help="Tensor-parallel ranks. Must divide the attention heads; "
              "kv heads are replicated when tp exceeds them.")
@click.option("--int8", is_flag=True, help="Quantize the linear weights to int8, symmetric, one scale per group: "
              "every layer's projections (attention, MLP, experts, latent attention's) and an untied lm_head.")
@click.option("--group-size", type=int, default=None,
              help="int8 group width along the input dim (power of two). Default: 128, or the largest power of "
                   "two below it that divides every input width (GPT-OSS's 2880: 64). A rank whose K is narrower "
                   "uses the largest power of two that fits.")
@click.option("--int8-embeddings", is_flag=True,
              help="Also quantize the embedding table (and with it a tied lm_head), the per-layer table of "
                   "Gemma 4 E2B/E4B and Gemma 3n, and Qwen4-Exp's n-gram tables (tens of GB each in bf16).")
@click.option("--int8-lm-head/--no-int8-lm-head", default=True, show_default=True,
              help="Under --int8, quantize an untied lm_head as well. Each decoded token reads all of it.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
              help="Float dtype of the output; auto keeps config.json's dtype (or the stored one).")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest shard file, e.g. 500MB, 2GB.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin, loaded with weights_only=True.")
@click.option("--source-sha256", is_flag=True, help="Record the full sha256 of every source weight file in the "
              "manifest (reads the source once more). By default only its size and header are fingerprinted.")
@click.option("--dry-run", is_flag=True, help="Check MODEL_DIR against its family table with these options and "
              "size the output (each rank's bytes and files), from config.json and the safetensors headers alone: "
              "no weight is read and nothing is written. Takes seconds for any model size.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def convert(model_dir, out_dir, tp, int8, group_size, int8_embeddings, int8_lm_head, dtype, max_shard_size, force,
            allow_pickle, source_sha256, dry_run, quiet):
    """Convert MODEL_DIR (config.json + safetensors) into OUT_DIR.

    OUT_DIR gets one set of safetensors shards per rank, manifest.json (the contract the runtime reads), and the
    tokenizer and generation config. It appears atomically: a failed or interrupted run leaves nothing.

    MODEL_DIR may hold a float checkpoint, a block-scaled FP8 release (DeepSeek-V3, Kimi K2, Qwen3-FP8; DeepSeek-V4
    with its FP4 experts), GPT-OSS's MXFP4 experts, or 4-bit GPTQ / AWQ weights: those are decoded to float as they
    are read. `fmconvert inspect
    OUT_DIR` shows what was written.
    """
    if source_sha256:
        from . import srchash
        srchash.start(model_dir)  # hash the source while torch and transformers import (convert takes it over)
    import gc
    gc.disable()        # importing torch makes ~10^6 objects that all stay: collecting meanwhile finds nothing
    from .pipeline import Options, convert as run
    gc.freeze()         # and later collections skip them
    gc.enable()
    err = _console(stderr=True)
    s = run(model_dir, out_dir, Options(tp=tp, int8=int8, group_size=group_size, dtype=dtype,
                                        max_shard_size=max_shard_size, force=force, allow_pickle=allow_pickle,
                                        int8_embeddings=int8_embeddings, int8_lm_head=int8_lm_head,
                                        source_sha256=source_sha256, dry_run=dry_run),
            progress=not quiet, console=err)
    if quiet:
        return
    from rich.table import Table
    title = (f"dry run: {s['architecture']} ({s['family']} table) -> {out_dir}, nothing written" if dry_run
             else f"converted {s['architecture']} -> {out_dir}")
    t = Table(title=title, show_header=False)
    t.add_row("parameters", f"{s['params'] / 1e6:.2f} M")
    if s.get("encoder"):
        t.add_row("encoder-decoder", f"the decoder, and its encoder ({s['encoder']}) in encoder/")
    g = s.get("groups")            # a dry run names the int8 groups it would use
    group = (f", groups of {g[0]}" if len(g) == 1 else f", groups of {g[0]} to {g[-1]}") if g else ""
    t.add_row("tp / int8 / dtype", f"{s['tp']} / {'yes' if s['int8'] else 'no'}{group} / {s['dtype']}")
    ratio = s["bytes_in"] / max(s["bytes_out"], 1)     # a GPTQ source decoded to float grows
    t.add_row("bytes in -> out", f"{_human(s['bytes_in'])} -> {_human(s['bytes_out'])} "
              f"({f'{ratio:.2f}x smaller' if ratio >= 1 else f'{1 / ratio:.2f}x larger'})")
    if dry_run:
        t.add_row("each rank", ", ".join(_human(b) for b in s["rank_bytes"]) + f" in {s['files']} files")
        if s["kv_cache"] is not None:
            t.add_row("KV cache a rank", _kv_text(*s["kv_cache"]))
        if s.get("source_kv"):
            t.add_row("source keys a rank", f"{_human(s['source_kv'])} a source token (cross-attention)")
    else:
        t.add_row("files", str(s["files"]))
        t.add_row("time", f"{s['seconds']:.2f} s  ({s['mb_per_s']:.1f} MB/s read)")
        if s["worst_sqnr_db"] is not None:
            t.add_row("worst int8 SQNR", f"{s['worst_sqnr_db']:.1f} dB")
        if s["mxfp4"]:
            t.add_row("MXFP4", f"{s['mxfp4']} expert tensors decoded on read (exactly, to bf16)")
        if s.get("fp8"):
            t.add_row("FP8", f"{s['fp8']} block-scaled tensors decoded on read (to bf16)"
                      + (f"; {s['fp4']} E2M1 expert tensors too (exactly)" if s.get("fp4") else ""))
        if s.get("int4"):
            t.add_row("4-bit", f"{s['int4']} GPTQ / AWQ tensors decoded on read")
    if s["dropped"] is not None:
        t.add_row("left out", f"{s['dropped']['tensors']} {_DROPPED[s['dropped'].get('what', 'vision')]}"
                  f" ({_human(s['dropped']['bytes'])})")
    _console().print(t)


def _kv_text(full: int, windowed: int, window: int) -> str:
    """manifest.kv_cache_bytes in words: what a served sequence costs one rank per token."""
    if not full and not windowed:
        return "none (fixed-size states only)"
    text = f"{_human(full)} a token" if full else ""
    if windowed:
        text += (", plus " if text else "") + f"{_human(windowed)} a token up to {window} tokens (windowed layers)"
    return text


# What a conversion left out of the source, by source.dropped's `what` (absent in older manifests: vision).
_DROPPED = {"vision": "vision tensors: the language model alone was converted",
            "mtp": "multi-token-prediction tensors (a training aid transformers leaves out too)",
            "copies": "copies of shared blocks (each block is read once, from the first layer that runs it)"}


def _local_rope(pos: dict) -> str:
    """The windowed layers' own RoPE, where they have one (Gemma 3, Laguna)."""
    local = pos.get("local")
    if not local:
        return ""
    kind = f" {local['rope_type']}" if local.get("rope_type", "default") != "default" else ""
    dims = f", {local['rotary_dim']} dims" if local.get("rotary_dim", pos["rotary_dim"]) != pos["rotary_dim"] else ""
    return f"; windowed layers: theta {local['theta']:g}{kind}{dims}"


def _layers(ls: list) -> str:
    return ("layers " if len(ls) > 1 else "layer ") + _ranges(ls)


def _ranges(xs: list[int]) -> str:
    """[0, 2, 3, 4, 9] -> "0, 2-4, 9"."""
    runs: list[list[int]] = []
    for x in xs:
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON (round-trips exactly).")
def inspect(out_dir, as_json):
    """Show what a converted OUT_DIR holds: model, layout, files, and int8 error per tensor."""
    from . import manifest as mf
    m = mf.read(out_dir)
    if as_json:
        click.echo(mf.dumps(m), nl=False)
        return
    from rich.markup import escape
    from rich.table import Table
    con = _console()
    md, par, q = m["model"], m["parallel"], m["quantization"]
    t = Table(title=f"{escape(str(out_dir))}  (fmconvert format v{m['format_version']}, tool {m['tool_version']})",
              show_header=False)
    t.add_row("architecture", f"{md['architecture']} ({md['family']}, {md['kind']})")
    if m["source"].get("mxfp4"):
        t.add_row("source", f"MXFP4: {len(m['source']['mxfp4'])} expert tensors decoded to bf16 on read")
    if m["source"].get("fp8"):
        f = m["source"]["fp8"]
        t.add_row("source", f"FP8: {f['tensors']} tensors with {f['block'][0]}x{f['block'][1]} block scales, "
                            "decoded to bf16 on read")
    if m["source"].get("int4"):
        f = m["source"]["int4"]
        t.add_row("source", f"{f['method'].upper()}: {f['tensors']} 4-bit tensors decoded to float on read")
    if m["source"].get("dropped"):
        d = m["source"]["dropped"]
        t.add_row("left out", f"{d['tensors']} {_DROPPED[d.get('what', 'vision')]} ({_human(d['bytes'])})")
    heads = ("/".join(map(str, sorted(set(md["layer_heads"])))) + " heads by layer" if md["layer_heads"]
             else f"{md['num_heads']} heads")
    vhead = (f", v heads {md['v_head_dim']} wide (padded to {md['head_dim']} in the cache)" if md["v_head_dim"]
             else "") + (f", v times {md['value_scale']:g}" if md["value_scale"] != 1.0 else "")
    shared = md.get("shared_blocks")            # Zamba2: attention and an MLP in its shared blocks
    attention = (f"{heads} / {md['num_kv_heads']} kv, head_dim {md['head_dim']}{vhead}"
                 if len(md["linear_layers"] or ()) < md["num_layers"] or shared else "no attention")
    mlp = (f"mlp {md['intermediate_size']} ({md['activation']})" if "mlp" in (md["block_parts"] or ["mlp"]) or shared
           else "no MLP")
    t.add_row("shape", f"{md['num_layers']} layers, hidden {md['hidden_size']}, {attention}, {mlp}")
    if md["kind"] == "decoder":
        size = {"float32": 4, "float16": 2, "bfloat16": 2}[m["dtype"]]
        t.add_row("KV cache a rank", _kv_text(*mf.kv_cache_bytes(md, m["parallel"], size)))
        if md.get("encoder"):
            t.add_row("source keys a rank", f"{_human(mf.source_kv_bytes(md, m['parallel'], size))} a source token "
                      f"(cross-attention)")
    if md["mla"]:
        a = md["mla"]
        qpath = f"q through a rank-{a['q_rank']} bottleneck" if a["q_rank"] else "q straight from the hidden state"
        if a.get("gated_q"):
            qpath += " (read normed and raw; each head's output gated by a sigmoid from the same projection)"
        rotated = "rotated" if md["position"]["type"] == "rope" else "unrotated"
        t.add_row("latent attention", f"{qpath}; k, v from one {a['kv_rank']}-wide latent per token + a shared "
                  f"{a['rope_dim']}-dim {rotated} key (cached: {a['kv_rank'] + a['rope_dim']} values a token and "
                  f"layer); k {a['nope_dim']}+{a['rope_dim']}, v {a['v_dim']} a head" + (
                      f"; latents times {a['q_scale']:.4g} (q) and {a['kv_scale']:.4g} (kv)" if "q_scale" in a else ""))
        lo = a.get("local")
        if lo:           # Dots3 Note: the windowed layers' own latent attention
            t.add_row("windowed latent attention",
                      f"layers {_ranges(md['window_layers'])}: {lo['heads']} heads, q through a rank-{lo['q_rank']} "
                      f"bottleneck, a {lo['kv_rank']}-wide latent + a {lo['rope_dim']}-dim key (cached: "
                      f"{lo['kv_rank'] + lo['rope_dim']} values a token in a ring of the window); k "
                      f"{lo['nope_dim']}+{lo['rope_dim']}, v {lo['v_dim']} a head")
        ix = a.get("index")
        if ix:
            where = ("every layer" if len(ix["layers"]) == md["num_layers"] else f"layers {_ranges(ix['layers'])}"
                     + (" (the windowed ones have none)" if lo else
                        " (the others reuse the choice of the last one before them)"))
            rope = {"neox": "rotate-half", "gptj": "interleaved"}[ix["rope_style"]] + (
                " on its last columns" if ix.get("rope_at") == "last" else "")
            t.add_row("sparse attention", f"each query attends to its {ix['topk']} best-scored keys, picked by an "
                      f"indexer of {ix['heads']} heads of {ix['dim']} ({rope} RoPE; float, replicated; one "
                      f"{ix['dim']}-wide key cached a token) in {where}")
    cp = md.get("compressed")
    if cp:
        ix = cp["index"] or {}
        kinds = [f"layers {_ranges(cp[k + '_layers'])} {what}" for k, what in (
            ("csa", f"attend to the top {ix.get('topk')} entries (of {cp['rates'].get('csa')} tokens each) an "
                    f"indexer of {ix.get('heads')} heads of {ix.get('dim')} picks (float, replicated)"),
            ("hca", f"attend to every entry (of {cp['rates'].get('hca')} tokens each)")) if cp[k + "_layers"]]
        t.add_row("compressed attention", f"one key (= value) head of {md['head_dim']} ({cp['rope_dim']} rotated, "
                  f"turned back on the output), a {md['sliding_window']}-token window in every layer; "
                  + "; ".join(kinds) + f"; output through {cp['o_groups']} groups of rank {cp['o_rank']}")
    bsp = md.get("block_sparse")
    if bsp:
        t.add_row("sparse attention", f"block-sparse in layers {_ranges(bsp['layers'])}: each kv group's queries "
                  f"attend to their {bsp['topk']} best blocks of {bsp['block']} keys (the latest {bsp['local']} "
                  f"always among them), picked by an indexer of {bsp['heads']} heads of {bsp['dim']} (float, "
                  f"replicated; one {bsp['dim']}-wide key cached a token)")
    lp = md.get("loop")
    if lp:          # HRM-Text: two stacks' blocks run in turn, stored once, a KV cache per run
        P = lp["stack_layers"]
        t.add_row("loop", f"two stacks of {P} blocks (weights stored once), {lp['h_cycles']} times over: the low-level "
                  f"stack {lp['l_cycles']} times, then the high-level one; {md['num_layers']} block runs, each with its "
                  f"own KV cache")
    dm = md.get("dyn_mask")
    if dm:
        t.add_row("attention", f"dynamic mask: each key's scores plus exp(A softplus(dt_proj(its values))) per kv "
                  f"head, a query keeping the {dm['keep_window']} keys of largest bias (each key's bias cached "
                  f"beside it)")
    if md.get("diff_attn"):
        t.add_row("attention", "differential: each head's attention minus lambda times its partner's in the other "
                  "half, over both halves' values, RMS-normed per pair (run as plain attention over heads twice as "
                  "wide: the KV cache is twice a plain one's)")
    dis = md.get("disentangled")
    if dis:
        terms = " and ".join(t for t, on in (("content-to-position", dis["c2p"]), ("position-to-content", dis["p2c"]))
                             if on)
        t.add_row("attention", f"disentangled (DeBERTa): {terms} terms over {2 * dis['span']} relative embeddings"
                  + (f", offsets log-bucketed past {dis['buckets'] // 2}" if dis["buckets"] else ""))
    if md.get("rel_bias"):
        rb = md["rel_bias"]
        who = "T5" if md["family"].startswith("t5") else \
            "WavLM: gated per layer, head and query" if md["family"] == "wavlm" else "MPNet"
        t.add_row("attention", f"a relative-position bias per head ({who}): {rb['buckets']} buckets up to "
                  f"{rb['max_distance']} positions"
                  + (", over earlier keys" if rb.get("causal") else "")
                  + (", a table per layer" if rb.get("per_layer") else ""))
    if md.get("encoder"):
        try:
            em = mf.read(Path(out_dir) / md["encoder"])["model"]
            what = f"{em['architecture']}: {em['num_layers']} layers, hidden {em['hidden_size']}"
            if em["audio_mels"]:        # Whisper: speech in, through two convs
                what += (f"; audio in: {em['audio_mels']} log-mel bins x {2 * em['max_positions']} frames, two "
                         f"convs to {em['max_positions']} positions")
        except FmError as e:
            what = f"unreadable ({e})"
        t.add_row("encoder-decoder", f"every layer cross-attends to the encoder's output ({md['encoder']}/, {what}); "
                  f"decoding starts from token {md['decoder_start_token_id']}")
    wave = md.get("wave")
    if wave:            # Wav2Vec2: the raw waveform through a conv stack
        from .runtime.ctc import ratio
        norm = "a GroupNorm on the first" if wave["norm"] == "group" else "a LayerNorm after each"
        t.add_row("audio in", f"16 kHz waveform through {len(wave['conv_dim'])} convs ({norm}; {wave['act']}) to a "
                  f"{wave['conv_dim'][-1]}-wide frame every {ratio(wave)} samples "
                  f"({ratio(wave) / 16:g} ms), projected to {md['hidden_size']}; positions from "
                  + (f"the Conformer blocks' attention ({md['conformer']['position']})" if wave.get("pos_conv") is False
                     else f"{wave['pos_layers']} grouped convs, each LayerNormed" if wave.get("pos_layers") else
                     "a weight-normed grouped conv")
                  + ("" if wave.get("pos_conv") is False else
                     f" (kernel {wave['pos_kernel']}, {wave['pos_groups']} groups)"))
    elif md.get("features"):        # Wav2Vec2-BERT: the feature extractor's rows
        from .runtime.ctc import ratio
        t.add_row("audio in", f"16 kHz audio as {md['features']['dim']}-wide feature rows (SeamlessM4T's fbank), "
                  f"a frame every {ratio(md['features'])} samples, LayerNormed and projected to {md['hidden_size']}; "
                  f"positions from the Conformer blocks' attention ({md['conformer']['position']})")
        if md.get("adapter"):
            ad = md["adapter"]
            t.add_row("adapter", f"{ad['layers']} layer{'s' * (ad['layers'] > 1)} after the blocks, each a strided "
                      f"conv (kernel {ad['kernel']}, stride {ad['stride']}) then attention and a feed-forward at width "
                      f"{ad['width']}: a frame every {ratio(audio_front(md))} samples")
    head = md.get("classifier")
    if head:
        steps = ", ".join(f"{s['name']}{'' if s['act'] == 'none' else ' + ' + s['act']}" for s in head["steps"])
        pool = {"first": "first token's state", "pooler": "pooler output", "mean": "mean of the tokens",
                "tokens": "state of every token", "spans": "state of every token",
                "late": "state of every token (the logits then averaged)"}.get(head["pool"], "")
        what = ": a start and an end logit each" if head["pool"] == "spans" else ""
        ctc = bool(wave) and md["architecture"].endswith("ForCTC")
        verb = "answer" if head["pool"] == "spans" else "transcribe" if ctc else \
            "embed --audio" if head["pool"] == "xvector" else "classify --audio" if wave else "classify"
        if wave:
            pool = "state of every frame (CTC: a character each)" if ctc else \
                {"tokens": "state of every frame (labels each)", "mean": "mean of the real frames",
                 "xvector": ""}[head["pool"]]
        if head["pool"] == "xvector":      # a speaker embedding: steps, TDNN layers, statistics, steps
            first, *rest = [s["name"] for s in head["steps"]]
            pool, steps = f"frames through {first} and {len(head['tdnn'])} TDNN layers (kernel x dilation " + \
                ", ".join(f"{t['kernel']}x{t['dilation']}" for t in head["tdnn"]) + \
                "), their mean and standard deviation", ", ".join(rest) + ": a speaker embedding"
        if head.get("layer_sum"):
            pool += ", every layer's weighted by softmax(layer_weights)"
        t.add_row("classifier", f"the {pool}, then {steps}{what} (passthrough tensors; `fmconvert {verb}`)")
    if md["headless"]:
        t.add_row("head", "none: saved without its untied lm_head (an embedding model's body); hidden states only, "
                  "for `fmconvert embed`")
    if md["kind"] == "encoder" or md["headless"]:
        from .runtime.embed import sentence_config
        try:
            st = sentence_config(out_dir)
        except FmError as e:
            st, why = None, str(e)
        else:
            why = None
        if st is not None or why:
            t.add_row("sentence-transformers", escape(why) if why else f"{' + '.join(st.modes)} pooling"
                      + "".join(f", Dense {w.shape[1]} -> {w.shape[0]} ({act})" for w, _, act in st.dense)
                      + (", normalised" if st.normalize else "")
                      + (f", at most {st.max_length} tokens" if st.max_length else "")
                      + (f", prompts: {', '.join(st.prompts)}" if st.prompts else "") + " (`fmconvert embed`)")
    sb = md.get("shared_blocks")
    if sb:
        hybrid = [i for i, p in enumerate(md["block_parts"]) if p == "hybrid"]
        t.add_row("shared blocks", f"{sb['count']} transformer block(s), stored once, run in layers {_ranges(hybrid)} "
                  f"on the stream beside the embeddings ({md['attn_input']} wide), each layer with its own rank-"
                  f"{sb['rank']} adapters{' (q|k|v and MLP)' if sb['qkv_lora'] else ' (MLP)'}, feeding its Mamba2 "
                  f"layer's input")
    moa = md.get("moa")
    if moa:
        t.add_row("attention experts", f"each token's top {moa['top_k']} of {moa['experts']} experts give each of the "
                  f"{md['num_kv_heads']} kv heads a query (its q projection), attending over one shared k and v; "
                  f"each expert's own output projection, weighted by the router")
    qs = md.get("qsa")
    if qs:
        t.add_row("sparse attention", f"QSA in every attention layer: each query attends to its "
                  f"{qs['budget'] // qs['rate']} best complete blocks of {qs['rate']} keys and the keys past them, "
                  f"a block's key the mean of its keys, picked by an indexer of {qs['heads']} heads of {qs['dim']} "
                  f"(float, replicated; one {qs['dim']}-wide key cached a token)")
    ng = md.get("ngram")
    if ng:
        heads = (ng["size"] - 1) * ng["heads"]
        rows = sum(tab["rows"] for tab in ng["tables"].values())
        t.add_row("n-gram embeddings", f"before layers {_ranges(ng['layers'])}: 2- to {ng['size']}-grams of token ids, "
                  f"{ng['heads']} hashed heads each, {heads} rows of {ng['dim'] // heads} a token side by side; "
                  f"{rows:,} rows in all, split along their width over ranks (float)")
    if md["linear_attn"]:
        a, n = md["linear_attn"], len(md["linear_layers"])
        kind = "KDA (a decay per key channel)" if a.get("decay") == "channel" else "Gated DeltaNet"
        t.add_row("linear attention", f"{kind} in {n} of {md['num_layers']} layers ("
                  f"{_ranges(md['linear_layers'])}): {a['v_heads']} value heads of {a['v_dim']} over {a['k_heads']} "
                  f"q/k heads of {a['k_dim']}, conv {a['conv_kernel']}; a fixed-size state per layer and sequence "
                  f"({a['v_heads'] * a['k_dim'] * a['v_dim']} fp32 values), no KV cache")
    if md.get("mlstm"):
        a = md["mlstm"]
        t.add_row("linear attention", f"mLSTM in every layer: {a['heads']} heads, q/k {a['qk_dim'] // a['heads']} and "
                  f"v {a['v_dim'] // a['heads']} wide, exponential gates soft-capped at {a['gate_cap']:g}; a "
                  f"fixed-size state per layer and sequence ({a['qk_dim'] * a['v_dim'] // a['heads']} fp32 values "
                  f"and more), no KV cache")
    if md.get("rglru"):
        rg, n = md["rglru"], len(md["linear_layers"])
        t.add_row("linear attention", f"RG-LRU in {n} of {md['num_layers']} layers ({_ranges(md['linear_layers'])}): "
                  f"{rg['width']} channels in {rg['heads']} gated heads, conv {rg['conv_kernel']}; a fixed-size state "
                  f"per layer and sequence ({rg['width']} fp32 values), no KV cache")
    if md["lightning"]:
        n, w = len(md["linear_layers"]), md["head_dim"]
        t.add_row("linear attention", f"lightning attention in {n} of {md['num_layers']} layers "
                  f"({_ranges(md['linear_layers'])}): {md['num_heads']} heads of {w}, each state decaying by a "
                  f"constant per head and layer; a fixed-size state per layer and sequence "
                  f"({md['num_heads'] * w * w} fp32 values), no KV cache")
    if md["ssm"]:
        a, n = md["ssm"], len(md["linear_layers"])
        clamp = f", dt clamped to [{a['dt_min']:g}, {a['dt_max']:g}]" if a["dt_max"] is not None else ""
        gate = {"norm_first": ", normed then gated", "none": ", gated without a norm"}.get(a.get("gate"), "")
        beside = md["ssm_beside_attention"]
        t.add_row("state space", f"Mamba2 in {n} of {md['num_layers']} layers ({_ranges(md['linear_layers'])}"
                  f"{', beside attention' if beside else ''}): {a['heads']} heads of {a['head_dim']}, {a['groups']} "
                  f"B/C group(s) of state {a['state']}, conv {a['conv_kernel']}{clamp}{gate}; a fixed-size state per "
                  f"layer and sequence ({a['heads'] * a['head_dim'] * a['state']} fp32 values)"
                  f"{'' if beside or md.get('shared_blocks') else ', no KV cache'}")
    if md["row_scales"]:
        t.add_row("multipliers", "folded into the weights at load: " + "; ".join(
            f"{slot} " + ", ".join([f"input x{f['input']:g}"] * (f["input"] != 1) +
                                   ["rows x" + "/".join(f"{p:g}" for p in f["parts"])] * any(p != 1 for p in f["parts"]))
            for slot, f in md["row_scales"].items()))
    if md["mamba"]:
        a, n = md["mamba"], len(md["linear_layers"])
        norms = {None: "", "plain": ", dt/B/C RMS-normed", "weighted": ", dt/B/C RMS-normed with weights"}
        t.add_row("state space", f"Mamba in {n} of {md['num_layers']} layers ({_ranges(md['linear_layers'])}): "
                  f"{a['inner']} channels, each with its own decay over a state of {a['state']}, dt rank "
                  f"{a['dt_rank']}, conv {a['conv_kernel']}{norms[a['norms']]}; a fixed-size state per layer and "
                  f"sequence ({a['inner'] * a['state']} fp32 values), no KV cache")
    if md["block_parts"] and "mlp" in md["block_parts"]:
        mixers = [i for i, p in enumerate(md["block_parts"]) if p == "mixer"]
        mlps = [i for i, p in enumerate(md["block_parts"]) if p == "mlp"]
        t.add_row("one part a layer", f"token mixer in layers {_ranges(mixers)}; MLP in layers {_ranges(mlps)}")
    if md["qkv_clip"] or not md["norm_affine"]:
        t.add_row("attention input", ", ".join(
            ([f"q, k, v clamped to +-{md['qkv_clip']:g}"] if md["qkv_clip"] else [])
            + ([] if md["norm_affine"] else ["norms without weight or bias"])))
    if md["global_attn"]:
        g = md["global_attn"]
        t.add_row("global layers", f"layers outside the window: {md['num_heads']} heads / {g['num_kv_heads']} kv, "
                  f"head_dim {g['head_dim']}" + ("; v is k's projection" if md["value_is_key"] else ""))
    if md["v_norm"] or "layers.layer_scale.weight" in md["slots"]:
        t.add_row("attention extras", ", ".join(
            (["each v head RMS-normed (no weight)"] if md["v_norm"] else [])
            + (["the stream times a scalar after each layer"] if "layers.layer_scale.weight" in md["slots"] else [])))
    if md["head_activation"] or not md["first_attn_norm"] or md["linear_pre_norm"]:
        t.add_row("norms and head", ", ".join(
            ([] if md["first_attn_norm"] else ["layer 0 reads the normed embeddings without a norm of its own"])
            + (["linear layers norm each half's input, attention layers each half's output"]
               if md["linear_pre_norm"] else [])
            + ([f"lm_head reads norm({md['head_activation']}(dense(final norm)))"] if md["head_activation"] else [])))
    if md["per_layer_input"] or md["kv_source"]:       # Gemma 4 E2B/E4B
        src = md["kv_source"] or []
        shared = {}
        for i, j in enumerate(src):
            if j != i:
                shared.setdefault(j, []).append(i)
        t.add_row("per layer", ", ".join(
            ([f"per-layer inputs {md['per_layer_input']} wide, added after each MLP"
              + (f" (a table of the first {md['per_layer_vocab']} ids)" if md.get("per_layer_vocab") else "")]
             if md["per_layer_input"] else [])
            + ([f"MLP gate thinned to its top {100 * (1 - max(md['gate_sparsity'])):g}% in "
                + _layers([i for i, v in enumerate(md["gate_sparsity"]) if v])] if md.get("gate_sparsity") else [])
            + [(f"layers {_ranges(ls)} attend" if len(ls) > 1 else f"layer {ls[0]} attends")
               + f" over the keys of layer {j} (q only, no cache)" for j, ls in shared.items()]
            + ([f"MLP {md['wide_intermediate_size']} wide in layers {_ranges(md['wide_mlp_layers'])}"]
               if md["wide_mlp_layers"] else [])))
    if md["attn_gate"]:
        fn = md["attn_gate_fn"]
        biased = " plus a bias per head" if "layers.attn_gate.bias" in md["slots"] else ""
        t.add_row("attention gate", f"each head's output times {fn} of one gate logit per head{biased}" if
                  md["attn_gate_heads"] else f"each head's output times {fn} of a gate of its own width{biased}")
    if md["num_experts"]:
        shared = (f"; a shared expert of width {md['shared_intermediate_size']}"
                  if md["shared_intermediate_size"] else "")
        if md["shared_scale"] != 1.0:
            shared += f", times {md['shared_scale']:g}"
        if md["moe_beside_dense"]:
            shared = (f"; beside a dense MLP of width {md['shared_intermediate_size']}, each branch normed in and "
                      f"out")
        if md["shortcut_experts"]:
            shared = (f"; beside a dense MLP of width {md['shared_intermediate_size']} in the first layer of each "
                      f"pair, joining the stream after the second's MLP")
        if md["zero_experts"]:
            shared = f" and {md['zero_experts']} identity experts" + shared
        renorm = "renormalised" if md["experts_renormalize"] else "not renormalised"
        renorm += ", scaling the expert's input" if md["experts_scale_input"] else ""
        groups = (f", within {md['router_topk_groups']} of {md['router_groups']} groups"
                  if md["router_groups"] > 1 else "")
        if md["router"] == "sqrtsoftplus":
            renorm = f"sqrt(softplus) scores, {renorm}, times {md['routed_scale']:g}"
        elif md["router"] in ("sigmoid", "sigmoid_logits"):
            biased = ", chosen on the logits plus a bias" if md["router"] == "sigmoid_logits" else ""
            biased += f", logits capped at {md['router_softcap']:g}" if md["router_softcap"] else ""
            renorm = f"sigmoid scores{groups}{biased}, {renorm}, times {md['routed_scale']:g}"
        elif groups or md["routed_scale"] != 1.0:
            renorm = f"softmax{groups}, {renorm}, times {md['routed_scale']:g}"
        if md.get("hash_layers"):
            renorm += f"; by token id in layers {_ranges(md['hash_layers'])}"
        dense = (f"; dense MLP ({md['dense_intermediate_size']}) in layers {_ranges(md['dense_layers'])}"
                 if md["dense_layers"] else "")
        clamp = (f"; SwiGLU inputs clamped at {md['experts_glu_limit']:g}" if md.get("experts_glu_limit") else
                 f"; every SwiGLU's inputs clamped at {md['glu_limit']:g}" if md["activation"] == "swiglu_limit"
                 else "")
        t.add_row("experts", f"{md['num_experts']} per layer, top {md['experts_per_token']} ({renorm}){shared}{dense}"
                  f"{clamp}")
    pos = md["position"]
    rope = (f" ({pos.get('style')}, {pos.get('rotary_dim')} of {md['head_dim']} dims"
            f"{'; ' + str(pos['rope_type']) if pos.get('rope_type', 'default') != 'default' else ''}"
            f"{', long factors from position ' + str(pos['long_from']) if 'long_from' in pos else ''}"
            f"{'; rotates the other way' if pos.get('reversed') else ''}"
            f"{_local_rope(pos)})" if pos["type"] == "rope" else "")
    residual = {"pre": "pre-LN", "post": "post-LN", "parallel": "parallel attention + MLP"}.get(md["residual"],
                                                                                             md["residual"])
    if md.get("altup"):
        au = md["altup"]
        residual = (f"AltUp: {au['streams']} copies of the stream, each layer run on the active one's router-mixed "
                    f"prediction and its innovation spread back to all; LAuReL (rank {au['laurel_rank']}) beside "
                    f"attention; copies averaged before the final norm")
    if md.get("hyper") and "rank" in md["hyper"]:
        hc = md["hyper"]
        residual = (f"gated hyper-connections: {hc['streams']} copies of the stream, each half's input their mean "
                    f"weighted per channel by a rank-{hc['rank']} sigmoid gate, its output joining each copy by its "
                    f"own weight; mixed so once more for the head, no final norm")
    elif md.get("hyper"):
        hc = md["hyper"]
        residual = (f"hyper-connections: {hc['streams']} copies of the stream, mixed before each half, each taking up "
                    f"to {hc['magnitude']:g}x its output"
                    + (f", carried over it through a {hc['sinkhorn']}-step Sinkhorn mix" if hc.get("sinkhorn") else "")
                    + "; folded before the final norm")
    if md["residual_factors"]:
        f = md["residual_factors"]
        residual = ("restarting from each norm's output: alpha x normed + beta x output (" + ", ".join(
            f"{k} {a:g}/{b:g}" for k, (a, b) in f.items()) + ")")
    if "layers.attn_post_norm.weight" in md["slots"]:
        residual = (residual + ", each half's output normed too" if "layers.attn_norm.weight" in md["slots"]
                    else "each half's output normed, no pre-LN")
    if md.get("norm_gate_rank"):
        residual += (f", norms gated by a rank-{md['norm_gate_rank']} sigmoid (the attention's; the MLP's in the "
                     f"mixture layers)")
    if "layers.moe_post_norm.weight" in md["slots"]:
        residual += ", the mixture's output normed too"
    if "layers.attn_sub_norm.weight" in md["slots"]:
        residual += ", each half RMS-normed again before its output projection"
    if md["residual_depth_scale"]:
        residual += ", the k-th addition x / sqrt(k) + stream sqrt((k - 1) / k)"
    if "layers.attn_residual" in md["slots"]:
        residual += ", the stream weighted per channel before each half's output joins it"
    if "layers.q_norm.weight" in md["slots"]:
        residual += {"head": "; q/k normed per head", "per_head": "; q/k normed per head, a weight each",
                     "full": "; q/k normed across all heads"}[md["qk_norm"]]
        residual += " after RoPE" if md["qk_norm_after_rope"] else ""
    elif md["qk_norm"] == "l2":
        residual += "; q/k RMS-normed without a weight after RoPE, in the RoPE layers"
    nope = f"; none in layers {_ranges(md['nope_layers'])}" if md.get("nope_layers") else ""
    t.add_row("positions / norm", f"{pos['type']}{rope}{nope} / {md['norm']}, {residual}")
    sinks = "layers.attn_sinks.weight" in md["slots"]
    if (md["sliding_window"] or md["attn_softcap"] or md["logit_softcap"] or sinks or md["query_scale_beta"]
            or md["attn_chunk"]):
        where = "every layer" if md["window_layers"] is None else f"layers {_ranges(md['window_layers'])}"
        parts = [f"window {md['sliding_window']} in {where}"] if md["sliding_window"] else []
        if md["attn_chunk"]:
            where = "every layer" if md["chunk_layers"] is None else f"layers {_ranges(md['chunk_layers'])}"
            parts += [f"chunks of {md['attn_chunk']} in {where}"]
        parts += ([f"a softmax sink per head in layers {_ranges(md['sink_layers'])}" if md["sink_layers"] is not None
                   else "a softmax sink per head"] if sinks else [])
        p = "(p + 1)" if md["query_scale_offset"] else "p"
        temp = (f"exp({md['query_scale_beta']:g} log1p({p} / {md['query_scale_from']}))"
                if md["query_scale_kind"] == "power" else
                f"1 + {md['query_scale_beta']:g} log(1 + floor({p} / {md['query_scale_from']}))")
        parts += [f"q scaled by {temp}" + (" in the layers without RoPE" if md["query_scale_nope_only"] else "")
                  ] if md["query_scale_beta"] else []
        parts += [f"{k} soft-capped at {md[v]:g}" for k, v in (("attention scores", "attn_softcap"),
                                                                 ("logits", "logit_softcap")) if md[v]]
        t.add_row("attention", "; ".join(parts))
    if md.get("qkv_layout") not in (None, "separate", "fused"):
        t.add_row("source q|k|v", f"{md['qkv_layout']} (re-laid out as q, k, v)")
    head = f"; lm_head: the first {md['head_vocab_size']}" if md["head_vocab_size"] else ""
    t.add_row("vocab", f"{md['vocab_size']} (padded {par['vocab_padded']}), tied: {md['tied_embeddings']}{head}")
    hpr = ("/".join(str(n // par["tp"]) for n in sorted(set(md["layer_heads"]))) if md["layer_heads"]
           else par["heads_per_rank"])
    t.add_row("tensor parallel", f"tp={par['tp']}: {hpr} heads + {par['kv_heads_per_rank']} kv "
              f"per rank, kv replication x{par['kv_replication']}, mlp {par['intermediate_per_rank']} per rank")
    t.add_row("dtype", m["dtype"])
    if q is not None:
        kinds = "int8" if q.get("lm_head") else "float", "int8" if q.get("embeddings") else "float"
    t.add_row("int8", "no" if q is None else f"group {q['group_size']}, scales {q['scale_dtype']}, "
              f"{len(q['tensors'])} tensors; lm_head {kinds[0]}, embeddings {kinds[1]}")
    for r in m["ranks"]:
        size = sum(f["size"] for f in r["files"])
        t.add_row(f"rank {r['rank']}", f"{len(r['files'])} files, {len(r['tensors'])} tensors, {_human(size)}")
    con.print(t)
    if q:
        qt = Table(title="int8 error per tensor (worst 10 by SQNR)")
        for c in ("tensor", "group", "rel RMS", "SQNR dB", "max abs"):
            qt.add_column(c, justify="right" if c != "tensor" else "left")
        rows = sorted(q["tensors"].items(), key=lambda kv: kv[1]["sqnr_db"] if kv[1]["sqnr_db"] is not None else 1e9)
        for name, v in rows[:10]:
            qt.add_row(escape(name), str(v["group_size"]), f"{v['rel_rms']:.4f}",
                       "inf" if v["sqnr_db"] is None else f"{v['sqnr_db']:.1f}", f"{v['max_abs']:.3g}")
        con.print(qt)


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--text", "text_file", type=click.Path(path_type=Path), default=None,
              help="Text to run both models on (default: a short bundled children's story).")
@click.option("--tokens", default=256, show_default=True, help="Tokens of the text to evaluate, cut into sequences "
              "of at most the model's max positions (a speech encoder's longest clip, in frames).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the full report here as JSON (for CI).")
@click.option("--tp-mode", default="emulate", show_default=True, type=click.Choice(["emulate", "distributed"]),
              help="emulate: every rank in this process, combined exactly as the collectives would. distributed: "
                   "one process per rank, under `torchrun --nproc-per-node TP -m fmconvert verify ...`.")
@click.option("--max-kl", type=float, default=None, help="Mean KL(reference || converted) per token.")
@click.option("--min-top1", type=float, default=None, help="Fraction of positions with the same top-1 token.")
@click.option("--atol", type=float, default=None, help="Max abs error of the logits (encoders: last hidden state).")
@click.option("--max-rel", type=float, default=None, help="Relative RMS error of the output and of every layer's "
              "hidden state.")
@click.option("--min-cosine", type=float, default=None, help="Encoders: worst cosine of the pooled output.")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu).")
@click.option("--allow-pickle", is_flag=True, help="Accept a pytorch_model.bin source (weights_only=True).")
def verify(model_dir, out_dir, text_file, tokens, json_path, tp_mode, max_kl, min_top1, atol, max_rel, min_cosine,
           device, allow_pickle):
    """Check that OUT_DIR is a faithful conversion of MODEL_DIR; exit 0 pass, 1 parity failure, 2 bad input.

    \b
    1. integrity: manifest, file sizes and sha256, tensor dtypes and shapes in the headers.
    2. tensors: every tensor reassembled from all ranks and compared with the source; float tensors must be
       bit-exact, int8 ones within scale/2 of it. Failures name the tensor, rank, file and q/k/v part.
    3. end to end: transformers (fp32) vs the fmconvert runtime (all ranks, fp32 compute): logits, KL, top-1/5,
       perplexity, and hidden states layer by layer (encoders: hidden states and pooled-output cosine).

    \b
    Default thresholds (docs/verify.md has the measurements behind them):
                 atol    max-rel  max-kl  min-top1  min-cosine
      float32    1e-3    1e-4     1e-6    0.99      0.99999
      fp16/bf16  1.0     0.03     2e-3    0.95      0.999
      int8       2.0     0.08     0.01    0.90      0.99
    """
    from .verify import main as run
    run(model_dir, out_dir, text_file, tokens, json_path, tp_mode, device, allow_pickle,
        max_kl=max_kl, min_top1=min_top1, atol=atol, max_rel=max_rel, min_cosine=min_cosine)


def _lines(path: Path) -> list[str]:
    """A UTF-8 file's lines, split at line breaks only: str.splitlines also splits at form feeds, U+2028 and other
    separators a line of text may hold, which would shift every result after them."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")      # universal newlines: \r\n and \r read as \n
    except (OSError, UnicodeDecodeError) as e:
        raise FmError(f"cannot read {path}: {getattr(e, 'strerror', None) or type(e).__name__}") from None
    return lines[:-1] if lines[-1] == "" else lines


def _length_limit(model, wanted: int | None) -> int | None:
    """Tokens an encoder's input keeps: `wanted` (--max-length or a pipeline's), never past a position table."""
    from .manifest import position_limit
    return min((n for n in (wanted, position_limit(model.spec)) if n), default=None)


def _tokenizer(out_dir: Path):
    """The tokenizer copied next to the shards. Loaded locally, never with remote code."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise FmError(f"{out_dir}: cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def prompt_ids(tok, prompt: str, chat: bool, system: str | None, out_dir: Path) -> list[int]:
    """The prompt's token ids: the text itself, or with chat a user turn (after an optional system turn) rendered by
    the tokenizer's chat template up to the start of the assistant's reply."""
    if not chat:
        if system is not None:
            raise FmError("--system needs --chat")
        return tok(prompt).input_ids
    if not getattr(tok, "chat_template", None):
        raise FmError(f"{out_dir}: the tokenizer has no chat template (a base model?); drop --chat")
    turns = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": prompt}]
    try:
        out = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # a template may refuse a role (some reject a system turn) or fail to render
        raise FmError(f"{out_dir}: the chat template cannot render this conversation ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})") from None
    ids = out["input_ids"] if not isinstance(out, list) else out
    return [int(i) for i in ids]


def _language_token(tok, lang: str, out_dir) -> int:
    """The id of a language's token: M2M100's tokenizer maps fr to __fr__, the others name the token itself
    (fra_Latn, fr_XX)."""
    get = getattr(tok, "get_lang_id", None)
    try:
        tid = get(lang) if get is not None else tok.convert_tokens_to_ids(lang)
    except (KeyError, ValueError):
        tid = None
    if not isinstance(tid, int) or tid < 0 or tid == tok.unk_token_id:
        raise FmError(f"{out_dir}: its tokenizer has no token for the language {lang!r}")
    return tid


def _generate_lines(model, tok, prompts, batch, new, temperature, top_p, top_k, seed, chat, system, stops, beams,
                    penalty, stop, kw, out_dir, lead, speculate=None):
    """generate --file: each prompt's output (a decoder's continuation, an encoder-decoder's text) on a line of its
    own, in order -> the stats of all of them (tokens, and prefill and decode time, summed). An encoder-decoder's
    sources go `batch` at a time, similar lengths together, right-padded; everything else one prompt at a time.
    speculate: (draft model or None for prompt lookup, tokens a step): speculative decoding, a prompt at a time."""
    import torch

    from .runtime.beam import beam_search
    from .runtime.embed import by_length
    from .runtime.generate import GenStats, generate as gen
    seq2seq = bool(model.spec.get("encoder"))
    total, outs = GenStats(), [None] * len(prompts)
    batch = 1 if speculate else batch
    groups = by_length(tok, prompts, batch) if batch > 1 else [[i] for i in range(len(prompts))]
    for group in groups:
        if len(group) > 1:
            enc = tok([prompts[i] for i in group], padding=True, return_tensors="pt")
            if tok.padding_side != "right":       # the source's positions count from its first token
                raise FmError(f"{out_dir}: its tokenizer pads on the {tok.padding_side}; use --batch-size 1")
            ids, mask = enc.input_ids, enc.attention_mask
        else:
            ids, mask = torch.tensor([prompt_ids(tok, prompts[group[0]], chat, system, out_dir)]), None
        if beams > 1:
            out, st = beam_search(model, ids, beams, new, stops, penalty, stop, source_mask=mask, **kw)
        elif speculate:
            from .runtime.speculative import speculative_generate
            out, st = speculative_generate(model, speculate[0], ids, new, speculate[1], temperature, top_p, top_k,
                                           seed, stops, processors=kw["processors"], forced_bos=kw["forced_bos"],
                                           forced_eos=kw["forced_eos"])
            for key in ("drafted", "accepted", "target_steps"):
                setattr(total, key, getattr(total, key) + getattr(st, key))
        else:
            out, st = gen(model, ids, new, temperature, top_p, seed, stops, source_mask=mask, top_k=top_k, **kw)
        start = 1 if seq2seq else ids.shape[1]
        for row, i in zip(out[:, start:].tolist(), group):
            cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
            outs[i] = tok.decode(row[:cut], skip_special_tokens=True)
            total.new_tokens += cut
        total.prompt_tokens += int(ids.numel() if mask is None else mask.sum())
        total.prefill_s += st.prefill_s
        total.decode_s += st.decode_s
    if lead:
        for text in outs:
            click.echo(text.replace("\n", " "))
    return total


_DEFAULTS = dict(num_beams=1, length_penalty=1.0, early_stopping=False, repetition_penalty=1.0, no_repeat_ngram_size=0,
                 min_new_tokens=0, min_length=0, max_new_tokens=64)


def _settings(gc: dict, seq2seq: bool, given: dict) -> dict:
    """generate's decoding settings: each given on the command line, else the generation config's (gc: {} without
    --generation-config), else the default. The config's max_length, for an encoder-decoder the start token and
    the new ones, stands for max_new_tokens when that is absent (a decoder's counts its prompt: not taken)."""
    out = {}
    for key, default in _DEFAULTS.items():
        v = given.get(key)
        if v is None:
            v = gc.get(key)
            if key == "max_new_tokens" and v is None and seq2seq and type(gc.get("max_length")) is int:
                v = gc["max_length"] - 1
        out[key] = default if v is None else v
    if isinstance(out["early_stopping"], str):
        out["early_stopping"] = {"false": False, "true": True}.get(out["early_stopping"], out["early_stopping"])
    def valid(k, v):
        if k == "early_stopping":
            return v in (True, False, "never")
        if k in ("length_penalty", "repetition_penalty"):
            return type(v) in (int, float) and math.isfinite(v) and (v > 0 or k == "length_penalty")
        return type(v) is int and v >= (1 if k in ("num_beams", "max_new_tokens") else 0)
    bad = [k for k, v in out.items() if not valid(k, v)]
    if bad:
        raise FmError(f"generation_config.json: {bad[0]} must be a valid setting, got {out[bad[0]]!r}")
    out["repetition_penalty"], out["length_penalty"] = float(out["repetition_penalty"]), float(out["length_penalty"])
    return out


def _generation_source(out_dir: Path) -> tuple[dict, bool]:
    """(the settings transformers' generate() reads, whether they are generation_config.json's): that file's when
    there is one, else config.json's."""
    if (Path(out_dir) / "generation_config.json").is_file():
        return _generation_config(out_dir), True
    try:
        cfg = json.loads((Path(out_dir) / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    return (cfg if isinstance(cfg, dict) else {}), False


def _gen_setting(out_dir: Path, key: str):
    """A generation setting as transformers reads it (`_generation_source`)."""
    return _generation_source(out_dir)[0].get(key)


def _bad_words(out_dir: Path, vocab: int) -> tuple:
    """bad_words_ids (token sequences generate() never completes: Marian bans its pad token), as tuples."""
    v = _gen_setting(out_dir, "bad_words_ids")
    if v is None:
        return ()
    if not isinstance(v, list) or not v or any(
            not isinstance(w, list) or not w or any(type(i) is not int or not 0 <= i < vocab for i in w) for w in v):
        raise FmError(f"{out_dir}: bad_words_ids must be lists of token ids under {vocab}, got {v!r}")
    return tuple(tuple(w) for w in v)


def _sampling(gc: dict, temperature, top_k, top_p) -> tuple[float, int, float]:
    """(temperature, top_k, top_p). Sampling is on with a temperature above 0, or with none given where the
    generation config (gc: {} without --generation-config) says do_sample. Then each setting is the one given, else
    the config's, else transformers' default (1, 50, 1) with a config and none (1, 0: all, 1) without."""
    for key, ok in (("temperature", lambda v: type(v) in (int, float) and v >= 0),
                    ("top_k", lambda v: type(v) is int and v >= 0),
                    ("top_p", lambda v: type(v) in (int, float) and 0 < v <= 1)):
        if gc.get(key) is not None and not ok(gc[key]):
            raise FmError(f"generation_config.json: {key} must be a valid setting, got {gc[key]!r}")
    samples = temperature > 0 if temperature is not None else gc.get("do_sample") is True
    if not samples:
        return 0.0, 0, 1.0
    pick = (lambda given, key, default: given if given is not None else gc[key] if gc.get(key) is not None
            else default)
    return (float(pick(temperature, "temperature", 1.0)), int(pick(top_k, "top_k", 50 if gc else 0)),
            float(pick(top_p, "top_p", 1.0)))


def _forced(out_dir: Path, key: str, vocab: int):
    """A forced-token setting (forced_bos_token_id, forced_eos_token_id: an id, a list of ids, or none) as
    transformers reads it: generation_config.json's when there is one, else config.json's."""
    v = _gen_setting(out_dir, key)
    ids = v if isinstance(v, list) else [] if v is None else [v]
    if any(type(i) is not int or not 0 <= i < vocab for i in ids):
        raise FmError(f"{out_dir}: {key} must be a token id or a list of them, got {v!r}")
    return v if ids else None


def _generation_config(out_dir: Path) -> dict:
    """generation_config.json as a dict ({} when there is none)."""
    path = Path(out_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, OSError):
        raise FmError(f"{path}: not a JSON object") from None
    if not isinstance(cfg, dict):
        raise FmError(f"{path}: not a JSON object")
    return cfg


def stop_ids(out_dir: Path, spec: dict) -> list[int]:
    """End-of-sequence ids: config.json's (in the manifest) and generation_config.json's, where instruct models
    list the token that ends a turn (Llama 3's <|eot_id|>, Gemma's <end_of_turn>)."""
    def ints(v):
        v = v if isinstance(v, list) else [v]
        return [i for i in v if type(i) is int and i >= 0]
    ids = ints(spec.get("eos_token_id")) + ints(_generation_config(out_dir).get("eos_token_id"))
    return sorted(set(ids))


class _Streamer:
    """A text printed as its tokens come. A character split over byte-level tokens decodes to U+FFFD until its last
    byte arrives, so a text ending in one waits for the next token (or the end) before it is shown."""

    def __init__(self, tok, ids=(), keep=None, on: bool = True):
        self.tok, self.ids, self.keep, self.on = tok, list(ids), keep or (lambda ids: ids), on
        self.shown = self._text()

    def _text(self) -> str:
        return self.tok.decode(self.keep(self.ids), skip_special_tokens=True)

    def add(self, token):
        self.ids.append(int(token))
        if self.on:
            text = self._text()
            if not text.endswith("\ufffd"):
                click.echo(text[len(self.shown):], nl=False)
                self.shown = text

    def finish(self, more=()):
        self.ids += [int(t) for t in more]
        if self.on:
            text = self._text()
            click.echo(text[len(self.shown):], nl=False)
            self.shown = text


# what transformers' GenerationConfig.from_model_config takes from an old Whisper's config.json
_SPEECH_KEYS = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "forced_decoder_ids",
                "suppress_tokens", "begin_suppress_tokens", "max_length", "num_beams")


def _speech_config(out_dir: Path) -> dict:
    """Whisper's generation settings: generation_config.json, or where there is none (an old checkpoint) the
    generation keys of config.json, as transformers falls back to them."""
    gc, own = _generation_source(out_dir)
    return gc if own else {k: gc[k] for k in _SPEECH_KEYS if gc.get(k) is not None}


def _median_width(out_dir: Path) -> int:
    """The median filter's width word timestamps smooth the cross-attention with: config.json's
    median_filter_width (7 in the released checkpoints)."""
    try:
        width = json.loads((Path(out_dir) / "config.json").read_text()).get("median_filter_width", 7)
    except (OSError, ValueError):
        return 7
    if type(width) is not int or width < 1 or width % 2 == 0:
        raise FmError(f"config.json: median_filter_width must be an odd positive integer, got {width!r}")
    return width


def _whisper_words(tok, tr) -> list:
    """A transcript's words, each with its start and end in seconds (the pipeline's return_timestamps="word")."""
    from types import SimpleNamespace

    from .runtime.alignment import words
    times = [t for sg in tr.segments for t in sg.token_times]
    return [SimpleNamespace(start=w["timestamp"][0], end=w["timestamp"][1], text=w["text"].strip())
            for w in words(tok, tr.tokens, times, tr.language)]


def _temperatures(text: str | None):
    """--temperature's comma-separated list -> a tuple of floats (None when not given)."""
    if text is None:
        return None
    try:
        temps = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise FmError(f"--temperature takes numbers separated by commas (0,0.2,0.4), not {text!r}") from None
    return temps


def _whisper_prompt(tok, gc: dict, text: str) -> list[int]:
    """--prompt's token ids as transformers' get_prompt_ids gives them: <|startofprev|>, then the text after a
    space; special tokens in the text are refused."""
    if hasattr(tok, "get_prompt_ids"):
        try:
            return [int(i) for i in tok.get_prompt_ids(text, return_tensors="np")]
        except ValueError as e:
            raise FmError(f"--prompt: {str(e).splitlines()[0]}") from None
    prev = gc.get("prev_sot_token_id")
    prev = tok.convert_tokens_to_ids("<|startofprev|>") if prev is None else prev
    if prev is None or prev == tok.unk_token_id:
        raise FmError("this tokenizer has no <|startofprev|> and the generation config no prev_sot_token_id: "
                      "it cannot take a --prompt")
    ids = tok(" " + text.strip(), add_special_tokens=False)["input_ids"]
    special = [i for i in ids if i in set(tok.all_special_ids)]
    if special:
        raise FmError(f"--prompt holds a special token, {tok.convert_ids_to_tokens(special[0])}: text only")
    return [prev] + ids


def _cue_time(t: float, sep: str) -> str:
    """Seconds -> hh:mm:ss,mmm (SubRip: sep ",") or hh:mm:ss.mmm (WebVTT: sep ".")."""
    ms = int(round(t * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def _measures(sg) -> dict:
    """A Whisper segment's decoding measures, those its window's decode took."""
    out = {"temperature": sg.temperature}
    for key in ("avg_logprob", "compression_ratio", "no_speech_prob"):
        if getattr(sg, key) is not None:
            out[key] = round(getattr(sg, key), 4)
    return out


def _rendered(fmt: str, name: str, language, plain: str, text: str, cues: list, words=None, details=None) -> str:
    """One file's transcript in a format: srt or vtt (a cue a segment with text), json (a line: its plain text,
    segments (each with its details, where given) and, from a CTC model, words), text (`text`, as shown)."""
    details = [d for c, d in zip(cues, details or [{}] * len(cues)) if c[2]]
    cues = [c for c in cues if c[2]]
    if fmt == "srt":
        return "".join(f"{i}\n{_cue_time(a, ',')} --> {_cue_time(b, ',')}\n{t}\n\n"
                       for i, (a, b, t) in enumerate(cues, 1))
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(f"{_cue_time(a, '.')} --> {_cue_time(b, '.')}\n{t}\n\n" for a, b, t in cues)
    if fmt == "json":
        return json.dumps({"file": name, "language": language, "text": plain,
                           "segments": [{"start": round(a, 3), "end": round(b, 3), "text": t, **d}
                                        for (a, b, t), d in zip(cues, details)],
                           **({"words": [{"start": round(w.start, 3), "end": round(w.end, 3), "text": w.text}
                                         for w in words]} if words is not None else {})},
                          ensure_ascii=False) + "\n"
    return text + "\n"


def _write_results(fmt: str, output_dir, stems: list[str], results: list[str]):
    """Rendered transcripts: a file each in output_dir (written atomically), or all to stdout."""
    if output_dir is None:
        click.echo("".join(results), nl=False)
        return
    from .write import write_text_atomic
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FmError(f"cannot make {output_dir}: {e.strerror or type(e).__name__}") from None
    for stem, text in zip(stems, results):
        write_text_atomic(output_dir / f"{stem}.{fmt}", text)
    click.echo(f"[wrote {len(results)} {fmt} file{'s' * (len(results) > 1)} to {output_dir}]", err=True)


def _not_speech(model, out_dir):
    """Refuse, in one line, a text verb on Whisper, its audio encoder, or a waveform encoder."""
    if audio_front(model.spec):
        from .runtime.ctc import head_kind
        kind = head_kind(model.spec)
        raise FmError(f"{out_dir} holds a speech encoder ({model.spec['architecture']}): it reads audio; " + (
            f"use `fmconvert transcribe {out_dir} AUDIO.wav`" if kind == "ctc" else
            f"use `fmconvert embed {out_dir} --audio AUDIO.wav`" if kind == "xvector" else
            f"use `fmconvert classify {out_dir} --audio AUDIO.wav`" if kind else
            f"use `fmconvert embed {out_dir} --audio AUDIO.wav` (its mean frame)"))
    enc = getattr(model, "source_encoder", None)
    if model.spec["audio_mels"] or (enc is not None and enc.spec["audio_mels"]):
        parent = Path(out_dir).parent if model.spec["audio_mels"] else Path(out_dir)
        raise FmError(f"{out_dir} holds a speech model's {'audio encoder' if model.spec['audio_mels'] else 'decoder'}"
                      f" ({model.spec['architecture']}): it reads audio; use `fmconvert transcribe {parent} AUDIO.wav`")


def _load(out_dir, device, backend, no_verify_hashes, dtype=None):
    from .runtime.load import load
    dt = {"auto": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype or "auto"]
    import torch
    return load(out_dir, device=device, backend=backend, check_hashes=not no_verify_hashes,
                dtype=getattr(torch, dt) if dt else None)


_runtime_options = [
    click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: this rank's GPU if any, else cpu)."),
    click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "torch", "triton"]),
                 help="auto = Triton kernels on CUDA, PyTorch on CPU. triton on CPU needs TRITON_INTERPRET=1."),
    click.option("--no-verify-hashes", is_flag=True, help="Skip the sha256 check of this rank's shard files."),
    click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
                 help="Compute dtype (auto = the checkpoint's)."),
]


def runtime_options(f):
    for opt in reversed(_runtime_options):
        f = opt(f)
    return f


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", default=None, help="Text to continue (an encoder-decoder's source).")
@click.option("--file", "-f", "prompt_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Instead of --prompt: a UTF-8 file of prompts, one a line; each output on a line of its own, in "
                   "order (line breaks inside it become spaces). An encoder-decoder's run in batches of --batch-size "
                   "(greedy or with beams), sources of similar length together; the rest one at a time.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="With --file: an encoder-decoder's sources per batch.")
@click.option("--max-new-tokens", "-n", default=None, type=click.IntRange(min=1),
              help="New tokens at most (default 64, or the generation config's with --generation-config).")
@click.option("--temperature", "-t", default=None, type=click.FloatRange(min=0),
              help="Sample at this temperature; 0 (the default) = greedy.")
@click.option("--top-k", default=None, type=click.IntRange(min=0),
              help="When sampling, from the k likeliest tokens only (default 0: all).")
@click.option("--top-p", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="When sampling, from the smallest set of tokens holding this much of the probability (default "
                   "1: all).")
@click.option("--seed", default=0, show_default=True)
@click.option("--chat", is_flag=True, help="Instruct models: send the prompt as a user turn through the tokenizer's "
              "chat template (sandboxed Jinja, as transformers renders it) and print the reply alone.")
@click.option("--system", default=None, help="With --chat: a system message before the prompt.")
@click.option("--src-lang", default=None,
              help="Encoder-decoder translators whose tokenizer marks the source's language (NLLB: eng_Latn, "
                   "mBART-50: en_XX, M2M100: en): that language.")
@click.option("--tgt-lang", default=None,
              help="Encoder-decoder translators that start their output with the target language's token (NLLB: "
                   "fra_Latn, mBART-50: fr_XX, M2M100: fr): the first new token is that one.")
@click.option("--num-beams", default=None, type=click.IntRange(1, 64),
              help="Beam search over this many beams (transformers' own search: the same tokens), printed when it "
                   "ends; 1 (the default) = greedy or sampled, streamed.")
@click.option("--length-penalty", default=None, type=float,
              help="With --num-beams: a finished hypothesis scores its summed log probability / length ** this "
                   "(default 1; above 0 favours longer ones).")
@click.option("--early-stopping", default=None, type=click.Choice(["false", "true", "never"]),
              help="With --num-beams: false (the default) stops when no live beam can beat the finished ones, as "
                   "transformers; true once --num-beams hypotheses are finished; never not before the length limit.")
@click.option("--repetition-penalty", default=None, type=float,
              help="A token already in the text: its score divided by this (multiplied if negative), as transformers' "
                   "repetition_penalty (default 1: none).")
@click.option("--no-repeat-ngram", default=None, type=click.IntRange(min=0),
              help="No n-gram of this many tokens twice in the text (transformers' no_repeat_ngram_size; 0: none).")
@click.option("--min-new-tokens", default=None, type=click.IntRange(min=0),
              help="No end token before this many new tokens.")
@click.option("--generation-config", "use_generation_config", is_flag=True,
              help="Take every setting not given here from generation_config.json, as transformers' generate() does: "
                   "num_beams, length_penalty, early_stopping, no_repeat_ngram_size, repetition_penalty, min_length, "
                   "min_new_tokens, max_new_tokens or max_length (bart-large-cnn's summaries, opus-mt's beams); "
                   "with do_sample, its temperature, top_k and top_p (transformers' defaults 1, 50 and 1 where it "
                   "sets none: an instruct model's sampling).")
@click.option("--draft", type=click.Path(path_type=Path), default=None,
              help="Speculative decoding: a converted smaller model of the same tokenizer (or this model's --int8 "
                   "conversion) proposes --speculate tokens, the model checks them in one forward; greedy keeps "
                   "exactly the model's own tokens, sampling its distribution.")
@click.option("--speculate", default=4, show_default=True, type=click.IntRange(1, 16),
              help="With --draft: tokens the draft proposes a step.")
@click.option("--prompt-lookup", default=None, type=click.IntRange(1, 64),
              help="Speculative decoding without a draft (transformers' prompt_lookup_num_tokens): propose up to this "
                   "many tokens that followed the text's last two tokens where they occurred before (an "
                   "encoder-decoder's source included); pays where the output copies its input (summaries, edits, "
                   "answers quoting a document); the same tokens.")
@runtime_options
def generate(out_dir, prompt, prompt_file, batch_size, max_new_tokens, temperature, top_k, top_p, seed, chat, system,
             src_lang, tgt_lang, num_beams, length_penalty, early_stopping, repetition_penalty, no_repeat_ngram,
             min_new_tokens, use_generation_config, draft, speculate, prompt_lookup, device, backend, no_verify_hashes,
             dtype):
    """Generate text from a converted decoder, streaming tokens to stdout. Generation stops at an end-of-sequence
    token of config.json or generation_config.json (instruct models end a turn with their own).

    An encoder-decoder (T5, Flan-T5: `-p "translate English to German: ..."`) reads the prompt as its source and
    prints its decoder's text alone. --num-beams searches as transformers' beam search does (summarizers and
    translators such as bart-large-cnn and opus-mt are tuned for it).

    For tp > 1 launch one process per rank: `torchrun --nproc-per-node 2 -m fmconvert generate OUT_DIR -p "..."`.
    Rank 0 prints. The last line reports tokens/s and the effective weight bandwidth.

    On CPU an --int8 checkpoint stays int8 and decodes through a compiled int8 kernel (about twice float32's
    speed on a 1B model); the kernel builds before the first token: ~15 s the first time on a machine, a few
    seconds after.
    """
    import torch
    from .kernels import int8_gemv_cpu
    from .runtime.generate import copy_bandwidth, generate as gen, packed_int8, warm_up, weight_bytes
    if (prompt is None) == (prompt_file is None):
        raise FmError("give --prompt or --file (one of them)")
    prompts = _lines(prompt_file) if prompt_file is not None else [prompt]
    if not prompts:
        raise FmError(f"{prompt_file} holds no prompts")
    model = _load(out_dir, device, backend, no_verify_hashes, dtype)
    _not_speech(model, out_dir)
    if model.spec["kind"] != "decoder":
        raise FmError(f"{out_dir} holds an encoder ({model.spec['architecture']}); use `fmconvert embed`")
    if model.spec["headless"]:
        raise FmError(f"{out_dir} holds {model.spec['architecture']} without its language-model head (an "
                      f"embedding model): it cannot generate; use `fmconvert embed`")
    lead = model.rank == 0
    tok = _tokenizer(out_dir)
    seq2seq = bool(model.spec.get("encoder"))
    if seq2seq and chat:
        raise FmError(f"{out_dir} holds an encoder-decoder ({model.spec['architecture']}): it reads the prompt as its "
                      f"source; drop --chat")
    if (src_lang or tgt_lang) and not seq2seq:
        raise FmError(f"--src-lang and --tgt-lang are for encoder-decoder translators; {out_dir} holds a decoder")
    if src_lang:
        if not hasattr(tok, "src_lang"):
            raise FmError(f"{out_dir}: its tokenizer ({type(tok).__name__}) takes no source language; drop --src-lang")
        tok.src_lang = src_lang          # NLLB's, mBART-50's and M2M100's tokenizers mark the source with it
    stops = stop_ids(out_dir, model.spec)
    cold = int8_gemv_cpu.cold(packed_int8(model)) if int8_gemv_cpu.usable() else []
    if cold and lead:
        click.echo(f"[building the CPU int8 kernels for {len(cold)} weight shapes: ~15 s the first time on this "
                   "machine, a few seconds once cached]", err=True)
    warm_up(model)
    # transformers' forced first and last tokens (mBART-50's and NLLB's language; BART's and Marian's end token)
    forced = _forced(out_dir, "forced_bos_token_id", model.spec["vocab_size"]) if seq2seq else None
    if isinstance(forced, list):
        raise FmError(f"{out_dir}: forced_bos_token_id must be one token id, got {forced!r}")
    if tgt_lang:
        forced = _language_token(tok, tgt_lang, out_dir)
    forced_eos = _forced(out_dir, "forced_eos_token_id", model.spec["vocab_size"])
    gc = _generation_config(out_dir) if use_generation_config else {}
    s = _settings(gc, seq2seq, dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                                    repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram,
                                    min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens))
    num_beams, length_penalty, stop, max_new_tokens = (s["num_beams"], s["length_penalty"], s["early_stopping"],
                                                      s["max_new_tokens"])
    temperature, top_k, top_p = _sampling(gc, temperature, top_k, top_p)
    if num_beams > 1 and temperature > 0:
        raise FmError("--num-beams searches greedily: drop --temperature" + (
            " (or do_sample from the generation config: give --temperature 0)" if gc.get("do_sample") else ""))
    if draft is not None and prompt_lookup:
        raise FmError("--draft and --prompt-lookup are two ways of proposing tokens: give one")
    speculating = draft is not None or prompt_lookup is not None
    if speculating and num_beams > 1:
        raise FmError(f"{'--draft' if draft is not None else '--prompt-lookup'} decodes greedily or samples: drop "
                      f"--num-beams")
    drafter = _load(draft, device, backend, no_verify_hashes, dtype) if draft is not None else None
    if drafter is not None:
        warm_up(drafter)
    from .runtime.processors import Processors
    kw = dict(forced_bos=forced, forced_eos=forced_eos, processors=Processors(
        repetition_penalty=s["repetition_penalty"], no_repeat_ngram=s["no_repeat_ngram_size"],
        min_new_tokens=s["min_new_tokens"], min_length=s["min_length"],
        bad_words=_bad_words(out_dir, model.spec["vocab_size"])))
    if prompt_file is not None:
        st = _generate_lines(model, tok, prompts, batch_size if seq2seq else 1, max_new_tokens,
                             temperature, top_p, top_k, seed, chat, system, stops, num_beams, length_penalty, stop,
                             kw, out_dir, lead, (drafter, prompt_lookup or speculate) if speculating else None)
    else:
        ids = torch.tensor([prompt_ids(tok, prompt, chat, system, out_dir)], dtype=torch.long)
        if speculating:                 # refused before anything is printed
            from .runtime.speculative import caches
            caches(model, drafter, ids.shape[1] + max_new_tokens + 1, batch=0)
        # an encoder-decoder's output is a new text (after its start token), a decoder's continues the prompt
        shown = _Streamer(tok, () if seq2seq else ids[0].tolist(), on=lead)
        if lead and not chat and not seq2seq:
            click.echo(shown.shown, nl=False)
        if num_beams > 1:
            from .runtime.beam import beam_search
            _, st = beam_search(model, ids, num_beams, max_new_tokens, stops, length_penalty, stop, **kw)
            shown.finish(st.tokens)         # the best hypothesis, once the search ends
        elif speculating:
            from .runtime.speculative import speculative_generate
            _, st = speculative_generate(model, drafter, ids, max_new_tokens, prompt_lookup or speculate, temperature,
                                         top_p, top_k, seed, stops, lambda t: shown.add(t[0]), kw["processors"],
                                         forced_bos=kw["forced_bos"], forced_eos=kw["forced_eos"])
            shown.finish()
        else:
            _, st = gen(model, ids, max_new_tokens, temperature, top_p, seed, stops, lambda t: shown.add(t[0]),
                        top_k=top_k, **kw)
            shown.finish()
        if lead:
            click.echo("\n", nl=False)
    if lead:
        wb = weight_bytes(model) * model.tp
        gbs = wb * st.decode_tok_s / 1e9
        peak = copy_bandwidth(model.device) / 1e9
        s = model.load_stats
        click.echo(f"[{st.new_tokens} tokens | prefill {st.prompt_tokens} tok in {st.prefill_s * 1e3:.1f} ms | decode "
                   f"{st.decode_tok_s:.1f} tok/s, {gbs:.2f} GB/s of weights ({100 * gbs / peak:.0f}% of the "
                   f"{peak:.0f} GB/s copy bandwidth measured) | load {s['gib'] * 1024:.1f} MiB in {s['seconds']:.2f} s | "
                   f"tp={model.tp} {model.ops.name} {model.device}]", err=True)
        if speculating:
            click.echo(f"[speculative, up to {prompt_lookup or speculate} a step"
                       f"{' from the text itself' if prompt_lookup else ''}: {st.accepted} of {st.drafted} proposed "
                       f"tokens kept ({100 * st.accepted / max(st.drafted, 1):.0f}%), "
                       f"{st.new_tokens / st.target_steps:.2f} tokens a forward of the model; the GB/s above count "
                       f"the model's weights a token]", err=True)
        chosen = model.ops.timed_choices() if hasattr(model.ops, "timed_choices") else ""
        if chosen:
            click.echo(f"[decode matmuls, timed on this device: {chosen}]", err=True)
    from .runtime.comm import shutdown
    shutdown()


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.argument("audio", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--language", "-l", default=None,
              help="The speech's language (en, english, <|en|>); default: detected per file, as transformers does.")
@click.option("--task", default=None, type=click.Choice(["transcribe", "translate"]),
              help="translate: English text from speech in another language (default: transcribe).")
@click.option("--timestamps/--no-timestamps", default=None,
              help="Print each segment with its start and end, [12.34 -> 15.60] text, from Whisper's timestamp "
                   "tokens (default: the generation config's return_timestamps). Audio past 30 s always decodes "
                   "with them (transformers' long-form transcription).")
@click.option("--format", "fmt", default="text", show_default=True, type=click.Choice(["text", "srt", "vtt", "json"]),
              help="text: the transcript (one file) or FILE<TAB>text lines; srt, vtt: subtitles, a cue a segment "
                   "(timestamps on unless --no-timestamps: then a cue a 30 s window); json: a JSON object a file, a "
                   "line each (file, language, text, segments with start and end).")
@click.option("--output-dir", "-o", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write each file's result to DIR/<its name>.<format> instead of printing it (needed for the "
                   "subtitles of several files).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Files decoded side by side: those of up to 30 s together, longer ones together, each window "
                   "after window (alone with --condition-on-previous).")
@click.option("--num-beams", default=None, type=click.IntRange(1, 64),
              help="Beam search over this many beams in each window (transformers' own: the same tokens); 1 = "
                   "greedy, streamed (default: the generation config's num_beams, else 1).")
@click.option("--length-penalty", default=None, type=float,
              help="With --num-beams: a finished hypothesis scores its summed log probability / length ** this "
                   "(default: the generation config's, else 1).")
@click.option("--max-new-tokens", "-n", default=None, type=click.IntRange(min=1),
              help="Tokens per 30 s window at most (default: the generation config's max_length, up to the "
                   "decoder's positions).")
@click.option("--chunk-length", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="CTC models: a file longer than this many seconds is read in windows of it, as transformers' ASR "
                   "pipeline does with chunk_length_s.")
@click.option("--stride-length", default=None, type=click.FloatRange(min=0),
              help="CTC models: the seconds each window overlaps its neighbours by, a side (default: a sixth of "
                   "--chunk-length); the frames in the overlap are dropped.")
@click.option("--prompt", "-p", default=None,
              help="Text the decoder reads before the first window (names, spellings, a style: \"Glossary: "
                   "Kubernetes, kubectl.\"), as transformers' prompt_ids; it is not part of the transcript.")
@click.option("--prompt-every-window", is_flag=True,
              help="Put --prompt before every window, ahead of the text before it (needs --condition-on-previous).")
@click.option("--condition-on-previous/--no-condition-on-previous", "condition", default=None,
              help="Start each window from the last ~220 tokens read so far (transformers' condition_on_prev_tokens; "
                   "default: the generation config's, else off). Keeps names and style consistent; can carry a "
                   "loop on, which temperature fallback breaks.")
@click.option("--temperature", default=None, metavar="T[,T...]",
              help="Decode at T (0 = greedy; more samples); a list (0,0.2,0.4,0.6,0.8,1.0) is temperature fallback: a "
                   "window that fails a threshold below is decoded again at the next one.")
@click.option("--compression-ratio-threshold", type=float, default=None,
              help="Decode a window again when its tokens compress better than this (a repetition loop); 1.35 is "
                   "common.")
@click.option("--logprob-threshold", type=float, default=None,
              help="Decode a window again when its tokens' mean log probability is below this; -1.0 is common.")
@click.option("--no-speech-threshold", type=float, default=None,
              help="Skip a window as silence when <|nospeech|>'s probability is above this and its mean log "
                   "probability below --logprob-threshold; 0.6 is common.")
@click.option("--fallback", is_flag=True,
              help="The large-v3 model card's long-form recipe: --temperature 0,0.2,0.4,0.6,0.8,1.0 "
                   "--compression-ratio-threshold 1.35 --logprob-threshold -1 --no-speech-threshold 0.6 (each can "
                   "still be given).")
@click.option("--seed", default=0, show_default=True, help="The sampling generator's seed (a hot fallback).")
@click.option("--word-timestamps", is_flag=True,
              help="Each word's start and end (text: a word a line; json: a words list), from the cross-attention of "
                   "the generation config's alignment_heads, as transformers' pipeline gives return_timestamps="
                   "\"word\"; turns on --timestamps.")
@runtime_options
def transcribe(out_dir, audio, language, task, timestamps, fmt, output_dir, batch_size, num_beams, length_penalty,
               max_new_tokens, chunk_length, stride_length, prompt, prompt_every_window, condition, temperature,
               compression_ratio_threshold, logprob_threshold, no_speech_threshold, fallback, seed, word_timestamps,
               device, backend, no_verify_hashes, dtype):
    """Speech to text with a converted Whisper (whisper-tiny ... large-v3-turbo, distil-whisper), or a CTC model
    (Wav2Vec2, HuBERT, UniSpeech *ForCTC: wav2vec2-base-960h, wav2vec2-large-960h-lv60-self, hubert-large-ls960-ft).

    \b
    Reads WAV files (PCM 8/16/24/32-bit or float, any rate, any channels: mixed down to 16 kHz mono). Greedy
    decoding with the generation config's prompt and suppressed tokens, as transformers' generate() does: the
    same tokens. A file longer than 30 s is transcribed as transformers' long-form generate() does it: 30 s
    windows, each cut at its timestamps, the next starting where the last whole segment ended. One file prints
    its text as it is decoded; several print `FILE<TAB>text` a line each, in order.

    \b
      fmconvert convert --int8 whisper-small out
      fmconvert transcribe out talk.wav
      fmconvert transcribe out lecture.wav --timestamps
      fmconvert transcribe out *.wav --language fr --task translate > english.tsv
      fmconvert transcribe out film.wav --format srt > film.srt
      fmconvert transcribe out *.wav --format vtt -o subtitles/
      fmconvert transcribe out podcast.wav --fallback --prompt "Hosts: Anna Kowalczyk, Ravi."

    \b
    A CTC model gives every 20 ms frame its likeliest character: the transcript is read off in one forward per
    file (or per window of --chunk-length), with word timestamps (--timestamps, srt, vtt, json) from the frames.
    """
    import time

    from .runtime.audio import load_audio
    from .runtime.generate import GenStats
    from .runtime.speech import (SAMPLE_RATE, fallback_of, feature_extractor, features_of, long_features,
                                 transcribe as run)
    if fmt in ("srt", "vtt") and len(audio) > 1 and output_dir is None:
        raise FmError(f"the {fmt} subtitles of {len(audio)} files need --output-dir: one file each")
    stems = [p.stem for p in audio]
    if output_dir is not None and len(set(stems)) < len(stems):
        twice = next(s for s in stems if stems.count(s) > 1)
        raise FmError(f"two files are named {twice!r}: their results would share {output_dir / twice}.{fmt}")
    model = _load(out_dir, device, backend, no_verify_hashes, dtype)
    if audio_front(model.spec):
        whisper_only = [o for o, v in (("--language", language), ("--task", task), ("--num-beams", num_beams),
                                       ("--length-penalty", length_penalty), ("--max-new-tokens", max_new_tokens),
                                       ("--prompt", prompt), ("--prompt-every-window", prompt_every_window or None),
                                       ("--condition-on-previous", condition), ("--temperature", temperature),
                                       ("--compression-ratio-threshold", compression_ratio_threshold),
                                       ("--logprob-threshold", logprob_threshold),
                                       ("--no-speech-threshold", no_speech_threshold), ("--fallback", fallback or None),
                                       ("--word-timestamps (CTC models: --timestamps)", word_timestamps or None))
                        if v is not None]
        if whisper_only:
            raise FmError(f"{', '.join(whisper_only)}: Whisper's; {model.spec['architecture']} reads its characters "
                          f"off the audio in one pass")
        return _transcribe_ctc(model, out_dir, audio, timestamps, fmt, output_dir, stems, batch_size, chunk_length,
                               stride_length)
    enc = getattr(model, "source_encoder", None)
    if model.spec["audio_mels"]:
        raise FmError(f"{out_dir} is the audio encoder of a speech model: transcribe with the directory above it")
    if enc is None or not enc.spec["audio_mels"]:
        raise FmError(f"{out_dir} holds {model.spec['architecture']}, not a speech model; use `fmconvert generate`")
    lead = model.rank == 0
    tok = _tokenizer(out_dir)
    gc = _speech_config(out_dir)
    gc.setdefault("decoder_start_token_id", model.spec["decoder_start_token_id"])
    stops = stop_ids(out_dir, model.spec)
    fe = feature_extractor(out_dir, enc.spec)
    temps = _temperatures(temperature)
    if fallback:                # the model card's recipe, under whatever was given
        temps = temps or (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
        compression_ratio_threshold = 1.35 if compression_ratio_threshold is None else compression_ratio_threshold
        logprob_threshold = -1.0 if logprob_threshold is None else logprob_threshold
        no_speech_threshold = 0.6 if no_speech_threshold is None else no_speech_threshold
    fb = fallback_of(gc, temps, compression_ratio_threshold, logprob_threshold, no_speech_threshold)
    if prompt_every_window and not prompt:
        raise FmError("--prompt-every-window puts --prompt before each window: give a --prompt")
    context = _whisper_prompt(tok, gc, prompt) if prompt else None
    if word_timestamps and timestamps is False:
        raise FmError("--word-timestamps reads the segments' timestamps: drop --no-timestamps")
    if timestamps is None:      # subtitles and words want segments; otherwise the generation config says
        timestamps = True if fmt in ("srt", "vtt") or word_timestamps else bool(gc.get("return_timestamps"))
    median = _median_width(out_dir) if word_timestamps else 7
    num_beams = num_beams or (gc.get("num_beams") if type(gc.get("num_beams")) is int else None) or 1
    waves = [load_audio(p, SAMPLE_RATE) for p in audio]
    seconds = sum(w.numel() for w in waves) / SAMPLE_RATE
    # files of one window go in batches, longer ones in batches of their own (transformers' long-form path, each
    # file seeking on its own); conditioned on earlier text, whose length differs per file, one at a time
    long = [i for i, w in enumerate(waves) if w.numel() > fe.n_samples]
    short = [i for i in range(len(waves)) if i not in long]
    step = 1 if (condition if condition is not None else gc.get("condition_on_prev_tokens")) else batch_size
    groups = [short[j:j + batch_size] for j in range(0, len(short), batch_size)] + \
        [long[j:j + step] for j in range(0, len(long), step)]
    stamp = gc.get("no_timestamps_token_id")
    text_ids = (lambda ids: [i for i in ids if i not in stops and (stamp is None or i <= stamp)])
    # streamed: one file, greedy, one window (long-form re-reads a window cut mid-segment), printed as text
    one = len(waves) == 1 and not timestamps and not long and num_beams == 1 and fmt == "text" and not output_dir \
        and len(fb.temperatures) == 1
    shown = _Streamer(tok, keep=text_ids, on=lead and one)     # one file: its text as it comes

    def said(tokens) -> str:
        return tok.decode(text_ids(tokens), skip_special_tokens=True).strip()

    def stamped(sg) -> str:
        return f"[{sg.start:.2f} -> {sg.end:.2f}] {said(sg.tokens)}"

    def line(tr) -> str:
        if word_timestamps:
            return " ".join(f"[{w.start:.2f} -> {w.end:.2f}] {w.text}" for w in tr.words)
        return " ".join(stamped(sg) for sg in tr.segments) if timestamps else said(tr.tokens)
    # one file's segments, a line each, printed as each window is done (an hour of audio shows as it goes); a bar
    # on a terminal for files past one window
    live = lead and len(waves) == 1 and timestamps and not word_timestamps and fmt == "text" and not output_dir
    bar, job, read = _audio_bar(lead and bool(long), seconds)
    total, t0, outs = GenStats(), time.perf_counter(), [None] * len(waves)
    with bar:
        for group in groups:
            def on_window(row, pieces, done_s, group=group):
                read[group[row]] = done_s
                bar.update(job, completed=sum(read.values()), done=f"{sum(read.values()):.0f} of {seconds:.0f} s")
                for sg in pieces if live else ():
                    click.echo(stamped(sg))
            feats, frames = long_features(fe, [waves[i] for i in group]) if group[0] in long else \
                (features_of(fe, [waves[i] for i in group]), None)
            if frames is None and word_timestamps:      # the frames with audio, as the extractor's mask counts them
                frames = [min(-(-waves[i].numel() // fe.hop_length), feats.shape[-1]) for i in group]
            got, st = run(model, feats, gc, language, task, max_new_tokens, stops, timestamps=timestamps,
                          on_token=(lambda t: shown.add(t[0])) if lead and one else None, num_beams=num_beams,
                          length_penalty=length_penalty, prompt_ids=context,
                          prompt_condition_type="all-segments" if prompt_every_window else None,
                          condition_on_prev_tokens=condition, fallback=fb, seed=seed, frames=frames,
                          word_timestamps=word_timestamps, median_width=median, on_window=on_window)
            for i, tr in zip(group, got):
                if word_timestamps:
                    tr.words = _whisper_words(tok, tr)
                outs[i] = tr
            total.new_tokens += st.new_tokens
            total.prefill_s += st.prefill_s
            total.decode_s += st.decode_s
    if lead and (fmt != "text" or output_dir is not None):
        _write_results(fmt, output_dir, stems, [
            _rendered(fmt, str(p), tr.language, said(tr.tokens), line(tr),
                      [(sg.start, sg.end, said(sg.tokens)) for sg in tr.segments],
                      tr.words if word_timestamps else None,
                      details=[_measures(sg) for sg in tr.segments]) for p, tr in zip(audio, outs)])
    elif lead:
        if one:
            shown.finish()
            click.echo("")
        elif len(waves) == 1 and word_timestamps:    # a word a line
            for w in outs[0].words:
                click.echo(f"[{w.start:.2f} -> {w.end:.2f}] {w.text}")
        elif len(waves) == 1 and not timestamps:
            click.echo(line(outs[0]))
        elif len(waves) > 1:
            for p, tr in zip(audio, outs):
                click.echo(f"{p}\t{line(tr)}")
        # else one file's segments: printed as each window was done
    if lead:
        wall = time.perf_counter() - t0
        again, silent = sum(tr.redecoded for tr in outs), sum(tr.skipped for tr in outs)
        click.echo(f"[{len(waves)} file{'s' * (len(waves) > 1)}, {seconds:.1f} s of audio in {wall:.2f} s "
                   f"({seconds / wall:.1f}x real time) | encoder and first steps {total.prefill_s * 1e3:.0f} ms | "
                   f"{total.new_tokens} tokens at {total.new_tokens / max(total.decode_s, 1e-9):.1f} tok/s | "
                   + (f"{again} window{'s' * (again != 1)} decoded again, {silent} skipped as silence | "
                      if len(fb.temperatures) > 1 or fb.no_speech is not None else "")
                   + f"tp={model.tp} {model.ops.name} {model.device}]", err=True)
    from .runtime.comm import shutdown
    shutdown()


def _audio_bar(wanted: bool, seconds: float):
    """A progress bar over seconds of audio, on stderr, shown only where wanted and stderr is a terminal (it goes
    when done) -> (the bar, its task, {file: seconds read}) for the caller to update."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    console = _console(stderr=True)
    bar = Progress(TextColumn("[bold]transcribing"), BarColumn(), TextColumn("{task.fields[done]} of audio"),
                   TimeRemainingColumn(), console=console, transient=True, disable=not (wanted and console.is_terminal))
    return bar, bar.add_task("audio", total=seconds, done=""), {}


def _waves(model, audio) -> list:
    """The files as 16 kHz mono waveforms, each long enough for the model's conv stack to make a frame of."""
    from .runtime.audio import load_audio
    from .runtime.ctc import SAMPLE_RATE, check_lengths
    waves = [load_audio(p, SAMPLE_RATE) for p in audio]
    check_lengths(model, waves, [str(p) for p in audio])
    return waves


def _transcribe_ctc(model, out_dir, audio, timestamps, fmt, output_dir, stems, batch_size, chunk_length,
                    stride_length):
    """`transcribe` with a CTC model: every file's text (and words, with their times) in one forward each, or per
    window of a long file; printed as each file is done, or rendered as subtitles or JSON."""
    import time

    from .runtime.ctc import SAMPLE_RATE, cues, feature_extractor, recognize
    lead = model.rank == 0
    tok = _tokenizer(out_dir)
    fe = feature_extractor(out_dir, model.spec)
    timestamps = fmt in ("srt", "vtt", "json") if timestamps is None else timestamps
    waves = _waves(model, audio)
    seconds = sum(w.numel() for w in waves) / SAMPLE_RATE
    plain = fmt == "text" and output_dir is None

    def line(r) -> str:
        return " ".join(f"[{a:.2f} -> {b:.2f}] {t}" for a, b, t in cues(r.words)) if timestamps else r.text

    done, printed = {}, [0]

    def shown(i, r):        # printed in order, each as soon as it and the files before it are done
        done[i] = r
        while lead and plain and printed[0] in done:
            j, r = printed[0], done[printed[0]]
            if len(waves) == 1 and timestamps:
                for a, b, t in cues(r.words):
                    click.echo(f"[{a:.2f} -> {b:.2f}] {t}")
            else:
                click.echo(line(r) if len(waves) == 1 else f"{audio[j]}\t{line(r)}")
            printed[0] += 1
    t0 = time.perf_counter()
    bar, job, read = _audio_bar(lead and any(w.numel() > chunk_length * SAMPLE_RATE for w in waves), seconds)
    try:
        with bar:
            def progress(i, n):
                read[i] = n / SAMPLE_RATE
                bar.update(job, completed=sum(read.values()), done=f"{sum(read.values()):.0f} of {seconds:.0f} s")
            outs = recognize(model, tok, fe, waves, batch_size, chunk_length, stride_length, words=timestamps,
                             on_file=shown, on_progress=progress)
    except ValueError as e:         # e.g. a window too short for the conv stack
        raise FmError(str(e).splitlines()[0]) from None
    if lead and not plain:
        _write_results(fmt, output_dir, stems, [
            _rendered(fmt, str(p), None, r.text, line(r), cues(r.words) if timestamps else
                      [(0.0, w.numel() / SAMPLE_RATE, r.text)], r.words if timestamps else None)
            for p, r, w in zip(audio, outs, waves)])
    if lead:
        wall = time.perf_counter() - t0
        click.echo(f"[{len(waves)} file{'s' * (len(waves) > 1)}, {seconds:.1f} s of audio in {wall:.2f} s "
                   f"({seconds / wall:.1f}x real time) | CTC, one pass | tp={model.tp} {model.ops.name} "
                   f"{model.device}]", err=True)
    from .runtime.comm import shutdown
    shutdown()


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--text", "-t", "texts", multiple=True, help="Text to embed (repeatable).")
@click.option("--file", "-f", "text_file", type=click.Path(path_type=Path, dir_okay=False),
              help="A UTF-8 file of texts to embed, one per line (with or besides --text).")
@click.option("--pooling", default="auto", show_default=True,
              type=click.Choice(["auto", "pooler", "cls", "mean", "max", "mean_sqrt_len", "weightedmean", "lasttoken"]),
              help="auto = what a sentence-transformers checkpoint's modules.json and Pooling config say (and its "
                   "Normalize, and its max_seq_length); without them the pooler if the model has one, else mean. "
                   "pooler = BERT's tanh pooler; cls = first token; mean / max / mean_sqrt_len / weightedmean over "
                   "the real tokens; lasttoken = each text's last token.")
@click.option("--normalize/--no-normalize", default=None,
              help="Scale each vector to unit length. Default: as the sentence-transformers pipeline says, else no.")
@click.option("--max-length", type=int, default=None,
              help="Tokens kept per text. Default: sentence-transformers' max_seq_length, else the model's positions.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Texts encoded per forward.")
@click.option("--prompt-name", default=None,
              help="Put this named prompt of config_sentence_transformers.json before each text (Qwen3-Embedding's "
                   "and e5's queries: e.g. `query`). Default: its default_prompt_name, if any.")
@click.option("--prompt", "prompt_text", default=None, help="Put this text before each text (instead of a named one).")
@click.option("--audio", "-a", "audio", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="A speech encoder (Wav2Vec2, HuBERT, WavLM, ...): a WAV file to embed (repeatable). An x-vector "
                   "model (*ForXVector: wavlm-base-plus-sv) gives its speaker embedding, normalized unless "
                   "--no-normalize (compare two by their dot product); any other, the mean of its last hidden "
                   "state over the real frames.")
@runtime_options
def embed(out_dir, texts, text_file, pooling, normalize, max_length, batch_size, prompt_name, prompt_text, audio,
          device, backend, no_verify_hashes, dtype):
    """Embed text with a converted encoder (BERT, RoBERTa, XLM-R, MPNet, ModernBERT, ...) or a decoder embedding
    model (Qwen3-Embedding, e5-mistral, gte-Qwen2): one JSON vector per line, in the order given. A
    sentence-transformers model (all-mpnet-base-v2, all-MiniLM-L6-v2, Qwen3-Embedding, ...) gives the vectors its
    own pipeline would, read from the files conversion copies beside the shards. A speech encoder embeds --audio
    files likewise."""
    from .runtime.embed import by_length, sentence_config, sentence_vectors
    if audio:
        if texts or text_file is not None or pooling not in ("auto", "mean"):
            raise FmError("--audio embeds sound: drop --text, --file and --pooling (a clip is its x-vector, or the "
                          "mean of its frames)")
        return _embed_audio(out_dir, audio, normalize, batch_size, device, backend, no_verify_hashes, dtype)
    if text_file is not None:
        texts = (*texts, *_lines(text_file))
    if not texts:
        raise FmError("nothing to embed: give --text or --file")
    if batch_size < 1 or (max_length is not None and max_length < 1):
        raise FmError("--batch-size and --max-length must be positive")
    if not (Path(out_dir) / "manifest.json").is_file():
        raise FmError(f"{out_dir} holds no converted model (no manifest.json)")
    st = sentence_config(out_dir) if pooling == "auto" or prompt_name else None
    if prompt_name is not None and prompt_text is not None:
        raise FmError("give --prompt or --prompt-name, not both")
    if prompt_name is not None and (st is None or prompt_name not in st.prompts):
        known = ", ".join(sorted(st.prompts)) if st and st.prompts else "none"
        raise FmError(f"{out_dir}: no prompt named {prompt_name!r} (its prompts: {known})")
    prefix = prompt_text if prompt_text is not None else st.prompts.get(prompt_name or st.default_prompt or "", "") \
        if st else ""
    texts = tuple(prefix + t for t in texts)
    st = st if pooling == "auto" else None
    if st is not None:      # as sentence-transformers' Transformer module tokenizes: stripped, maybe lowercased
        texts = tuple(t.strip().lower() if st.lower else t.strip() for t in texts)
    model = _load(out_dir, device, backend, no_verify_hashes, dtype)
    _not_speech(model, out_dir)
    if model.spec.get("encoder"):
        raise FmError(f"{out_dir} is an encoder-decoder ({model.spec['architecture']}): its decoder needs a source; "
                      f"embed with its encoder: fmconvert embed {Path(out_dir) / model.spec['encoder']}")
    if pooling != "auto":
        modes = (pooling,)
    elif st is not None:
        modes = st.modes
    else:       # a decoder's last token is the one that has read the whole text
        modes = ("lasttoken",) if model.spec["kind"] == "decoder" else ("pooler",) if model.spec.get("pooler") \
            or model.spec.get("eos_pool") else ("mean",)
        if model.rank == 0:
            click.echo(f"pooling: {modes[0]} (no sentence-transformers config; --pooling picks another)", err=True)
    normalize = (st is not None and st.normalize) if normalize is None else normalize
    limit = _length_limit(model, max_length or (st.max_length if st else None))
    tok = _tokenizer(out_dir)
    if tok.pad_token is None:       # many decoders' tokenizers (Llama 3's): any id pads, the mask hides it
        if tok.eos_token is None:
            raise FmError(f"{out_dir}: the tokenizer has neither a pad nor an eos token to pad a batch with")
        tok.pad_token = tok.eos_token
    rows = [None] * len(texts)
    for idx in by_length(tok, texts, batch_size):
        vec = sentence_vectors(model, tok, [texts[i] for i in idx], modes, normalize, limit,
                               st.dense if st else ())
        for i, v in zip(idx, vec.cpu()):
            rows[i] = v
    if model.rank == 0:
        for v in rows:
            click.echo(json.dumps([round(x, 6) for x in v.tolist()]))


def _embed_audio(out_dir, audio, normalize, batch_size, device, backend, no_verify_hashes, dtype):
    """embed --audio: a JSON vector a file, in order."""
    from .runtime.ctc import embed_audio, feature_extractor, head_kind
    if batch_size < 1:
        raise FmError("--batch-size must be positive")
    model = _load(out_dir, device, backend, no_verify_hashes, dtype)
    if not audio_front(model.spec):
        raise FmError(f"{out_dir} holds {model.spec['architecture']}, which reads text, not audio: use --text")
    xvector = head_kind(model.spec) == "xvector"
    rows = embed_audio(model, feature_extractor(out_dir, model.spec), _waves(model, audio), batch_size,
                       normalize=xvector if normalize is None else normalize)
    if model.rank == 0:
        for v in rows:
            click.echo(json.dumps([round(x, 6) for x in v.tolist()]))
    from .runtime.comm import shutdown
    shutdown()


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--text", "-t", "texts", multiple=True, help="Text to classify (repeatable).")
@click.option("--pair", "pairs", multiple=True,
              help="A second segment for each --text, in order (a reranker's passage, an NLI hypothesis).")
@click.option("--file", "-f", "text_file", type=click.Path(path_type=Path, dir_okay=False),
              help="A UTF-8 file of texts, one per line; a tab splits a line into text and pair.")
@click.option("--max-length", type=int, default=None, help="Tokens kept per input. Default: the model's positions.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Inputs per forward.")
@click.option("--labels", "candidates", default=None,
              help="Zero-shot classification with an NLI model (bart-large-mnli, roberta-large-mnli, ...): these "
                   "comma-separated labels, each tried as the hypothesis --template makes of it, scored by "
                   "entailment as transformers' zero-shot pipeline does.")
@click.option("--template", default="This example is {}.", show_default=True,
              help="With --labels: the hypothesis for a label ({} is the label).")
@click.option("--multi-label", is_flag=True,
              help="With --labels: each label scored on its own (entailment against contradiction), not against the "
                   "others.")
@click.option("--audio", "-a", "audio", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="An audio classifier (Wav2Vec2, HuBERT *ForSequenceClassification: keyword spotting, emotion, "
                   "language id): a WAV file to classify (repeatable).")
@runtime_options
def classify(out_dir, texts, pairs, text_file, max_length, batch_size, candidates, template, multi_label, audio,
             device, backend, no_verify_hashes, dtype):
    """Classify or score text with a converted *ForSequenceClassification encoder (a sentiment or NLI model, a
    cross-encoder reranker such as bge-reranker or ms-marco-MiniLM). Prints one JSON object per input: the best
    label and every label's probability (softmax), or for a one-logit head its score (sigmoid) and raw logit. A
    *ForTokenClassification encoder (NER, such as bert-base-NER) prints one JSON list per text instead: each
    token's text, character span, best label and its probability. An audio classifier takes --audio files and
    prints a JSON object per file likewise; a frame classifier (*ForAudioFrameClassification: speaker diarization)
    each label's spans of active frames (sigmoid from 0.5), start and end in seconds."""
    import torch

    from .runtime.classify import classify as run, labels, scores
    from .runtime.embed import by_length
    texts, pairs = list(texts), list(pairs)
    if text_file is not None:
        split = [line.split("\t", 1) for line in _lines(text_file)]
        if len({len(s) for s in split}) > 1:
            raise FmError(f"{text_file}: either every line holds a tab (text, then its pair) or none does")
        texts += [s[0] for s in split]
        pairs += [s[1] for s in split if len(s) == 2]
    if pairs and len(pairs) != len(texts):
        raise FmError(f"{len(pairs)} pairs for {len(texts)} inputs: give a pair for every input or for none")
    names = [c.strip() for c in candidates.split(",") if c.strip()] if candidates is not None else None
    if names is not None and (not names or pairs or "{}" not in template):
        raise FmError("--labels needs labels, no --pair (the hypotheses are made of the labels) and a --template "
                      "with {}")
    if audio and (texts or names is not None):
        raise FmError("--audio classifies sound: drop --text, --file and --labels")
    if not texts and not audio:
        raise FmError("nothing to classify: give --text, --file or --audio")
    if batch_size < 1 or (max_length is not None and max_length < 1):
        raise FmError("--batch-size and --max-length must be positive")
    model = _load(out_dir, device, backend, no_verify_hashes, dtype)
    if audio or audio_front(model.spec):
        return _classify_audio(model, out_dir, audio, batch_size)
    _not_speech(model, out_dir)
    if (model.spec["kind"] != "encoder" and not model.spec.get("encoder")) or model.spec.get("classifier") is None:
        arch = model.spec["architecture"]
        raise FmError(f"{out_dir} holds no classifier fmconvert runs ({arch}): " + (
            "its family's table describes no such head" if arch.endswith(("ForSequenceClassification",
                                                                          "ForTokenClassification"))
            else "convert a *ForSequenceClassification or *ForTokenClassification checkpoint"))
    if model.spec["classifier"]["pool"] == "spans":
        raise FmError(f"{out_dir} holds a question-answering head ({model.spec['architecture']}): use "
                      f"`fmconvert answer`")
    per_token = model.spec["classifier"]["pool"] == "tokens"
    if per_token and pairs:
        raise FmError(f"{model.spec['architecture']} labels each token of one text: drop --pair")
    limit = _length_limit(model, max_length)
    tok = _tokenizer(out_dir)
    multi = _multi_label(out_dir)
    if names is not None:
        return _zero_shot(model, run, tok, texts, names, template, multi_label, limit, batch_size, out_dir)
    rows = [None] * len(texts)
    for idx in by_length(tok, texts, batch_size, pairs):
        try:
            out = run(model, tok, [texts[i] for i in idx], [pairs[i] for i in idx] if pairs else None, limit)
        except NotImplementedError:        # a slow tokenizer has no character offsets
            raise FmError(f"{out_dir}: labelling tokens needs a fast tokenizer (tokenizer.json) for their "
                          f"character spans") from None
        for j, i in enumerate(idx):
            rows[i] = (out[0][j].cpu(), out[1][j]) if per_token else out[j].cpu()
    if model.rank == 0 and per_token:       # one JSON list per text: each token's span, label and probability
        names = labels(out_dir, rows[0][0].shape[-1])
        for text, (logits, spans) in zip(texts, rows):
            p = scores(logits, multi)
            click.echo(json.dumps([{"token": text[a:b], "start": a, "end": b, "label": names[int(q.argmax())],
                                    "score": round(float(q.max()), 6)}
                                   for (a, b), q in zip(spans.tolist(), p) if b > a]))
    elif model.rank == 0:
        logits = torch.stack(rows)
        names = labels(out_dir, logits.shape[-1])
        for row, p in zip(logits, scores(logits, multi)):
            if len(names) == 1:
                click.echo(json.dumps({"score": round(p.item(), 6), "logit": round(row.item(), 6)}))
            else:
                best = int(p.argmax())
                click.echo(json.dumps({"label": names[best], "scores": {n: round(x, 6) for n, x in
                                                                          zip(names, p.tolist())}}))


def _multi_label(out_dir) -> bool:
    """Whether config.json says its head labels each class on its own (problem_type multi_label_classification)."""
    try:
        return json.loads((Path(out_dir) / "config.json").read_text()).get("problem_type") == \
            "multi_label_classification"
    except (OSError, ValueError, AttributeError):
        return False


def _classify_audio(model, out_dir, audio, batch_size):
    """classify --audio: a JSON object per file, its best label and every label's probability (a sigmoid each
    for a multi-label head); from a frame classifier (diarization), each label's spans of active frames."""
    import torch

    from .runtime.classify import labels, scores
    from .runtime.ctc import SAMPLE_RATE, active_spans, classify_audio, feature_extractor, head_kind, ratio
    if not audio_front(model.spec):
        raise FmError(f"{out_dir} holds {model.spec['architecture']}, which reads text, not audio: use --text")
    if not audio:
        _not_speech(model, out_dir)
    kind = head_kind(model.spec)
    if kind not in ("clips", "frames"):
        raise FmError(f"{out_dir} holds {model.spec['architecture']}, no audio classifier" + (
            f": use `fmconvert transcribe {out_dir} AUDIO.wav`" if kind == "ctc" else
            f": it embeds speakers, use `fmconvert embed {out_dir} --audio AUDIO.wav`" if kind == "xvector" else
            " (convert a *ForSequenceClassification or *ForAudioFrameClassification checkpoint)"))
    fe = feature_extractor(out_dir, model.spec)
    rows = classify_audio(model, fe, _waves(model, audio), batch_size)
    if model.rank == 0:
        names = labels(out_dir, rows[0].shape[-1])
        for p, row in zip(audio, rows):
            if kind == "frames":        # each label's active spans (a sigmoid a label, from 0.5)
                click.echo(json.dumps({"file": str(p), "segments": active_spans(
                    torch.sigmoid(row), names, ratio(audio_front(model.spec)) / SAMPLE_RATE)}))
                continue
            prob = scores(row.unsqueeze(0), _multi_label(out_dir))[0]
            click.echo(json.dumps({"file": str(p), "label": names[int(prob.argmax())],
                                   "scores": {n: round(x, 6) for n, x in zip(names, prob.tolist())}}))
    from .runtime.comm import shutdown
    shutdown()


def _zero_shot(model, run, tok, texts, names, template, multi_label, limit, batch_size, out_dir):
    """classify --labels: each text paired with each label's hypothesis; its entailment logits softmaxed over the
    labels (or, multi-label, each label's entailment against its contradiction), as transformers' zero-shot
    pipeline. One JSON object per text: the labels best first, and their scores."""
    import torch

    from .runtime.classify import labels as label_names
    from .runtime.embed import by_length
    try:
        n = len(json.loads((Path(out_dir) / "config.json").read_text()).get("id2label") or {})
    except (OSError, ValueError, AttributeError):
        n = 0
    ids = label_names(out_dir, n)
    entail = next((i for i, n in enumerate(ids) if n.lower().startswith("entail")), None)
    if entail is None:
        raise FmError(f"{out_dir}: zero-shot classification needs an NLI model, with an entailment label in "
                      f"config.json's id2label (it has {', '.join(ids)})")
    contra = 0 if entail != 0 else -1
    premises = [t for t in texts for _ in names]
    hyps = [template.format(n) for _ in texts for n in names]
    logits = [None] * len(premises)
    for idx in by_length(tok, premises, batch_size, hyps):
        out = run(model, tok, [premises[i] for i in idx], [hyps[i] for i in idx], limit)
        for j, i in enumerate(idx):
            logits[i] = out[j].cpu()
    logits = torch.stack(logits).view(len(texts), len(names), -1)
    if multi_label:
        p = logits[..., [contra, entail]].softmax(-1)[..., 1]
    else:
        p = logits[..., entail].softmax(-1)
    if model.rank == 0:
        for row in p:
            order = row.argsort(descending=True).tolist()
            click.echo(json.dumps({"labels": [names[i] for i in order],
                                   "scores": [round(float(row[i]), 6) for i in order]}))


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--question", "-q", "questions", multiple=True, help="A question (repeatable; one --context each).")
@click.option("--context", "-c", "contexts", multiple=True, help="The text to find its answer in.")
@click.option("--file", "-f", "text_file", type=click.Path(path_type=Path, dir_okay=False),
              help="A UTF-8 file of questions, one per line, each a tab then its context.")
@click.option("--max-length", type=int, default=None,
              help="Tokens of question and context kept; the context is cut. Default: the model's positions.")
@click.option("--max-answer", type=int, default=30, show_default=True, help="The longest answer, in tokens.")
@click.option("--stride", type=int, default=128, show_default=True,
              help="A context past --max-length is read in windows overlapping by this many tokens (0: its first "
                   "window only), the most probable answer of any window kept.")
@runtime_options
def answer(out_dir, questions, contexts, text_file, max_length, max_answer, stride, device, backend, no_verify_hashes,
           dtype):
    """Answer questions from a context with a converted *ForQuestionAnswering encoder (extractive QA: roberta-base-
    squad2, deberta-v3 squad models, ...). Prints one JSON object per question: the context's best span (start at
    or before its end, at most --max-answer tokens), its character offsets and its probability."""
    from .runtime.classify import answers
    questions, contexts = list(questions), list(contexts)
    if text_file is not None:
        split = [line.split("\t", 1) for line in _lines(text_file)]
        if any(len(s) != 2 for s in split):
            raise FmError(f"{text_file}: every line must hold a question, a tab, then its context")
        questions += [s[0] for s in split]
        contexts += [s[1] for s in split]
    if not questions or len(questions) != len(contexts):
        raise FmError(f"{len(questions)} questions for {len(contexts)} contexts: give one --context per --question")
    if max_answer < 1 or (max_length is not None and max_length < 1) or stride < 0:
        raise FmError("--max-answer and --max-length must be positive, --stride not negative")
    model = _load(out_dir, device, backend, no_verify_hashes, dtype)
    _not_speech(model, out_dir)
    head = model.spec.get("classifier") if model.spec["kind"] == "encoder" else None
    if head is None or head["pool"] != "spans":
        raise FmError(f"{out_dir} holds no question-answering head ({model.spec['architecture']}); convert a "
                      f"*ForQuestionAnswering checkpoint")
    limit = _length_limit(model, max_length)
    tok = _tokenizer(out_dir)
    try:
        found = answers(model, tok, questions, contexts, limit, max_answer, stride)
    except NotImplementedError:        # a slow tokenizer has no character offsets
        raise FmError(f"{out_dir}: answering needs a fast tokenizer (tokenizer.json) for the spans' characters") \
            from None
    if model.rank == 0:
        for a in found:
            click.echo(json.dumps({**a, "score": round(a["score"], 6)}))


def _one_line(msg: str) -> str:
    """Messages quote names from untrusted files: escape newlines and terminal control sequences."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)


def main(argv=None):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker ends without the interpreter's teardown, once its output is flushed: the collectives'
        # threads can abort a process there ("terminate called without an active exception") after the work is
        # done and the group left, which torchrun would report as a failed run.
        code = 0
        try:
            _main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _main(argv)


def _main(argv):
    try:
        cli.main(args=argv, prog_name="fmconvert", standalone_mode=False)
    except FmError as e:
        click.echo(f"error: {_one_line(str(e))}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:  # disk full, permissions, a vanished file: the environment, not a bug
        where = f" ({e.filename})" if e.filename else ""
        click.echo(f"error: I/O error: {_one_line(e.strerror or str(e))}{_one_line(where)}", err=True)
        sys.exit(EXIT_IO)
    except Exception as e:  # a bug in fmconvert, not in the input
        if os.environ.get("FMCONVERT_DEBUG"):
            raise
        click.echo(f"error: internal error: {type(e).__name__}: {_one_line(str(e))} "
                   "(rerun with FMCONVERT_DEBUG=1 for a traceback)", err=True)
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
