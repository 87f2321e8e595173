"""Stage output files are byte-reproducible across processes (tasks/tensorfiles.py): safetensors
orders the header's metadata differently in each process, which made the Dask runner's files
differ from the sequential runner's."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402

from tasks.tensorfiles import _rewrite, save_tensors  # noqa: E402

WRITE = """
import sys, torch
from tasks.tensorfiles import save_tensors
t = {"b": torch.arange(12, dtype=torch.float32).reshape(3, 4), "a": torch.ones(5, dtype=torch.int64)}
save_tensors(t, sys.argv[1], metadata={f"key{i}": str(i) * i for i in range(12)})
"""


def test_same_content_same_bytes_in_different_processes(tmp_path):
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for p in paths:  # each process gets its own hash seed, as Dask workers do
        subprocess.run([sys.executable, "-c", WRITE, str(p)], check=True, timeout=120)
    assert len({p.read_bytes() for p in paths}) == 1
    with safe_open(str(paths[0]), framework="pt") as f:
        assert f.metadata() == {f"key{i}": str(i) * i for i in range(12)}
        assert torch.equal(f.get_tensor("b"), torch.arange(12, dtype=torch.float32).reshape(3, 4))


def test_a_longer_header_moves_the_data_intact(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors({"x": torch.arange(7, dtype=torch.int16)}, path, metadata={"k": "v"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["note"] = "y" * 100
    _rewrite(path, n, json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 8 == 0
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["note"] == "y" * 100
        assert torch.equal(f.get_tensor("x"), torch.arange(7, dtype=torch.int16))
