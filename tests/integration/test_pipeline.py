"""The conversion flow end to end under a real (temporary) Prefect server, on tiny OPT and Llama
checkpoints built here: published artifacts load with flashio and stay within the accuracy
budget; a weak predictor fails the gate and publishes nothing; bad input fails early; a re-run
reuses every cached stage."""

from __future__ import annotations

import json

import pytest

# The session-scoped Prefect server fixture, registered once as a plugin (shared by both modules).
pytest_plugins = ["tests.integration.prefect_harness"]

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_session")]
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("prefect")

import flashio  # noqa: E402
from flashio.registry import open_registry  # noqa: E402
from flows.config import AccuracyBudgetConfig, ConvertConfig  # noqa: E402
from flows.convert import EXACT_DENSITIES, convert, run_convert  # noqa: E402
from tasks.errors import AccuracyBudgetError, InputError  # noqa: E402
from tasks.testing import build_tiny_model, build_tokenizer, write_corpus  # noqa: E402

SEQ_LEN = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Corpus, tokenizer and two briefly fitted random checkpoints (peaked predictions)."""
    root = tmp_path_factory.mktemp("tiny")
    files = write_corpus(root / "text", n_files=12)
    tok = build_tokenizer(files, root / "tok")
    models = {f: build_tiny_model(f, root / f, tok, fit_files=files, fit_steps=60) for f in ("opt", "llama")}
    arc = root / "arc.jsonl"
    arc.write_text("".join(json.dumps({"question": q, "choices": {"text": c, "label": ["A", "B"]}, "answerKey": "A"})
                           + "\n" for q, c in (("def f", ["return x", "zzz"]), ("for i in", ["range", "qq"]))))
    return {"root": root, "text": root / "text", "arc": arc, **models}


def config(tiny, tmp_path, family: str, **kw) -> ConvertConfig:
    base = {"model": str(tiny[family]), "calibration": str(tiny["text"]), "samples": 24, "seq_len": SEQ_LEN,
            "heldout_samples": 4, "shard_samples": 8, "sweep": (0.9, 0.99), "sweep_samples": 2,
            "registry": str(tmp_path / "registry"), "work_dir": tmp_path / "work"}
    return ConvertConfig(**{**base, **kw})


def sparse_within_budget(ref: str, registry: str, text: str, budget: AccuracyBudgetConfig) -> dict:
    """Independently of the flow's evaluation: dense vs sparse (token by token) on fresh text."""
    with flashio.open(ref, registry=registry, mode="dense") as dense, \
            flashio.open(ref, registry=registry, mode="sparse") as sparse:
        ids = dense.codec.encode(text)[:SEQ_LEN]
        d, s = dense.forward(ids), sparse.forward(ids, token_by_token=True)
    target = torch.tensor(ids[1:])
    ppl_d = torch.nn.functional.cross_entropy(d[:-1], target).exp().item()
    ppl_s = torch.nn.functional.cross_entropy(s[:-1], target).exp().item()
    top1 = (d.argmax(-1) == s.argmax(-1)).float().mean().item()
    assert ppl_s <= ppl_d * (1 + budget.max_perplexity_increase), (ppl_d, ppl_s)
    assert top1 >= budget.min_top1_agreement
    return {"ppl_dense": ppl_d, "ppl_sparse": ppl_s, "top1": top1}


def task_states(flow_state, expect: tuple[str, ...], timeout_s: float = 30.0) -> dict[str, set[str]]:
    """State names of the flow run's task runs, by task name. The server records them from
    events, asynchronously: poll until every expected task has runs and all are final."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
            out: dict[str, set[str]] = {}
            for r in runs:
                out.setdefault(r.name.rsplit("-", 1)[0], set()).add(r.state.name if r.state else "none")
            settled = all(r.state is not None and r.state.is_final() for r in runs)
            if (settled and all(n in out for n in expect)) or time.monotonic() > deadline:
                return out
            time.sleep(0.3)


def test_convert_tiny_opt(tiny, tmp_path):
    cfg = config(tiny, tmp_path, "opt", prompt="def value", max_new_tokens=6, zero_shot=(f"arc={tiny['arc']}",),
                 version="1", aliases=("prod",))
    result = run_convert(cfg)
    assert result.created and result.reference == "opt@1"
    s = result.report["summary"]
    assert s["gate"] == "passed" and s["predictor_recall_min"] >= 0.98
    assert s["bytes_per_token_sparse"] < s["bytes_per_token_naive"]
    assert 0 < s["predicted_sparsity"] < 1 and s["true_sparsity"] > 0.5
    assert result.sample["tokens"] == 6 and result.report["zero_shot"][0]["examples"] == 2
    # what was published: loads from the registry, carries lineage and report
    reg = open_registry(cfg.registry)
    assert reg.aliases("opt") == {"latest": "1", "prod": "1"}
    local = reg.pull("opt@prod")
    with flashio.open(local, mode="sparse") as model:
        m = model.artifact.manifest
        assert m.lineage["source"]["files"]["model.safetensors"]
        assert m.lineage["calibration"]["fingerprint"] and m.lineage["pipeline"]["config"]["recall"] == 0.99
        assert m.report["summary"]["perplexity_dense"] == pytest.approx(s["perplexity_dense"])
        assert {"report/report.md", "report/summary.json", "report/sparsity_accuracy.png"} <= set(m.files)
        assert [p.rank for p in model.engine.predictors] == [L["rank"] for L in result.report["layers"]]
    text = (tiny["text"] / "doc011.txt").read_text()
    sparse_within_budget("opt@1", cfg.registry, text, cfg.budget)
    # Prefect artifacts: the markdown report and the per-layer table
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["flashio-convert-report", "flashio-convert-layers"])))
    assert {a.key for a in arts} == {"flashio-convert-report", "flashio-convert-layers"}
    # a re-run (new version) reuses every content-keyed stage
    state = convert(cfg.model_copy(update={"version": "2"}), return_state=True)
    assert state.is_completed()
    cached = ("calibration", "activations", "merge-activations", "predictor", "bundle", "evaluate")
    states = task_states(state, cached)
    for name in cached:
        assert states.get(name) == {"Cached"}, (name, states)
    assert state.result().created and {v.version for v in reg.versions("opt")} == {"1", "2"}


def test_convert_tiny_opt_int8_reports_quantization_and_sparsity_apart(tiny, tmp_path):
    """`--quantize int8`: the published artifact holds int8 rows, and the report measures its loss in
    two parts on the same held-out rows: int8 dense vs the float weights, sparse vs dense (both int8)."""
    cfg = config(tiny, tmp_path, "opt", quantize="int8", name="opt-int8", sweep=(0.99,))
    result = run_convert(cfg)
    s = result.report["summary"]
    assert s["quantization_scheme"] == "int8" and s["quantization_resident"] == "int8"
    assert s["perplexity_quantized_dense"] == s["perplexity_dense"]  # the gate's dense is the int8 one
    assert s["perplexity_float"] != s["perplexity_dense"] and abs(s["quantization_perplexity_increase"]) < 0.05
    assert s["sparsity_perplexity_increase"] == s["perplexity_increase"]
    together = (1 + s["quantization_perplexity_increase"]) * (1 + s["sparsity_perplexity_increase"]) - 1
    assert s["total_perplexity_increase"] == pytest.approx(together, rel=1e-9)
    assert any(line.startswith("loss split") for line in result.summary_lines())
    with flashio.open(result.reference, registry=cfg.registry, mode="dense") as model:
        m = model.artifact.manifest
        assert m.quant.scheme == "int8"
        assert m.report["summary"]["quantization_perplexity_increase"] == s["quantization_perplexity_increase"]


def test_convert_tiny_llama(tiny, tmp_path):
    cfg = config(tiny, tmp_path, "llama", gated_density=0.4, order="coactivation", name="tiny-llama",
                 methods=("active",))
    result = run_convert(cfg)
    assert result.report["summary"]["gate"] == "passed"
    thresholds = [L["active_threshold"] for L in result.report["layers"]]
    assert all(t > 0 for t in thresholds)
    with flashio.open(result.reference, registry=cfg.registry, mode="sparse") as model:
        m = model.artifact.manifest
        assert m.gated and [L.active_threshold for L in m.ffn_layers] == pytest.approx(thresholds)
        assert m.lineage["neuron_order"] == "coactivation"
    sparse_within_budget(result.reference, cfg.registry, (tiny["text"] / "doc010.txt").read_text(), cfg.budget)


def test_convert_tiny_llama_side_by_side(tiny, tmp_path):
    """Every method on a gated model: predictors on gate and on contribution labels, the exact gate
    alone and ranked against the up sketch; the cheapest within the budget is published, and the report holds the frontier with the exact
    oracles, the per-layer densities and both byte figures."""
    cfg = config(tiny, tmp_path, "llama", gated_density=0.4, name="tiny-llama-all")
    result = run_convert(cfg)
    s, report = result.report["summary"], result.report
    assert s["gate"] == "passed"
    assert s["ffn_dram_fraction"] == 0.5 and 0 < s["bytes_per_token_limited"] <= s["bytes_per_token_naive"]
    all_methods = {"active", "contribution", "exact-gate", "exact-gate-up"}
    assert s["configuration_passed"] and s["configuration_method"] in all_methods
    assert {c["method"] for c in report["candidates"]} == all_methods
    assert sum(c["chosen"] for c in report["candidates"]) == 1
    chosen = next(c for c in report["candidates"] if c["chosen"])
    assert all(c["read_fraction_limited"] >= chosen["read_fraction_limited"] for c in report["candidates"]
               if not c["violations"])
    methods = {r["method"] for r in report["frontier"]}
    assert {"oracle: gate", "oracle: contribution", "oracle: contribution per layer"} <= methods
    oracle = {r["density"]: r for r in report["frontier"] if r["method"] == "oracle: contribution"}
    assert oracle[0.9]["top1_agreement"] >= oracle[0.3]["top1_agreement"]
    assert len(report["allocation"]["densities"]) == 2 and all("label_density" in r for r in report["layers"])
    assert report["allocation"]["bytes_fraction"] <= 0.4 + 1e-9  # as accurate as 0.4 everywhere, no more bytes
    exact = [c for c in report["candidates"] if c["method"] == "exact-gate"]
    assert all(c["held_fraction"] >= 1 / 3 - 1e-9 for c in exact)  # the resident gate rows count as DRAM
    # the int4 up sketch too: 36 of the 3 x 64 x 4 bytes of a tiny fp32 neuron (d_model 64, groups of 32)
    sketched = [c for c in report["candidates"] if c["method"] == "exact-gate-up"]
    assert len(sketched) == len(exact) == 1 + len(EXACT_DENSITIES) and all(c["held_fraction"] >= 1 / 3 + 36 / 768 - 1e-9 for c in sketched)
    # ranked by contribution (approximately), the sketch keeps top-1 at least the gate's at the same densities
    by_label = {c["label"]: c for c in exact}
    assert sum(c["top1_agreement"] >= by_label[c["label"]]["top1_agreement"] for c in sketched) >= len(sketched) - 1
    # the bytes are of the whole FFN: the gate rows are the FFN's too (naive reads them, DRAM holds them)
    assert s["configuration_method"] == "exact-gate-up"  # (the sketch is the cheapest here)
    assert s["bytes_per_token_naive"] == s["ffn_bytes"] and s["dram_held_bytes"] <= 0.5 * s["ffn_bytes"]
    with flashio.open(result.reference, registry=cfg.registry, mode="sparse") as model:
        m = model.artifact.manifest
        assert {"report/frontier.png"} <= set(m.files)
        assert m.gate_resident == s["configuration_method"].startswith("exact-gate")
        assert (m.up_sketch is not None) == (s["configuration_method"] == "exact-gate-up")
        assert model.generate("def value", max_new_tokens=4).token_ids


def test_an_exact_only_conversion_trains_no_predictors(tiny, tmp_path):
    """`--methods exact-gate,exact-gate-up --quantize int8`: no predictor is trained or windowed, the
    activation shards keep statistics but no predictor pairs, the published artifact holds no
    predictors, and the report splits the loss into quantization and sparsity (the exact
    evaluation scores its rows on the float reference too)."""
    from safetensors import safe_open

    cfg = config(tiny, tmp_path, "llama", gated_density=0.4, name="tiny-llama-exact",
                 methods=("exact-gate", "exact-gate-up"), quantize="int8")
    state = convert(cfg, return_state=True)
    assert state.is_completed()
    result = state.result()
    states = task_states(state, ("activations", "merge-activations", "evaluate-exact-gate", "bundle"))
    assert not {"predictor", "windows", "evaluate"} & set(states), states
    s = result.report["summary"]
    assert s["gate"] == "passed" and s["configuration_method"] in {"exact-gate", "exact-gate-up"}
    assert s["predictor_recall_mean"] is None and result.report["layers"] == []
    assert not any(line.startswith("predictor recall") for line in result.summary_lines())
    assert s["quantization_scheme"] == "int8" and s["perplexity_quantized_dense"] == s["perplexity_dense"]
    assert s["perplexity_float"] != s["perplexity_dense"] and s["sparsity_perplexity_increase"] == s["perplexity_increase"]
    assert any(line.startswith("loss split") for line in result.summary_lines())
    shards = sorted((tmp_path / "work").rglob("pairs.safetensors"))
    assert len(shards) == 3  # 24 sequences in shards of 8
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            assert set(f.keys()) == {"seq_ids"}
    with flashio.open(result.reference, registry=cfg.registry, mode="sparse") as model:
        m = model.artifact.manifest
        assert m.gate_resident and m.predictors_file is None and m.predictor_layers is None
        assert m.quant.scheme == "int8"
        assert model.generate("def value", max_new_tokens=4).token_ids


def test_failing_gate_writes_the_report_and_ends_with_one_line(tiny, tmp_path, capfd):
    from flashio.cli import main

    argv = ["convert", str(tiny["llama"]), "--calibration", str(tiny["text"]), "--samples", "24", "--seq-len",
            str(SEQ_LEN), "--heldout-samples", "4", "--shard-samples", "8", "--sweep", "0.9",
            "--gated-density", "0.3", "--min-top1", "1.0", "--max-ppl-increase", "0", "--methods", "contribution",
            "--registry", str(tmp_path / "registry"), "--work-dir", str(tmp_path / "work"), "--no-sample"]
    assert main(argv) == 1
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith("flashio convert: accuracy gate failed, nothing was published") and "--methods " in last
    assert "Closest configuration: contribution predictors" in last and "publish it with" in last
    report_dir = last.rsplit("Report (frontier table and plot): ", 1)[1].strip()
    from pathlib import Path

    summary = json.loads((Path(report_dir) / "summary.json").read_text())
    assert summary["summary"]["gate"] == "failed: nothing was published"
    assert (Path(report_dir) / "frontier.png").is_file() and "## Density-accuracy frontier" in \
        (Path(report_dir) / "report.md").read_text()
    assert not (tmp_path / "registry").exists() or open_registry(str(tmp_path / "registry")).names() == []


def test_weak_predictor_fails_the_gate_and_publishes_nothing(tiny, tmp_path):
    cfg = config(tiny, tmp_path, "opt", rank=1, rank_last=1, threshold=0.9, max_escalations=0, sweep=(0.9,))
    with pytest.raises(AccuracyBudgetError) as err:
        run_convert(cfg)
    msg = str(err.value)
    assert "accuracy gate failed, nothing was published" in msg
    assert ("perplexity increase" in msg and "exceeds the budget of +2.00%" in msg) or \
        ("top-1 agreement" in msg and "below the budget of 0.9700" in msg)
    assert not (tmp_path / "registry").exists() or open_registry(cfg.registry).names() == []
    # the caller may accept the loss explicitly: the re-run reuses every stage up to the evaluation
    allowed = cfg.model_copy(update={"budget": AccuracyBudgetConfig(allow_loss=True)})
    state = convert(allowed, return_state=True)
    cached = ("calibration", "activations", "merge-activations", "predictor", "evaluate")
    states = task_states(state, cached)
    assert all(states.get(name) == {"Cached"} for name in cached), states
    result = state.result()
    assert result.report["summary"]["gate"] == "exceeded (allowed by the caller)"
    assert open_registry(cfg.registry).names() == ["opt"]


def test_bad_input_fails_before_heavy_work(tiny, tmp_path):
    with pytest.raises(InputError, match="matches no files"):
        run_convert(config(tiny, tmp_path, "opt", calibration=str(tmp_path / "none" / "*.txt")))
    with pytest.raises(InputError, match=r"tokens in \d+ documents; 5000 sequences of 64 tokens need 320,000"):
        run_convert(config(tiny, tmp_path, "opt", samples=5000))
    assert not (tmp_path / "work" / "activations").exists()
