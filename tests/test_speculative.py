"""Speculative decoding (runtime/speculative.py): greedy keeps the target's own tokens exactly, whatever the draft
(itself, its int8 conversion, another family), with the logits processors and the end token, at tp 1 and 2; the
real stories260K drafted by its int8 conversion; the sampling check keeps the target's distribution; pairs that
cannot decode together refused in one line; `generate --draft`."""

from __future__ import annotations

import pytest
import torch

import tiny
from corpus import run_main
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.generate import generate
from fmconvert.runtime.load import load
from fmconvert.runtime.processors import Processors
from fmconvert.runtime.speculative import accept, speculative_generate


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Conversions: the tiny Llama (float, int8, each at tp 1 and 2), a Mistral of its vocabulary (another model),
    a Gemma 2 (a sliding window of 4)."""
    root = tmp_path_factory.mktemp("speculative")
    out = {}
    llama = tiny.save("llama", root / "llama")
    for name, src, opts in (("fp", llama, Options()), ("q", llama, Options(int8=True)),
                            ("fp2", llama, Options(tp=2)), ("q2", llama, Options(tp=2, int8=True)),
                            ("other", tiny.save("mistral", root / "mistral", seed=3), Options()),
                            ("window", tiny.save("gemma2", root / "gemma2"), Options())):
        convert(src, root / name, opts, progress=False)
        out[name] = root / name
    return out


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_keeps_the_targets_tokens(dirs, k):
    """Whatever the draft (itself: every proposal stands; its int8 conversion: most do; another model: few do),
    the tokens are the target's greedy ones, up to the end token, and with processors that read the text."""
    m = load(dirs["fp"])
    ids = tiny.ids(6, 1, B=1)
    rates = {}
    for procs in (None, Processors(repetition_penalty=1.3, no_repeat_ngram=2)):
        want, _ = generate(m, ids, 30, processors=procs)
        for name in ("fp", "q", "other"):
            got, st = speculative_generate(m, m if name == "fp" else load(dirs[name]), ids, 30, k=k,
                                           processors=procs)
            assert got.tolist() == want.tolist(), (name, procs)
            assert st.new_tokens == 30 and st.tokens == want[0, 6:].tolist()
            rates[name] = st.accepted / st.drafted
    assert rates["fp"] == 1.0 and rates["other"] < rates["q"]
    stop = generate(m, ids, 30)[0][0, 6 + 11].item()        # an end token the greedy text reaches
    want, _ = generate(m, ids, 30, eos_token_id=stop)
    got, st = speculative_generate(m, load(dirs["q"]), ids, 30, k=k, eos_token_id=stop)
    assert got.tolist() == want.tolist() and got[0, -1].item() == stop


def test_tp2(dirs):
    """At tp 2 (the draft too), on every rank: the target's greedy tokens."""
    ids = tiny.ids(5, 2, B=1)
    want = generate(load(dirs["fp"]), ids, 20)[0].tolist()

    def run(m):
        draft = load(dirs["q2"], comm=m.comm)        # the same ranks
        return speculative_generate(m, draft, ids, 20, k=4)[0].tolist()
    assert tiny.on_ranks(dirs["fp2"], 2, run) == [want, want]


@pytest.fixture(scope="module")
def stories(model_dir, tmp_path_factory):
    """stories260K converted: float32 and int8."""
    root = tmp_path_factory.mktemp("spec_stories")
    for name, opts in (("fp", Options()), ("q", Options(int8=True))):
        convert(model_dir("stories"), root / name, opts, progress=False)
    return root


def test_stories_drafted_by_its_int8_conversion(stories):
    """The real stories260K, float32, drafted by its own int8 conversion: its greedy story exactly, with most of
    the draft's tokens kept."""
    m = load(stories / "fp")
    ids = torch.tensor([[1, 403, 407, 261, 378, 319]])      # "Once upon a time"
    want, _ = generate(m, ids, 80)
    got, st = speculative_generate(m, load(stories / "q"), ids, 80, k=4)
    assert got.tolist() == want.tolist()
    assert st.accepted / st.drafted > 0.8


def test_the_sampling_check_keeps_the_targets_distribution():
    """A token drawn from the draft's q, checked against the target's p (kept with probability min(1, p/q), else
    replaced from max(p - q, 0)): over many draws, distributed as p; so is a proposal made for sure."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    gen = torch.Generator().manual_seed(0)
    for q in (torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.7, 0.1, 0.1, 0.1]), p.clone()):
        counts = torch.zeros(4)
        for _ in range(20000):
            x = int(torch.multinomial(q, 1, generator=gen))
            y = accept(p, q, x, gen)
            counts[x if y is None else y] += 1
        assert (counts / counts.sum() - p).abs().max() < 0.015, q
    for token in (0, 3):        # a proposal made for sure (prompt lookup's): still distributed as p
        counts = torch.zeros(4)
        for _ in range(20000):
            y = accept(p, None, token, gen)
            counts[token if y is None else y] += 1
        assert (counts / counts.sum() - p).abs().max() < 0.015, token


def test_sampling_decodes_from_the_target(dirs):
    """Sampled with a draft: tokens only from the target's top-k, a seed repeats itself, another seed differs."""
    m, q = load(dirs["fp"]), load(dirs["q"])
    ids = tiny.ids(6, 1, B=1)
    runs = [speculative_generate(m, q, ids, 20, k=3, temperature=0.9, top_k=5, seed=s)[0][0, 6:].tolist()
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]
    # every token one of the target's five likeliest after the text before it
    seq = ids[0].tolist()
    for tok in runs[0]:
        assert tok in m(torch.tensor([seq]))[0, -1].topk(5).indices.tolist()
        seq.append(tok)


def test_pairs_that_cannot_decode_together_are_refused(dirs, stories):
    m = load(dirs["fp"])
    ids = tiny.ids(6, 1, B=1)
    for draft, args, match in [(load(dirs["window"]), (ids, 20), "sliding window"),
                               (load(stories / "fp"), (ids, 20), "vocabulary has 512 tokens"),
                               (m, (tiny.ids(6, 1, B=2), 20), "one prompt at a time")]:
        with pytest.raises(FmError, match=match) as e:
            speculative_generate(m, draft, *args)
        assert "\n" not in str(e.value)


def test_cli_generate_with_a_draft(dirs, stories, capsys):
    """`generate --draft` prints the story generate prints alone, and how many of the draft's tokens stood; a draft
    that cannot roll back, and --num-beams with a draft, are refused in one line."""
    code, alone, err = run_main(capsys, "generate", stories / "fp", "-p", "Once upon a time", "-n", "40")
    assert code == 0, err
    code, drafted, err = run_main(capsys, "generate", stories / "fp", "-p", "Once upon a time", "-n", "40",
                                  "--draft", stories / "q", "--speculate", "3")
    assert code == 0, err
    assert drafted == alone and "proposed tokens kept" in err
    for args, match in [(["--draft", dirs["window"]], "sliding window"),
                        (["--draft", stories / "q", "--num-beams", "2"], "--draft decodes greedily or samples")]:
        code, out, err = run_main(capsys, "generate", stories / "fp", "-p", "Once", "-n", "24", *args)
        assert code != 0 and match in err and len(err.strip().splitlines()) == 1 and not out, err


def test_prompt_lookup(dirs, stories, capsys):
    """Prompt lookup (no draft model): the continuation of the text's last n-gram where it occurred before;
    greedy keeps the target's tokens, on a tiny model and on stories260K, whose story repeats its own phrases
    (so proposals stand); a text without a repeat proposes nothing. The CLI's --prompt-lookup too, and with --file
    either way of proposing."""
    from fmconvert.runtime.speculative import lookup
    assert lookup([5, 6, 7, 8, 5, 6], 2, 3) == [7, 8, 5] and lookup([5, 6, 7, 8, 9, 6], 2, 2) == [7, 8]
    assert lookup([1, 2, 3], 2, 4) == [] and lookup([4, 4], 2, 3) == [4]
    for d, ids, n in ((dirs["fp"], tiny.ids(6, 1, B=1), 30), (stories / "fp", torch.tensor([[1, 403, 407, 261, 378,
                                                                                              319]]), 120)):
        m = load(d)
        want, _ = generate(m, ids, n)
        got, st = speculative_generate(m, None, ids, n, k=5)
        assert got.tolist() == want.tolist()
    assert st.accepted > 10 and st.target_steps < n       # the story's repeats stood
    code, alone, err = run_main(capsys, "generate", stories / "fp", "-p", "Once upon a time", "-n", "60")
    code2, looked, err = run_main(capsys, "generate", stories / "fp", "-p", "Once upon a time", "-n", "60",
                                  "--prompt-lookup", "4")
    assert code == code2 == 0 and looked == alone and "from the text itself" in err, err
    code, out, err = run_main(capsys, "generate", stories / "fp", "-p", "Once", "--prompt-lookup", "4", "--draft",
                              stories / "q")
    assert code != 0 and "give one" in err and not out
    lines = stories / "lines.txt"      # --file: a prompt at a time, each line what it is without speculation
    lines.write_text("Once upon a time\nThe little dog\nTom and Sue went\n")
    code, alone, err = run_main(capsys, "generate", stories / "fp", "-f", lines, "-n", "30")
    assert code == 0, err
    for extra in (["--prompt-lookup", "3"], ["--draft", stories / "q"]):
        code, out, err = run_main(capsys, "generate", stories / "fp", "-f", lines, "-n", "30", *extra)
        assert code == 0 and out == alone and len(out.splitlines()) == 3 and "proposed tokens kept" in err, err


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_prompt_lookup_on_an_encoder_decoder(tmp_path, name):
    """An encoder-decoder looks up its source and its output: greedy keeps generate()'s tokens, with BART's forced
    first and last tokens; a source the model copies from lets proposals stand. A draft model is refused."""
    from test_seq2seq import build
    hf = build(name)
    hf.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids = tiny.ids(12, 5, B=1).remainder(90) + 3
    plain, _ = generate(m, ids, 24)
    ids = torch.cat([ids, plain[:, 1:13]], 1)     # a source holding what the model says: proposals to find
    eos = hf.config.eos_token_id
    for kw in (dict(), dict(forced_bos=5, forced_eos=eos)):
        want, _ = generate(m, ids, 24, eos_token_id=eos, **kw)
        got, st = speculative_generate(m, None, ids, 24, k=4, eos_token_id=eos, **kw)
        assert got.tolist() == want.tolist(), kw
    assert st.accepted > 0
    with pytest.raises(FmError, match="takes prompt lookup"):
        speculative_generate(m, m, ids, 8)
