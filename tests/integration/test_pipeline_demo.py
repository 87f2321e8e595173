"""The conversion flow on the bundled demo model (tasks/demo/opt-stdlib), on its default
calibration data (the standard library's sources), with fewer samples than `flashio convert`
uses so that it stays quick. Skipped when the checkpoint has not been trained."""

from __future__ import annotations

import pytest

# The session-scoped Prefect server fixture, registered once as a plugin (shared by both modules).
pytest_plugins = ["tests.integration.prefect_harness"]

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_session")]
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("prefect")

from tasks.demo import DEMO_CHECKPOINT_DIR, stdlib_text_files  # noqa: E402

if not (DEMO_CHECKPOINT_DIR / "config.json").is_file():
    pytest.skip(f"the demo checkpoint is not in {DEMO_CHECKPOINT_DIR} (python -m tasks.demo.train)",
                allow_module_level=True)

import flashio  # noqa: E402
from flows.config import ConvertConfig  # noqa: E402
from flows.convert import run_convert  # noqa: E402


def test_convert_the_demo_model(tmp_path):
    cfg = ConvertConfig(samples=48, seq_len=128, heldout_samples=4, shard_samples=24, sweep=(0.99,), sweep_samples=1,
                        registry=str(tmp_path / "registry"), work_dir=tmp_path / "work", prompt="import os\n",
                        max_new_tokens=8)
    assert cfg.model == str(DEMO_CHECKPOINT_DIR) and cfg.calibration == "stdlib:train"
    result = run_convert(cfg)
    s = result.report["summary"]
    assert result.name == "opt-stdlib" and s["gate"] == "passed"
    assert s["predicted_sparsity"] > 0.3 and s["bytes_per_token_sparse"] < s["bytes_per_token_naive"] / 2
    assert result.sample["tokens"] >= 1
    # sparse logits within the budget on a held-out file the flow did not evaluate on
    text = stdlib_text_files("heldout")[-1].read_text(encoding="utf-8")
    with flashio.open(result.reference, registry=cfg.registry, mode="dense") as dense, \
            flashio.open(result.reference, registry=cfg.registry, mode="sparse") as sparse:
        ids = dense.codec.encode(text)[:128]
        d, sp = dense.forward(ids), sparse.forward(ids, token_by_token=True)
    target = torch.tensor(ids[1:])
    ppl_d = torch.nn.functional.cross_entropy(d[:-1], target).exp().item()
    ppl_s = torch.nn.functional.cross_entropy(sp[:-1], target).exp().item()
    assert ppl_s <= ppl_d * (1 + cfg.budget.max_perplexity_increase)
    assert (d.argmax(-1) == sp.argmax(-1)).float().mean().item() >= cfg.budget.min_top1_agreement
