"""Content keys: stable, sensitive to what matters, and never built from tensors."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.caching import (
    canonical,
    content_key,
    finish_stage,
    is_complete,
    load_stage,
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
    finish_stage(out, Thing(out / "f", "h", (1,)))
    assert is_complete(out) and key_fn(None, params) == first
    assert load_stage(out) == Thing(out / "f", "h", (1,))
    (out / "_complete.json").unlink()  # a damaged stage directory: never a cache hit
    assert key_fn(None, params) is None and load_stage(out) is None
    shutil.rmtree(tmp_path)  # a new work directory has a new identity: no hit from the old one
    assert key_fn(None, params) not in (None, first)
