"""The exact oracles' frontier, computed through transformers hooks: at density 1 both oracles are
dense; at a lower density the contribution oracle equals the runtime's own contribution oracle
(flashio.exact.ContributionOracleEngine) on the same artifact, an independent implementation."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import flashio  # noqa: E402
from flashio.format import write_artifact  # noqa: E402
from tasks.activations import ActivationOptions  # noqa: E402
from tasks.allocation import topk_mask  # noqa: E402
from tasks.calibration import load_tokens, prepare_calibration, resolve_spec  # noqa: E402
from tasks.frontier import (  # noqa: E402
    ORACLE_CONTRIBUTION,
    ORACLE_GATE,
    ORACLE_PER_LAYER,
    measure_oracle_frontier,
)
from tasks.hooks import down_modules, hooked_modules, load_model, model_lock  # noqa: E402
from tasks.source import inspect_source  # noqa: E402
from tasks.testing import build_tiny_model, build_tokenizer, write_corpus  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    files = write_corpus(root / "text", n_files=6)
    tok = build_tokenizer(files, root / "tok")
    src = inspect_source(str(build_tiny_model("llama", root / "llama", tok, hidden=32, ffn=64)))
    calib = prepare_calibration(src, resolve_spec(str(root / "text")), n_sequences=4, seq_len=32, n_heldout=2, seed=0,
                                out_dir=root / "calib")
    return src, calib, root


def test_at_full_density_both_oracles_are_dense(llama):
    src, calib, _ = llama
    fr = measure_oracle_frontier(src, calib, densities=(1.0, 0.3), n_sequences=2, options=ActivationOptions(),
                                 per_layer=(0.5, 0.7))
    pts = {(p.method, p.density): p for p in fr.points}
    for method in (ORACLE_GATE, ORACLE_CONTRIBUTION):
        full = pts[(method, 1.0)]
        assert full.top1_agreement == 1.0 and full.mean_kl == pytest.approx(0.0, abs=1e-9)
        assert full.perplexity_increase == pytest.approx(0.0, abs=1e-6)
        assert pts[(method, 0.3)].mean_kl > 1e-4
    assert pts[(ORACLE_PER_LAYER, 0.6)].tokens == 64 and fr.tokens == 64


def test_the_hooked_contribution_oracle_is_the_runtimes(llama, tmp_path):
    src, calib, _ = llama
    ids = load_tokens(calib, "heldout")[0]
    model = load_model(str(src.path), "float32", src.fingerprint)

    def mask(_m, inputs):
        return (inputs[0] * topk_mask(inputs[0].abs(), 0.5),)

    with model_lock(), torch.inference_mode():
        assert len(hooked_modules(model, src)) == len(down_modules(model, src)) == src.n_layers
        handles = [d.register_forward_pre_hook(mask) for d in down_modules(model, src)]
        try:
            hooked = model(input_ids=ids[None]).logits[0]
        finally:
            for h in handles:
                h.remove()
    art = write_artifact(src.path, tmp_path / "art", dtype="float32", active_thresholds=[0.0] * src.n_layers)
    with flashio.open(art, mode="oracle", selection="contribution", density=0.5) as oracle:
        runtime = oracle.forward(ids)
    torch.testing.assert_close(runtime.float(), hooked.float(), rtol=1e-3, atol=1e-3)
