"""The runtime against transformers' forward pass, mode by mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashio
from flashio.errors import BudgetError, FlashError
from flashio.format import write_artifact
from flashio.predictor import PredictorWeights
from tests.unit.family_check import assert_greedy_matches, assert_logits_match

PROMPT = [2, 17, 101, 55, 9, 240, 33, 78, 12, 5, 99, 301]


@pytest.fixture(params=["opt", "llama"])
def family(request, tiny_opt, tiny_llama, opt_artifact, llama_artifact):
    if request.param == "opt":
        return tiny_opt[0], opt_artifact
    return tiny_llama[0], llama_artifact


@pytest.mark.parametrize("mode", ["dense", "naive", "oracle"])
def test_logits_match_transformers(family, mode):
    hf, art = family
    assert_logits_match(hf, art, mode, PROMPT, stepwise_reference=False)


@pytest.mark.parametrize("mode", ["dense", "naive", "oracle"])
def test_greedy_generation_matches_transformers(family, mode):
    hf, art = family
    got = assert_greedy_matches(hf, art, PROMPT[:5], new_tokens=10, mode=mode)
    assert len(got.decode) == 9 and got.prompt_tokens == 5


def test_oracle_equals_dense_exactly_for_relu(opt_artifact):
    with flashio.open(opt_artifact, mode="dense") as dense, flashio.open(opt_artifact, mode="oracle", window=2) as oracle:
        d = dense.forward(PROMPT, token_by_token=True)
        o = oracle.forward(PROMPT, token_by_token=True)
        assert (d - o).abs().max().item() <= 1e-6
        # the oracle really skipped neurons: ReLU leaves about half of a random model's FFN inactive
        active = sum(s.neurons_active for s in oracle.stats[1:])
        total = sum(s.tokens for s in oracle.stats[1:]) * 2 * 256
        assert 0 < active < total


def _all_active_predictors(n_layers: int, dim: int, n: int) -> list[PredictorWeights]:
    return [PredictorWeights(torch.zeros(4, dim), torch.zeros(n, 4), torch.full((n,), 20.0), 0.5)
            for _ in range(n_layers)]


def test_sparse_with_all_active_predictor_and_reordering_equals_dense(tiny_opt, opt_artifact, tmp_path):
    rng = np.random.default_rng(0)
    orders = [rng.permutation(256) for _ in range(2)]
    art = write_artifact(tiny_opt[1], tmp_path / "sparse", orders=orders,
                         predictors=_all_active_predictors(2, 64, 256))
    with flashio.open(opt_artifact, mode="dense") as dense, flashio.open(art, mode="sparse") as sparse:
        want = dense.forward(PROMPT)
        assert (sparse.forward(PROMPT) - want).abs().max().item() <= 1e-5
        assert (sparse.forward(PROMPT, token_by_token=True) - want).abs().max().item() <= 1e-4
    with flashio.open(art, mode="dense") as reordered:  # reordering alone changes nothing
        assert (reordered.forward(PROMPT) - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("compute_dtype", ["float32", "float16"])
def test_one_token_selection_in_one_native_call_picks_what_the_scores_pick(tiny_opt, tmp_path, monkeypatch,
                                                                          compute_dtype):
    """Decoding selects each layer's neurons with PredictorWeights.active (one native call), which
    must pick exactly the neurons the scores path picks: the same logits and the same sets, step
    by step, as with that call turned off."""
    from flashio import kernels
    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.why_not()}")
    g = torch.Generator().manual_seed(5)
    preds = [PredictorWeights(torch.randn(8, 64, generator=g) * 0.3, torch.randn(256, 8, generator=g) * 0.5,
                              torch.randn(256, generator=g) * 0.5) for _ in range(2)]
    art = write_artifact(tiny_opt[1], tmp_path / "pred", predictors=preds)
    calls = []
    active = PredictorWeights.active

    def counted(self, x):
        ids = active(self, x)
        calls.append(ids is not None)
        return ids

    monkeypatch.setattr(PredictorWeights, "active", counted)
    runs = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(PredictorWeights, "active", lambda self, x: None)
        # no lookahead: whether a layer guesses is decided by timings, and changes the sums' order
        with flashio.open(art, mode="sparse", compute_dtype=compute_dtype, lookahead=False) as model:
            logits = model.forward(PROMPT, token_by_token=True)
            runs.append((logits, [(s.neurons_active, s.neurons_loaded) for s in model.stats]))
    assert len(calls) == 2 * len(PROMPT) and all(calls)  # two layers a token
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert 0 < sum(a for a, _ in runs[0][1]) < 2 * 256 * len(PROMPT)


def test_sparse_reads_only_missing_bundles(tiny_opt, tmp_path):
    """Bytes read per step equal the bundles of the neurons missing from the window."""
    torch.manual_seed(1)
    preds = [PredictorWeights(torch.randn(8, 64), torch.randn(256, 8), torch.zeros(256), 0.5) for _ in range(2)]
    art = write_artifact(tiny_opt[1], tmp_path / "rand", predictors=preds)
    with flashio.open(art, mode="sparse", window=3, max_gap=0, lookahead=False) as model:  # no gap reads: only the missing rows
        model.forward(PROMPT, token_by_token=True)
        bundle_bytes = 2 * 64 * 4
        for s in model.stats:
            assert s.bytes_read == s.neurons_loaded * bundle_bytes  # 512-byte bundles: no padding
            assert s.neurons_loaded + s.cache_hits == s.neurons_active
        assert sum(s.cache_hits for s in model.stats) > 0  # the window saved reads


@pytest.mark.parametrize("overlap", [True, False])
def test_retained_rows_save_reads_and_change_nothing_computed(tiny_opt, tmp_path, overlap):
    """Rows kept past the window (retain, the default) are not computed: the same logits as
    dropping them with the window, with fewer neurons read."""
    torch.manual_seed(2)
    preds = [PredictorWeights(torch.randn(8, 64), torch.randn(256, 8), torch.zeros(256), 0.5) for _ in range(2)]
    art = write_artifact(tiny_opt[1], tmp_path / "rand", predictors=preds)
    out, loaded, computed = {}, {}, {}
    for retain in (True, False):
        with flashio.open(art, mode="sparse", window=1, overlap=overlap, retain=retain) as model:
            out[retain] = model.forward(PROMPT, token_by_token=True)
            loaded[retain] = sum(s.neurons_loaded for s in model.stats)
            computed[retain] = [s.cache_rows for s in model.stats]  # the window's rows, retained or not
    assert (out[True] - out[False]).abs().max().item() <= 1e-5
    assert loaded[True] < loaded[False]
    assert computed[True] == computed[False]


@pytest.mark.parametrize("overlap", [True, False])
def test_compute_window_or_active(tiny_opt, tmp_path, overlap):
    """compute='active': the FFN on the step's predicted neurons whatever else the window cache
    holds, the same logits as a window of one step (whose cache holds nothing else); 'window'
    (default): on the whole window (other logits, more rows)."""
    torch.manual_seed(3)
    preds = [PredictorWeights(torch.randn(8, 64), torch.randn(256, 8), torch.zeros(256), 0.5) for _ in range(2)]
    art = write_artifact(tiny_opt[1], tmp_path / "rand", predictors=preds)
    runs = {}
    for key, kw in {"one": dict(window=1, retain=False, compute="active"), "active": dict(window=4, compute="active"),
                    "window": dict(window=4)}.items():
        with flashio.open(art, mode="sparse", overlap=overlap, **kw) as model:
            runs[key] = (model.forward(PROMPT, token_by_token=True), model.stats)
    (one, _), (active, active_stats), (window, window_stats) = runs["one"], runs["active"], runs["window"]
    assert (active - one).abs().max().item() <= 1e-5
    assert [s.rows_computed for s in active_stats] == [s.neurons_active for s in active_stats]
    assert [s.rows_computed for s in window_stats] == [s.cache_rows for s in window_stats]
    assert sum(s.rows_computed for s in window_stats) > sum(s.rows_computed for s in active_stats)
    assert (window - one).abs().max().item() > 1e-3  # the window's other neurons were computed


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_a_budget_that_holds_the_ffn_preloads_it_and_no_step_reads(tiny_opt, tmp_path, quantize):
    """With a dram_budget whose window caches hold every row, the whole FFN is read at open and
    kept across sequences: no step reads, and the logits are those of reading on demand."""
    torch.manual_seed(4)
    preds = [PredictorWeights(torch.randn(8, 64), torch.randn(256, 8), torch.zeros(256), 0.5) for _ in range(2)]
    art = write_artifact(tiny_opt[1], tmp_path / "rand", predictors=preds, quantize=quantize)
    with flashio.open(art, mode="sparse", window=2, dram_budget="1GiB", preload=False) as lazy:
        want = lazy.forward(PROMPT, token_by_token=True)
        assert lazy.preload_bytes == 0 and sum(s.bytes_read for s in lazy.stats) > 0
    with flashio.open(art, mode="sparse", window=2, dram_budget="1GiB") as model:
        m = model.artifact.manifest
        assert model.capacity == 256
        rows = sum(L.n_neurons for L in m.ffn_layers) * m.row_bytes  # every layer's rows, once
        assert rows <= model.preload_bytes <= rows + 2 * 4096 * m.n_layers  # (+ O_DIRECT alignment)
        for _ in range(2):  # a new sequence keeps the rows
            got = model.forward(PROMPT, token_by_token=True)
            assert sum(s.bytes_read for s in model.stats) == 0
            assert sum(s.neurons_loaded for s in model.stats) == 0
            # (int4: the lazy run's rows sit in arrival order, and an asymmetric row's offset sum
            # cancels much of its codes' sum, so the float rounding of the summation order shows)
            assert (got - want).abs().max().item() <= (1e-5 if quantize is None else 1e-3)
    with flashio.open(art, mode="sparse", window=2) as unbounded:  # no budget: on demand
        assert unbounded.preload_bytes == 0


def test_sparse_needs_predictors(opt_artifact):
    with pytest.raises(FlashError, match="needs predictors"):
        flashio.open(opt_artifact, mode="sparse")


def test_dram_budget(opt_artifact):
    with pytest.raises(BudgetError, match="at least"):
        flashio.open(opt_artifact, mode="dense", dram_budget="100KiB")
    # a budget between the sparse minimum and the whole FFN: the cache is capped below N
    with flashio.open(opt_artifact, mode="oracle", dram_budget=600_000, max_context=64) as model:
        assert 0 < model.capacity < 256
        model.forward(PROMPT, token_by_token=True)
        assert max(s.cache_rows for s in model.stats) <= 2 * model.capacity


def test_generation_text_and_stats(opt_artifact):
    with flashio.open(opt_artifact, mode="naive") as model:
        toks = list(model.stream("def add(a, b):", max_new_tokens=4, stop_at_eos=False))
        assert len(toks) == 4
        assert all(t.stats.bytes_read == 2 * 256 * 512 for t in toks[1:])  # the whole FFN per token
        gen = model.generate("def add", max_new_tokens=3, temperature=0.8, top_p=0.9, seed=3, stop_at_eos=False)
        again = model.generate("def add", max_new_tokens=3, temperature=0.8, top_p=0.9, seed=3, stop_at_eos=False)
        assert gen.token_ids == again.token_ids and isinstance(gen.text, str)
        assert "MB read/token" in gen.summary()


def test_bad_requests(opt_artifact, llama_artifact):
    with flashio.open(opt_artifact, mode="dense") as model:
        with pytest.raises(FlashError, match="outside the vocabulary"):
            model.forward([5, 100000])
        with pytest.raises(FlashError, match="exceeds the model's maximum"):
            model.forward(list(range(3, 200)))
    with flashio.open(llama_artifact, mode="dense") as model, pytest.raises(FlashError, match="no tokenizer"):
        model.forward("hello")
    with pytest.raises(FlashError, match="mode"):
        flashio.open(opt_artifact, mode="fast")
    with pytest.raises(FlashError, match="not an artifact directory"):
        flashio.open("/nonexistent/path")


def test_predictor_thresholds_can_be_read_and_replaced(tiny_opt, tmp_path):
    art = write_artifact(tiny_opt[1], tmp_path / "thr", predictors=_all_active_predictors(2, 64, 256))
    with flashio.open(art, mode="sparse") as model:
        assert model.predictor_thresholds == [0.5, 0.5]
        model.forward(PROMPT[:3], token_by_token=True)
        assert all(s.neurons_active == 2 * 256 for s in model.stats)  # logit 20: every neuron
        model.set_predictor_thresholds([1 - 1e-9, 0.5])  # logit 20.7 > 20: layer 0 predicts none
        assert model.predictor_thresholds == [1 - 1e-9, 0.5]
        model.forward(PROMPT[:3], token_by_token=True)
        assert all(s.neurons_active == 256 for s in model.stats)
        with pytest.raises(FlashError, match="3 thresholds given for 2 layers"):
            model.set_predictor_thresholds([0.5, 0.5, 0.5])
        with pytest.raises(FlashError, match=r"probabilities in \(0, 1\)"):
            model.set_predictor_thresholds([0.5, 1.0])
    with flashio.open(art, mode="dense") as model, pytest.raises(FlashError, match="without predictors"):
        model.set_predictor_thresholds([0.5, 0.5])


class _GuessingSource:
    """Active sets of `size` from a fixed random draw per (step, layer); its lookahead guesses a
    set that shares only part of them (or all: exact=True; none: disjoint=True)."""

    def __init__(self, n: int, *, exact: bool = False, size: int = 96, disjoint: bool = False):
        self.n, self.exact, self.size, self.disjoint, self.step = n, exact, size, disjoint, -1

    def begin_step(self) -> None:
        self.step += 1

    def reset(self) -> None:
        self.step = -1

    def _draw(self, layer: int, salt: int) -> np.ndarray:
        rng = np.random.default_rng((self.step, layer, salt))
        return np.sort(rng.choice(self.n, self.size, replace=False))

    def active(self, layer: int, h: torch.Tensor) -> np.ndarray:
        return self._draw(layer, 0)

    def lookahead(self, layer: int, h: torch.Tensor) -> np.ndarray:
        if self.exact:
            return self._draw(layer, 0)
        if self.disjoint:
            return np.setdiff1d(np.arange(self.n), self._draw(layer, 0))[: self.size]
        return np.union1d(self._draw(layer, 0)[::2], self._draw(layer, 1)[:40])  # half right, 40 guesses wrong


@pytest.fixture
def always_guess(monkeypatch):
    """The lookahead's mechanics without its time rule (on these tiny models the reads hide behind
    the cached rows anyway, so the rule would stop the guesses after a step)."""
    from flashio.sparse import SparseEngine

    monkeypatch.setattr(SparseEngine, "_learn", lambda self, i, kind, seconds: None)


@pytest.mark.usefixtures("always_guess")
@pytest.mark.parametrize("token_by_token,quantize", [(True, None), (False, None), (True, "int4")])
def test_lookahead_reads_early_and_computes_the_same(tiny_opt, tmp_path, token_by_token, quantize):
    """lookahead: reads start before the attention from a guess; what the guess missed is read at
    the FFN, so the step computes its own set (compute='active': the same logits as without)."""
    preds = _all_active_predictors(2, 64, 256)
    art = write_artifact(tiny_opt[1], tmp_path / "la", predictors=preds, quantize=quantize)
    runs = {}
    for key, (lookahead, exact) in {"off": (False, False), "wrong": (True, False), "exact": (True, True)}.items():
        with flashio.open(art, mode="sparse", window=2, compute="active", lookahead=lookahead,
                          active_source=_GuessingSource(256, exact=exact)) as model:
            out = [model.forward(PROMPT, token_by_token=token_by_token) for _ in range(2)]  # a new sequence too
            runs[key] = (out, model.stats)
    (off, off_stats), (wrong, wrong_stats), (exact, exact_stats) = runs["off"], runs["wrong"], runs["exact"]
    for got in (wrong, exact):
        for a, b in zip(got, off):  # (int4: rows in other slots sum in another order, see the preload test)
            assert (a - b).abs().max().item() <= (1e-5 if quantize is None else 1e-3)
    assert [s.neurons_active for s in wrong_stats] == [s.neurons_active for s in off_stats]
    # an exact guess reads what the step would have read, nothing at the FFN
    assert sum(s.late_loaded for s in exact_stats) == 0
    assert [s.neurons_loaded for s in exact_stats] == [s.neurons_loaded for s in off_stats]
    # a wrong one reads the rest at the FFN and its wrong guesses besides
    assert sum(s.late_loaded for s in wrong_stats) > 0
    assert sum(s.neurons_loaded for s in wrong_stats) > sum(s.neurons_loaded for s in off_stats)
    for s in wrong_stats:
        assert s.cache_hits + s.late_loaded <= s.neurons_active <= s.cache_hits + s.neurons_loaded
        assert s.truncated == 0


@pytest.mark.usefixtures("always_guess")
def test_lookahead_with_predictors_computes_the_step_set(tiny_opt, tmp_path):
    """With predictors the guess is the predictor on the layer's input through the FFN's norm;
    either compute mode gives the logits of the run without lookahead (the window's rows too: the
    wrong guesses stay cached outside the window) and computes as many rows."""
    torch.manual_seed(5)
    preds = [PredictorWeights(torch.randn(8, 64), torch.randn(256, 8), torch.zeros(256), 0.5) for _ in range(2)]
    art = write_artifact(tiny_opt[1], tmp_path / "rand", predictors=preds)
    for compute in ("active", "window"):
        out, rows = {}, {}
        for lookahead in (False, True):
            with flashio.open(art, mode="sparse", window=3, compute=compute, lookahead=lookahead) as model:
                assert model.engine.lookahead == lookahead
                out[lookahead] = model.forward(PROMPT, token_by_token=True)
                late = sum(s.late_loaded for s in model.stats)
                rows[lookahead] = [s.rows_computed for s in model.stats]
        assert (out[True] - out[False]).abs().max().item() <= 1e-5
        assert rows[True] == rows[False]
        assert late > 0  # random predictors: the FFN input picks other neurons than the layer input


@pytest.mark.usefixtures("always_guess")
def test_a_step_failing_after_its_lookahead_leaves_nothing_behind(tiny_opt, tmp_path, monkeypatch):
    """An error between a layer's early reads and its FFN (here in the attention): the next call
    runs as on a fresh model."""
    art = write_artifact(tiny_opt[1], tmp_path / "la", predictors=_all_active_predictors(2, 64, 256))
    with flashio.open(art, mode="sparse", window=2, lookahead=True, active_source=_GuessingSource(256)) as fresh:
        want = fresh.forward(PROMPT[:4], token_by_token=True)
    with flashio.open(art, mode="sparse", window=2, lookahead=True, active_source=_GuessingSource(256)) as model:
        real = model.model.attention
        calls = []

        def failing(i, x, kv, start):
            calls.append(i)
            if len(calls) == 2:  # layer 1 of the first step: layer 1's reads are in flight
                raise KeyboardInterrupt
            return real(i, x, kv, start)

        monkeypatch.setattr(model.model, "attention", failing)
        with pytest.raises(KeyboardInterrupt):
            model.forward(PROMPT[:4], token_by_token=True)
        monkeypatch.setattr(model.model, "attention", real)
        model.reset()
        assert (model.forward(PROMPT[:4], token_by_token=True) - want).abs().max().item() <= 1e-5


@pytest.mark.usefixtures("always_guess")
def test_a_lookahead_whose_guess_fills_the_cache_computes_what_it_would_without(tiny_opt, tmp_path):
    """A guess with none of the step's neurons, each two thirds of the cache: the step's neurons
    take the wrong guesses' rows once those reads have landed; nothing is left out, and the
    logits are those of the run without lookahead."""
    art = write_artifact(tiny_opt[1], tmp_path / "la", predictors=_all_active_predictors(2, 64, 256))
    out = {}
    for lookahead in (False, True):
        source = _GuessingSource(256, disjoint=True)
        with flashio.open(art, mode="sparse", window=2, compute="active", lookahead=lookahead, dram_budget=600_000,
                          max_context=64, active_source=source) as model:
            source.size = model.capacity * 2 // 3
            assert model.capacity < 2 * source.size <= 256
            out[lookahead] = model.forward(PROMPT, token_by_token=True)
            first = model.stats[0]  # (then the layers stop guessing: every guess was wasted)
            assert first.truncated == 0
            if lookahead:
                assert first.late_loaded == first.neurons_active - first.cache_hits > 0
            for s in model.stats:
                assert s.rows_computed == s.neurons_active
    assert (out[True] - out[False]).abs().max().item() <= 1e-5


def _record_prefetches(model) -> list[tuple[int, int]]:
    """(step, layer) of every prefetch the model runs from now on."""
    ran, real = [], model.engine.prefetch

    def prefetch(i, h):
        ran.append((model.engine._steps, i))
        real(i, h)

    model.engine.prefetch = prefetch
    return ran


def test_layers_whose_guesses_waste_reads_stop_guessing_and_probe_again(tiny_opt, tmp_path, monkeypatch):
    """A layer whose guesses are all wrong stops its early reads after a step and tries again every
    PROBE_STEPS steps; a layer guessing right keeps guessing (but for the probe's one plain step).
    The time rule is told that guessing pays here (a tiny model's reads hide without it). Probes
    every 8 steps: over the default's steps the tiny model's cache comes to hold its FFN."""
    import flashio.sparse

    PROBE_STEPS = 8
    monkeypatch.setattr(flashio.sparse, "PROBE_STEPS", PROBE_STEPS)

    class WrongFirstLayer(_GuessingSource):
        def lookahead(self, layer, h):  # layer 0: nothing right; layer 1: the set itself
            return np.setdiff1d(np.arange(self.n), self._draw(layer, 0))[: self.size] if layer == 0 else self._draw(layer, 0)

    art = write_artifact(tiny_opt[1], tmp_path / "la", predictors=_all_active_predictors(2, 64, 256))
    tokens = list(range(3, 3 + 2 * PROBE_STEPS + 4))
    with flashio.open(art, mode="sparse", window=2, lookahead=True, active_source=WrongFirstLayer(256, size=40)) as model:
        learn = model.engine._learn
        model.engine._learn = lambda i, kind, seconds: learn(i, kind, 0.0 if kind else 1.0)
        ran = _record_prefetches(model)
        model.forward(tokens, token_by_token=True)
        assert list(model.engine.guessing) == [False, True]
        assert [step for step, i in ran if i == 0] == [1, PROBE_STEPS, 2 * PROBE_STEPS]  # the first step, the probes
        # layer 1: guesses, then one plain step to time the reads without, then guesses but for its
        # probes (staggered: a step earlier than layer 0's)
        probes = (2, PROBE_STEPS - 1, 2 * PROBE_STEPS - 1)
        assert [step for step, i in ran if i == 1] == [s for s in range(1, len(tokens) + 1) if s not in probes]


def test_layers_whose_guesses_cost_more_time_than_they_hide_stop_guessing(tiny_opt, tmp_path, monkeypatch):
    """The time rule: a guess that takes longer than the reads it could hide (a tiny model's reads
    are done before its cached rows are) is timed against a plain step after its first one-token
    step, stops, and is tried again every PROBE_STEPS steps (8 here, as above); the output is the
    same as without."""
    import time as _time

    import flashio.sparse

    PROBE_STEPS = 8
    monkeypatch.setattr(flashio.sparse, "PROBE_STEPS", PROBE_STEPS)

    class SlowGuess(_GuessingSource):
        def lookahead(self, layer, h):
            _time.sleep(0.005)  # a guess that costs 5 ms
            return self._draw(layer, 0)

    art = write_artifact(tiny_opt[1], tmp_path / "la", predictors=_all_active_predictors(2, 64, 256))
    tokens = list(range(3, 3 + 2 * PROBE_STEPS + 4))
    outs = {}
    for lookahead in (False, True):
        with flashio.open(art, mode="sparse", window=2, lookahead=lookahead, active_source=SlowGuess(256, size=40)) as model:
            ran = _record_prefetches(model)
            outs[lookahead] = model.forward(tokens, token_by_token=True)
            if lookahead:
                assert not model.engine.guessing.any()
                wait, guess = model.engine._cost_s.T
                # each guess's 5 ms at least, against reads hidden anyway: the verdict weighs the sums
                # (a layer's wait moves by milliseconds on a shared disk)
                assert (guess >= 0.005).all() and guess.sum() > wait.sum()
                for i in (0, 1):  # the first step, then the probes (staggered over the layers)
                    assert [step for step, j in ran if j == i] == [1, PROBE_STEPS - i, 2 * PROBE_STEPS - i]
    assert torch.allclose(outs[True], outs[False], atol=1e-5)


def test_a_layer_that_reads_nothing_is_not_probed(tiny_opt, tmp_path):
    """Once every neuron a layer needs is cached (here the same set every step), its plain FFN
    reads nothing: there is nothing a guess could hide, and it is not tried again."""
    from flashio.sparse import PROBE_STEPS

    class SameSet(_GuessingSource):
        def _draw(self, layer, salt):
            return np.arange(40) * 3

    art = write_artifact(tiny_opt[1], tmp_path / "la", predictors=_all_active_predictors(2, 64, 256))
    with flashio.open(art, mode="sparse", window=2, lookahead=True, active_source=SameSet(256)) as model:
        ran = _record_prefetches(model)
        model.forward(list(range(3, 3 + 2 * PROBE_STEPS + 4)), token_by_token=True)
        assert ran == [(1, 0), (1, 1)]  # the first step's guesses only
        assert model.engine._read_nothing.all() and not model.engine.guessing.any()


def test_layers_whose_reads_outlast_their_guesses_keep_guessing(tiny_opt, tmp_path):
    """The time rule's other side, on the engine's figures: while the plain FFNs wait longer for
    their reads than the guesses take, summed over the measured layers, the layers guess; when
    that turns, they stop together; a layer whose guesses waste reads does not guess either way.
    (The verdict is taken as each step begins: `_decide`.)"""
    art = write_artifact(tiny_opt[1], tmp_path / "la", predictors=_all_active_predictors(2, 64, 256))
    with flashio.open(art, mode="sparse", window=2, lookahead=True) as model:
        engine = model.engine
        engine._decide()
        assert engine.guessing.tolist() == [True, True]  # nothing timed yet: a guess first
        engine._learn(0, 1, 0.001)  # a 1 ms guess
        engine._decide()
        assert engine.guessing.tolist() == [False, True]  # layer 0 next: a plain step, to time its wait
        for _ in range(5):
            engine._learn(0, 0, 0.004)  # 4 ms waited without a guess
            engine._learn(0, 1, 0.001)
        engine._learn(1, 0, 0.0002)  # layer 1's own reads hide (0.2 ms) but the sum still pays
        engine._learn(1, 1, 0.001)
        engine._decide()
        assert engine.guessing.tolist() == [True, True]
        for _ in range(10):
            engine._learn(0, 0, 0.0002)  # layer 0's reads now hide too: neither guesses
        engine._decide()
        assert engine.guessing.tolist() == [False, False]
        engine._useful[1] = False  # a layer whose guesses waste reads does not guess, however fast
        for _ in range(10):
            engine._learn(0, 0, 0.004)
            engine._learn(1, 0, 0.004)
        engine._decide()
        assert engine.guessing.tolist() == [True, False]
