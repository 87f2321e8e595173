"""Fuzzing the two parsers that read untrusted bytes: the manifest and the safetensors header.

Every mutated input must end in a flashio.errors exception (or a valid result): never another
exception type, a hang or a huge allocation. Each test counts its own cases and outcomes, asserts
on them, and prints them (pytest -s shows them).
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
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


FUZZ = settings(max_examples=400, deadline=None)
MIN_CASES = 100  # fewer would mean hypothesis gave up early (filtered or unsatisfiable inputs)


def _outcome(fn, *args) -> str:
    """'ok' or 'refused' (a FlashError); any other exception propagates and fails the test."""
    try:
        fn(*args)
    except FlashError:
        return "refused"
    return "ok"


def _fuzz_manifest(d, good: dict, paths: list, values) -> Counter[str]:
    """Write `good` with one value at one of `paths` replaced (or deleted) as d's manifest, once per
    case; count how opening the artifact and parsing the manifest end. The original is restored."""
    original = (d / "manifest.json").read_bytes()
    seen: Counter[str] = Counter()

    @FUZZ
    @given(data=st.data())
    def one_case(data):
        path = data.draw(st.sampled_from(paths))
        value = data.draw(values)
        delete = bool(path) and data.draw(st.booleans())
        raw = json.dumps(_mutate(good, path, value, delete), allow_nan=True).encode()
        (d / "manifest.json").write_bytes(raw)
        seen[f"open {_outcome(Artifact, d)}"] += 1
        seen[f"parse {_outcome(parse_manifest, raw)}"] += 1

    try:
        one_case()
    finally:
        (d / "manifest.json").write_bytes(original)
    return seen


def test_mutated_manifests_end_in_flash_errors(victim):
    d, good = victim
    seen = _fuzz_manifest(d, good, list(_paths(good)), json_values)
    print(f"\nmanifest fuzz cases: {dict(seen)}")
    assert seen["open ok"] + seen["open refused"] >= MIN_CASES
    assert seen["open refused"] and seen["parse refused"]  # the mutations do reach the checks


@pytest.fixture(scope="module", params=["int4", "int8"])
def quant_victim(tiny_opt, tmp_path_factory, request):
    from flashio.format import write_artifact

    d = write_artifact(tiny_opt[1], tmp_path_factory.mktemp("fuzz-quant") / "art", quantize=request.param,
                       group_size=16 if request.param == "int4" else None)
    return d, json.loads((d / "manifest.json").read_text())


def test_mutated_quantization_records_end_in_flash_errors(quant_victim):
    """The format-3 fields (each layer's quant record, resident_quant, the version) mutated alone."""
    d, good = quant_victim
    paths = [p for p in _paths(good) if p[:1] in (("resident_quant",), ("format_version",))
             or (len(p) > 2 and p[0] == "ffn_layers" and p[2] == "quant")]
    assert any("parts" in p for p in paths) and any(p[:1] == ("resident_quant",) for p in paths)
    # int4 rows are asymmetric: their offsets flag and fields; int8's one scale per part is in the codes
    assert any(("offsets" if good["ffn_layers"][0]["quant"]["scheme"] == "int4" else "scales_in_codes") in p
               for p in paths)
    values = json_values | st.sampled_from(["int8", "int4", "int3", "float16", "output", 0, 1, 3, 16, 2**31])
    seen = _fuzz_manifest(d, good, paths, values)
    print(f"\nquantization record fuzz cases: {dict(seen)}")
    assert seen["open ok"] + seen["open refused"] >= MIN_CASES
    assert seen["open refused"] >= MIN_CASES // 2  # nearly every change to a record is refused


def test_mutated_safetensors_headers_end_in_flash_errors(victim):
    d, _ = victim
    blob = bytes((d / "ffn.safetensors").read_bytes()[:8192])
    n = struct.unpack("<Q", blob[:8])[0]
    seen: Counter[str] = Counter()

    @FUZZ
    @given(data=st.data())
    def one_case(data):
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
        raw = struct.pack("<Q", declared) + body + blob[8 + n :]
        cut = data.draw(st.integers(0, len(raw)))
        for candidate in (raw, raw[:cut]):
            seen[_outcome(read_safetensors_header, io.BytesIO(candidate), len(candidate), "fuzzed")] += 1

    one_case()
    print(f"\nsafetensors header fuzz cases: {dict(seen)}")
    assert seen["ok"] + seen["refused"] >= 2 * MIN_CASES and seen["refused"]


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
