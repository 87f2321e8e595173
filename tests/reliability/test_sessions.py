"""Load held: one model per session, no cross-talk, and bounded memory over long generations."""

from __future__ import annotations

import resource
import threading

import pytest
import torch

import flashio
from flashio.errors import FlashError
from flashio.format import write_artifact
from flashio.predictor import PredictorWeights
from tests.conftest import make_opt


def test_concurrent_calls_on_one_model_are_refused(opt_artifact):
    with flashio.open(opt_artifact, mode="naive") as model:
        stream = model.stream([2, 5, 7], max_new_tokens=50, stop_at_eos=False)
        next(stream)  # a generation is in progress, holding the session
        errors = []

        def other():
            try:
                model.forward([2, 3])
            except FlashError as exc:
                errors.append(str(exc))

        t = threading.Thread(target=other)
        t.start()
        t.join(30)
        assert errors and "single-session" in errors[0]
        stream.close()  # ending the generator releases the session
        assert model.forward([2, 3]).shape == (2, 320)


def test_separate_models_in_threads_do_not_cross_talk(tiny_opt, tmp_path):
    torch.manual_seed(0)
    preds = [PredictorWeights(torch.randn(8, 64), torch.randn(256, 8), torch.zeros(256), 0.5) for _ in range(2)]
    art = write_artifact(tiny_opt[1], tmp_path / "a", predictors=preds)
    prompts = [[2, 10 + i, 20 + i, 30 + i] for i in range(4)]
    with flashio.open(art, mode="sparse") as m:
        want = [m.generate(p, max_new_tokens=12, stop_at_eos=False).token_ids for p in prompts]
    got: dict[int, list[int]] = {}

    def worker(i):
        with flashio.open(art, mode="sparse") as m:
            for _ in range(3):
                got[i] = m.generate(prompts[i], max_new_tokens=12, stop_at_eos=False).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[i] for i in range(4)] == want


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.parametrize("n_tokens", [pytest.param(1500, id="1.5k"),
                                      pytest.param(10_000, id="10k", marks=pytest.mark.slow)])
def test_memory_stays_bounded_over_long_generation(tmp_path, n_tokens):
    ckpt = tmp_path / "ckpt"
    make_opt(ckpt, with_tokenizer=False, max_position_embeddings=10_240)
    torch.manual_seed(0)
    preds = [PredictorWeights(torch.randn(8, 64), torch.randn(256, 8), torch.zeros(256), 0.5) for _ in range(2)]
    art = write_artifact(ckpt, tmp_path / "art", predictors=preds)
    budget = 16 << 20
    with flashio.open(art, mode="sparse", dram_budget=budget, max_context=n_tokens + 8) as model:
        stream = model.stream([2, 5, 7], max_new_tokens=n_tokens, stop_at_eos=False, temperature=1.0, seed=0)
        rss = []
        for i, _tok in enumerate(stream):
            if i in (n_tokens // 10, n_tokens - 1):
                rss.append(_rss_bytes())
        assert i == n_tokens - 1
    # after warm-up, growth stays inside the budget (which includes the KV cache for max_context)
    assert rss[1] - rss[0] < budget, (rss, budget)
