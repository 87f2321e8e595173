"""Generation options, the sampler's filters (against transformers' logits processors), stop strings
and the decoding loop."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from flashio.errors import FlashError
from flashio.generation import GenerationConfig, Sampler, eos_ids, stream_tokens
from flashio.stopping import StopChecker

DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "tasks" / "demo" / "opt-stdlib" / "tokenizer.json"

transformers_lp = pytest.importorskip("transformers.generation.logits_process")

V = 500


def _hf_process(cfg: GenerationConfig, logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """transformers' processors in the order its generate() builds them for do_sample=True."""
    procs = []
    if cfg.repetition_penalty != 1.0:
        procs.append(transformers_lp.RepetitionPenaltyLogitsProcessor(float(cfg.repetition_penalty)))
    if cfg.temperature != 1.0:
        procs.append(transformers_lp.TemperatureLogitsWarper(float(cfg.temperature)))
    if cfg.top_k:
        procs.append(transformers_lp.TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        procs.append(transformers_lp.TopPLogitsWarper(cfg.top_p))
    if cfg.min_p:
        procs.append(transformers_lp.MinPLogitsWarper(cfg.min_p))
    scores = logits[None].clone()
    input_ids = torch.tensor([ids])
    for p in procs:
        scores = p(input_ids, scores)
    return scores[0]


@pytest.mark.parametrize("opts", [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=10),
    dict(temperature=1.3, top_k=40, top_p=0.9),
    dict(temperature=0.8, top_p=0.5),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.6, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.3),
    dict(temperature=1.0, repetition_penalty=0.8),
])
def test_sampler_filters_match_transformers(opts):
    g = torch.Generator().manual_seed(len(str(opts)))
    for trial in range(5):
        logits = torch.randn(V, generator=g) * (1 + 2 * trial)  # from flat to peaked distributions
        ids = torch.randint(0, V, (30,), generator=g).tolist()
        cfg = GenerationConfig(**opts)
        ours = Sampler(cfg).process(logits, ids)
        ref = _hf_process(cfg, logits, ids)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (opts, trial)
        kept = ~torch.isinf(ref)
        assert kept.sum() >= 1
        torch.testing.assert_close(ours[kept], ref[kept], rtol=1e-6, atol=1e-6)


def test_filters_remove_something_and_keep_the_best():
    """The comparison above must be able to fail: the filters do cut the vocabulary."""
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 3
    out = Sampler(GenerationConfig(temperature=1.0, top_k=20, top_p=0.9)).process(logits, [])
    kept = int((~torch.isinf(out)).sum())
    assert 1 <= kept <= 20
    assert not torch.isinf(out[int(torch.argmax(logits))])


def test_greedy_takes_the_argmax_after_the_repetition_penalty():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert Sampler(GenerationConfig(temperature=0)).__call__(logits, [1]) == 1
    assert Sampler(GenerationConfig(temperature=0, repetition_penalty=1.2)).__call__(logits, [1]) == 2


def test_seeded_sampling_repeats_and_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0]))
    cfg = GenerationConfig(temperature=1.0, seed=123)
    a = [Sampler(cfg)(logits, []) for _ in range(3)]
    s1, s2 = Sampler(cfg), Sampler(cfg)
    seq1 = [s1(logits, []) for _ in range(50)]
    seq2 = [s2(logits, []) for _ in range(50)]
    assert seq1 == seq2 and len(set(a)) == 1
    counts = torch.bincount(torch.tensor([Sampler(cfg.updated(seed=i))(logits, []) for i in range(2000)]),
                            minlength=4).float() / 2000
    assert counts[3] == 0
    torch.testing.assert_close(counts[:3], torch.tensor([0.5, 0.3, 0.2]), atol=0.04, rtol=0)


def test_config_validation_names_every_bad_value():
    with pytest.raises(FlashError) as e:
        GenerationConfig(temperature=-1, top_p=0, top_k=-2, min_p=1.5, repetition_penalty=0,
                         max_new_tokens=-1, stop=("",), seed="x", eos_token_ids=[-3])
    msg = str(e.value)
    for part in ("temperature=-1", "top_p=0", "top_k=-2", "min_p=1.5", "repetition_penalty=0",
                 "max_new_tokens=-1", "stop=", "seed='x'", "-3"):
        assert part in msg
    with pytest.raises(FlashError, match="temperature=nan"):
        GenerationConfig(temperature=math.nan)
    with pytest.raises(FlashError, match="unknown generation options"):
        GenerationConfig().updated(temprature=0.5)
    cfg = GenerationConfig(stop="END", eos_token_ids=[2, 3, 2])
    assert cfg.stop == ("END",) and cfg.eos_token_ids == frozenset({2, 3})


def test_from_generation_config_reads_hf_defaults(tmp_path):
    llama3 = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
              "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.45.0"}
    p = tmp_path / "generation_config.json"
    p.write_text(json.dumps(llama3))
    cfg = GenerationConfig.from_generation_config(p)
    assert cfg.eos_token_ids == {128001, 128008, 128009}
    assert (cfg.temperature, cfg.top_p, cfg.top_k) == (0.6, 0.9, 50)  # top_k: transformers' default
    cfg = GenerationConfig.from_generation_config(p, temperature=0, max_new_tokens=7, seed=None)
    assert (cfg.temperature, cfg.max_new_tokens, cfg.top_p) == (0, 7, 0.9)
    # the demo source: no do_sample -> greedy; one eos id
    demo = GenerationConfig.from_generation_config(DEMO_TOKENIZER.parent / "generation_config.json")
    assert demo.greedy and demo.eos_token_ids == {2}
    assert GenerationConfig.from_generation_config(None) == GenerationConfig()
    with pytest.raises(FlashError, match="no such generation config"):
        GenerationConfig.from_generation_config(tmp_path / "missing.json")
    assert eos_ids(2, [2, 5], None) == {2, 5}


def _random_splits(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 8))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_stop_checker_finds_stops_across_pieces_and_holds_back_only_prefixes():
    rng = random.Random(0)
    stops = ["\n\nUser:", "###", "ab"]
    for _ in range(300):
        body = "".join(rng.choice(["x", "a", "#", "\n", "U", "é", "b", "ser:"]) for _ in range(rng.randint(2, 30)))
        pieces = _random_splits(body, rng) if len(body) > 1 else [body]
        sc = StopChecker(stops)
        out, stopped = "", False
        for p in pieces:
            emitted, stopped = sc.feed(p)
            out += emitted
            # what is held back is a proper prefix of a stop string
            held = sc._held
            assert held == "" or any(s.startswith(held) and s != held for s in stops)
            if stopped:
                break
        if not stopped:
            out += sc.flush()
        hits = [body.find(s) for s in stops if s in body]
        expected = body[: min(hits)] if hits else body
        assert out == expected and stopped == bool(hits), (pieces, stops)


def test_stop_checker_without_stops_passes_text_through():
    sc = StopChecker([])
    assert sc.feed("abc") == ("abc", False) and sc.flush() == ""


class _ScriptedModel:
    """Logits that make greedy decoding follow a script of ids (a stand-in for FlashModel._step)."""

    def __init__(self, script: list[int], vocab: int):
        self.script, self.vocab, self.calls = script, vocab, []

    def __call__(self, new_ids: list[int]) -> torch.Tensor:
        self.calls.append(list(new_ids))
        pos = len(self.calls) - 1
        logits = torch.zeros(self.vocab)
        logits[self.script[min(pos, len(self.script) - 1)]] = 10.0
        return logits


def test_stream_tokens_stops_at_any_eos_at_stop_strings_and_at_length():
    tok = Tokenizer.from_file(str(DEMO_TOKENIZER))
    text = "héllo wörld 😀 and more words. END of it"
    script = tok.encode(text, add_special_tokens=False).ids
    prompt = tok.encode("prompt", add_special_tokens=False).ids

    def run(cfg, script=script, max_total=None):
        model = _ScriptedModel(script, tok.get_vocab_size())
        return list(stream_tokens(model, prompt, cfg, tokenizer=tok, max_total_tokens=max_total)), model

    out, model = run(GenerationConfig(max_new_tokens=len(script)))
    assert "".join(t.text for t in out) == tok.decode(script)
    assert [t.finish_reason for t in out] == [None] * (len(script) - 1) + ["length"]
    assert model.calls[0] == prompt and all(len(c) == 1 for c in model.calls[1:])

    out, _ = run(GenerationConfig(max_new_tokens=100, stop=(" END",)))
    assert "".join(t.text for t in out) == "héllo wörld 😀 and more words."
    assert out[-1].finish_reason == "stop"

    eos_script = [*script[:4], 2, *script[4:]]
    out, _ = run(GenerationConfig(max_new_tokens=100, eos_token_ids={7, 2}), script=eos_script)
    assert [t.token_id for t in out] == eos_script[:5] and out[-1].finish_reason == "stop"
    assert "".join(t.text for t in out) == tok.decode(script[:4])

    out, _ = run(GenerationConfig(max_new_tokens=100), max_total=len(prompt) + 3)
    assert len(out) == 3 and out[-1].finish_reason == "length"
    assert run(GenerationConfig(max_new_tokens=0))[0] == []
    with pytest.raises(FlashError, match="shorten the prompt"):
        run(GenerationConfig(), max_total=len(prompt))
