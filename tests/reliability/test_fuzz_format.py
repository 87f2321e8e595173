"""Fuzzing the two parsers that read untrusted bytes: the manifest and the safetensors header.

Every mutated input must end in a flashio.errors exception (or a valid result): never another
exception type, a hang or a huge allocation. Case counts are printed (pytest -s shows them).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashio.errors import FlashError
from flashio.format import Artifact, parse_manifest
from flashio.format.ffnfile import read_safetensors_header

HERE = Path(__file__).parent
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
    | st.sampled_from(["../x", "/etc/passwd", "", "a/../../b", "ffn.safetensors", "F32", "0" * 64]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:4]):
            yield from _paths(v, (*prefix, i))


def _mutate(doc, path, value, delete):
    doc = copy.deepcopy(doc)
    if not path:
        return value
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


@pytest.fixture(scope="module")
def victim(opt_artifact, tmp_path_factory):
    d = shutil.copytree(opt_artifact, tmp_path_factory.mktemp("fuzz") / "art")
    return d, json.loads((d / "manifest.json").read_text())


COUNT = {"manifest": 0, "header": 0}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_manifests_end_in_flash_errors(victim, data):
    d, good = victim
    paths = list(_paths(good))
    path = data.draw(st.sampled_from(paths))
    value = data.draw(json_values)
    delete = bool(path) and data.draw(st.booleans())
    doc = _mutate(good, path, value, delete)
    raw = json.dumps(doc, allow_nan=True).encode()
    (d / "manifest.json").write_bytes(raw)
    COUNT["manifest"] += 1
    with contextlib.suppress(FlashError):
        Artifact(d)
    with contextlib.suppress(FlashError):
        parse_manifest(raw)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_safetensors_headers_end_in_flash_errors(victim, data):
    d, _ = victim
    blob = bytearray((d / "ffn.safetensors").read_bytes()[:8192])
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    name = data.draw(st.sampled_from(sorted(header)))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
    value = data.draw(json_values | st.lists(st.integers(-(2**66), 2**66), max_size=3))
    if field is None or not isinstance(header[name], dict):
        header[name] = value
    else:
        header[name][field] = value
    body = json.dumps(header).encode()
    declared = data.draw(st.sampled_from([len(body), 2**63, 0, len(body) + 7]))
    raw = struct.pack("<Q", declared) + body + bytes(blob[8 + n :])
    cut = data.draw(st.integers(0, len(raw)))
    COUNT["header"] += 1
    for candidate in (raw, raw[:cut]):
        with contextlib.suppress(FlashError):
            read_safetensors_header(io.BytesIO(candidate), len(candidate), "fuzzed")


def test_report_case_counts():
    print(f"\nfuzz cases run: manifest {COUNT['manifest']}, safetensors header {COUNT['header']}")
    assert COUNT["manifest"] >= 100 and COUNT["header"] >= 100


def test_atheris_fuzzer(victim):
    """Coverage-guided fuzzing of both parsers with atheris (libFuzzer), where it installs."""
    pytest.importorskip("atheris")
    runs = 20000
    corpus = victim[0].parent / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "manifest").write_bytes((victim[0] / "manifest.json").read_bytes()[:4000])
    (corpus / "header").write_bytes((victim[0] / "ffn.safetensors").read_bytes()[:600])
    r = subprocess.run([sys.executable, str(HERE / "fuzz_format_atheris.py"), f"-runs={runs}",
                        "-max_len=4096", "-seed=1", str(corpus)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    done = [line for line in r.stderr.splitlines() if line.startswith("Done")]
    print(f"\natheris: {done[-1] if done else r.stderr[-300:]}")
    assert done and int(done[-1].split()[1]) >= runs
