"""Content keys: stable, sensitive to what matters, and never built from tensors. Stage results:
stored as JSON (+ safetensors), read back constructing only known types; anything else recomputes."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tasks.activations import ActivationStats, ShardResult
from tasks.bundling import BundledArtifact
from tasks.caching import (
    canonical,
    content_key,
    finish_stage,
    is_complete,
    load_stage,
    reuse_or_compute,
    sha256_json,
    stage_cache,
    stage_dir,
    start_stage,
    work_id,
)


@dataclass(frozen=True)
class Thing:
    path: Path
    sha256: str
    sizes: tuple[int, ...]


def test_canonical_values():
    assert canonical(Thing(Path("/a"), "x", (1, 2))) == {"path": "/a", "sha256": "x", "sizes": [1, 2]}
    assert sha256_json({"b": 1, "a": [1, 2]}) == sha256_json({"a": (1, 2), "b": 1})


def test_tensors_are_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="pass paths and hashes"):
        canonical({"x": torch.zeros(2)})


def test_key_follows_content_and_code():
    a = content_key("s", {"t": Thing(Path("/a"), "h1", ())}, ["tasks.caching"])
    assert a == content_key("s", {"t": Thing(Path("/a"), "h1", ())}, ["tasks.caching"])
    assert a != content_key("s", {"t": Thing(Path("/a"), "h2", ())}, ["tasks.caching"])
    assert a != content_key("other", {"t": Thing(Path("/a"), "h1", ())}, ["tasks.caching"])
    assert a != content_key("s", {"t": Thing(Path("/a"), "h1", ())}, ["tasks.caching", "tasks.errors"])


def test_cache_key_and_stage_directories(tmp_path):
    key_fn = stage_cache("demo", "tasks.errors")
    params = {"x": 1, "work_dir": tmp_path}
    first = key_fn(None, params)
    key = content_key("demo", params, ("tasks.errors", "tasks.caching"))
    assert first == f"flashio-demo-{key}-{work_id(tmp_path)}" and key_fn(None, params) == first
    out = start_stage(stage_dir(tmp_path, "demo", key))
    art = BundledArtifact(path=out / "f", manifest_sha256="h", order="frequency", dtype="float32")
    finish_stage(out, art)
    assert is_complete(out) and key_fn(None, params) == first
    assert load_stage(out, BundledArtifact) == art
    (out / "_complete.json").unlink()  # a damaged stage directory: never a cache hit
    assert key_fn(None, params) is None and load_stage(out, BundledArtifact) is None
    shutil.rmtree(tmp_path)  # a new work directory has a new identity: no hit from the old one
    assert key_fn(None, params) not in (None, first)


# -- stage results: JSON + safetensors, known types only ------------------------------------------

def _shard(i: int, root: Path) -> ShardResult:
    return ShardResult(index=i, start=8 * i, stop=8 * i + 8, stats_path=root / f"s{i}", pairs_path=root / f"p{i}",
                       tokens=512, stats_sha256="a" * 64, pairs_sha256="b" * 64)


def _stats(root: Path) -> ActivationStats:
    return ActivationStats(path=root / "stats.safetensors", shards=(_shard(0, root), _shard(1, root)), tokens=1024,
                           n_layers=2, n_neurons=64, active_thresholds=(0.0, 0.25), density=(0.125, float("nan")),
                           coactivation_tokens=0, sha256="c" * 64)


def test_stage_results_round_trip_as_json(tmp_path):
    from tasks.evaluation import Comparison, Evaluation, HeldoutSample

    stats = _stats(tmp_path)
    out = start_stage(tmp_path / "merge")
    finish_stage(out, stats)
    assert not list(out.glob("*.pickle")) and (out / "_result.json").is_file()
    back = load_stage(out, ActivationStats)
    assert back.shards == stats.shards and isinstance(back.path, Path) and back.density[1] != back.density[1]  # nan

    main = Comparison("main", None, (0.5, 0.25), 4, 60, 38.3, 39.0, 0.018, 0.98, 0.01, 0.4, 1e5, 3.0, 12.0)
    ev = Evaluation(main=main, sweep=(main,), naive_bytes_per_token=2e5, ffn_bytes=1 << 20,
                    zero_shot=({"task": "arc", "accuracy": {"dense": 0.5, "sparse": 0.5}},), json_path=out / "e.json",
                    curve_json_path=out / "c.json", curve_png_path=None, heldout=HeldoutSample("stdlib:heldout", 4, 4, 16))
    out = start_stage(tmp_path / "evaluate")
    finish_stage(out, ev)
    assert load_stage(out, Evaluation) == ev

    out = start_stage(tmp_path / "gate")
    finish_stage(out, (0.5, 1.25))
    assert load_stage(out, tuple[float, ...]) == (0.5, 1.25)


def test_tensors_go_to_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    out = start_stage(tmp_path / "t")
    finish_stage(out, {"counts": torch.arange(6).reshape(2, 3), "tokens": 6})
    assert json.loads((out / "_result.json").read_text())["tensors"]["file"] == "_result.safetensors"
    back = load_stage(out, dict[str, Any])
    assert torch.equal(back["counts"], torch.arange(6).reshape(2, 3)) and back["tokens"] == 6
    (out / "_result.safetensors").write_bytes((out / "_result.safetensors").read_bytes()[:-4] + b"\0\0\0\1")
    assert load_stage(out, dict[str, Any]) is None  # the tensors changed after the result was written


def test_every_stage_task_declares_a_storable_result():
    """Each cached @task's return annotation resolves, and every dataclass it reaches is on the
    allowlist: its results can be stored and read back."""
    from tasks import activations, bundling, calibration, evaluation, predictors
    from tasks.caching import declared_return_type
    from tasks.resultfile import STAGE_RESULT_TYPES, qualified_name, result_types

    stage_tasks = [calibration.calibration_task, activations.gate_thresholds_task, activations.activations_task,
                   activations.merge_task, predictors.predictor_task, bundling.bundle_task, bundling.finalize_task,
                   evaluation.evaluate_task]
    for t in stage_tasks:
        rtype = declared_return_type(t.fn)
        reached = _dataclasses_in(rtype, set())
        assert {qualified_name(c) for c in reached} <= STAGE_RESULT_TYPES, t.name
        assert set(result_types(rtype).values()) == reached, t.name


def _dataclasses_in(hint: Any, seen: set[type]) -> set[type]:
    """Every dataclass a type annotation reaches (a walk of its own, to check tasks.resultfile's)."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and hint not in seen:
        seen.add(hint)
        for h in typing.get_type_hints(hint).values():
            _dataclasses_in(h, seen)
    for a in typing.get_args(hint):
        if a is not Ellipsis:
            _dataclasses_in(a, seen)
    return seen


class Boom:
    """Constructing it would be the attack: the tests below check it never happens."""

    built = 0

    def __init__(self, *args, **kwargs):
        Boom.built += 1


@dataclass(frozen=True)
class Payload:
    cmd: str

    def __post_init__(self) -> None:
        Boom.built += 1


def _tamper(out: Path, value: Any) -> None:
    doc = json.loads((out / "_result.json").read_text())
    doc["value"] = value
    (out / "_result.json").write_text(json.dumps(doc))


def test_tampered_results_are_refused_and_recomputed(tmp_path, caplog):
    """A result file written by someone else never constructs anything but a known stage result
    of the expected type: refused with a warning, and the stage runs again."""
    art = BundledArtifact(path=tmp_path / "a", manifest_sha256="m", order="frequency", dtype="float32")
    good = {"__dataclass__": "tasks.bundling.BundledArtifact",
            "fields": {"path": {"__path__": "/x"}, "manifest_sha256": "m", "order": "frequency", "dtype": "float32"}}
    attacks = [
        {"__dataclass__": "os.system", "fields": {"command": "touch /tmp/pwned"}},
        {"__dataclass__": f"{__name__}.Boom", "fields": {}},
        {"__dataclass__": f"{__name__}.Payload", "fields": {"cmd": "x"}},  # a dataclass, but no stage result
        {"__dataclass__": "tasks.predictors.LayerPredictor", "fields": {}},  # a stage result, not this stage's
        {**good, "fields": {**good["fields"], "dtype": 3}},  # a field of the wrong type
        {**good, "fields": {**good["fields"], "extra": "x"}},  # a field the class does not have
        {**good, "fields": {"path": {"__path__": "/x"}}},  # fields missing
        {"__reduce__": ["os.system", ["id"]]},  # an unknown tag
        {"__tensor__": "t0"},  # a tensor that is not there
        "just a string",  # not the expected type
    ]
    for value in attacks:
        out = start_stage(tmp_path / "bundle")
        finish_stage(out, art)
        assert load_stage(out, BundledArtifact) == art
        _tamper(out, value)
        with caplog.at_level(logging.WARNING, logger="tasks.caching"):
            caplog.clear()
            assert load_stage(out, BundledArtifact) is None, value
            assert load_stage(out, Payload) is None  # even when the caller expects it: not on the allowlist
        assert "running the stage again" in caplog.text, value
        calls: list[Path] = []
        again = reuse_or_compute(out, lambda d, calls=calls: calls.append(d) or art, expected=BundledArtifact)
        assert again == art and calls == [out] and load_stage(out, BundledArtifact) == art
    assert Boom.built == 0
    _tamper(out, good)
    assert load_stage(out, BundledArtifact) == BundledArtifact(Path("/x"), "m", "frequency", "float32")


def test_pickles_and_broken_files_are_never_loaded(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (Boom, ())

    out = start_stage(tmp_path / "s")
    finish_stage(out, (1.0,))
    (out / "_result.pickle").write_bytes(pickle.dumps(Exploit()))  # an old-style result: ignored
    assert load_stage(out, tuple[float, ...]) == (1.0,)
    (out / "_result.json").write_bytes(pickle.dumps(Exploit()))  # a pickle under the JSON name
    assert load_stage(out, tuple[float, ...]) is None
    for text in ("", "{", "[]", '{"format": "flashio-stage-result", "version": 99, "value": 1}'):
        (out / "_result.json").write_text(text)
        assert load_stage(out, Any) is None, text
    assert Boom.built == 0


def test_refresh_recomputes_a_complete_stage(tmp_path):
    out = tmp_path / "stage"
    calls = []

    def compute(d: Path) -> tuple[float, ...]:
        calls.append(d)
        (d / "output").write_text(str(len(calls)))
        return (float(len(calls)),)

    assert reuse_or_compute(out, compute, expected=tuple[float, ...]) == (1.0,)
    assert reuse_or_compute(out, compute, expected=tuple[float, ...]) == (1.0,) and len(calls) == 1
    assert reuse_or_compute(out, compute, expected=tuple[float, ...], refresh=True) == (2.0,)
    assert len(calls) == 2 and (out / "output").read_text() == "2" and load_stage(out, tuple[float, ...]) == (2.0,)


def test_unknown_result_types_are_refused_when_written(tmp_path):
    from tasks.errors import StageResultError

    out = start_stage(tmp_path / "s")
    with pytest.raises(StageResultError, match="not a known stage result type"):
        finish_stage(out, Payload("x"))
    with pytest.raises(StageResultError, match="cannot store"):
        finish_stage(out, object())
    assert not is_complete(out)
