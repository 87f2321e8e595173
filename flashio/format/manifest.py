"""The artifact manifest (format version 1): its dataclasses and its validating parser.

`manifest.json` is the only place where the artifact's contracts live: file names, dtypes, the
per-layer FFN layout (offsets into ffn.safetensors), predictor settings, checksums and lineage.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

from flashio.errors import FormatError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RESIDENT = "resident.safetensors"
FFN = "ffn.safetensors"
PREDICTORS = "predictors.safetensors"
MAX_MANIFEST_BYTES = 64 << 20  # a 7B model's manifest is a few KiB; refuse absurd ones early

DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class FFNLayer:
    tensor: str  # name of the [n_neurons, bundle_width] tensor in ffn.safetensors
    n_neurons: int
    bundle_width: int  # elements per bundle (row)
    offset_bytes: int  # absolute offset of the tensor's data in ffn.safetensors (4096-aligned)
    length_bytes: int
    order_tensor: str  # int64 [n_neurons] in resident.safetensors: stored row -> source neuron id
    active_threshold: float  # |activation| above this counts as active (0 for ReLU: output > 0)


@dataclass(frozen=True)
class PredictorLayer:
    rank: int
    threshold: float  # sigmoid(logit) > threshold means "predicted active"


@dataclass(frozen=True)
class Manifest:
    architecture: str  # the checkpoint's model_type
    model_config: dict[str, Any]  # the source config.json
    dtype: str
    activation: str  # "relu" | "silu"
    gated: bool
    bundle_layout: tuple[tuple[str, int, int], ...]  # (part, first element, end element) of a row
    ffn_layers: tuple[FFNLayer, ...]
    files: dict[str, FileEntry]
    predictor_layers: tuple[PredictorLayer, ...] | None = None
    tokenizer: dict[str, Any] | None = None  # {"file", "bos_token_id", "eos_token_id", "add_bos"}
    lineage: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    ffn_file: str = FFN
    resident_file: str = RESIDENT
    predictors_file: str | None = None

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]

    @property
    def n_layers(self) -> int:
        return len(self.ffn_layers)

    def segment(self, part: str) -> slice:
        for name, start, end in self.bundle_layout:
            if name == part:
                return slice(start, end)
        raise KeyError(part)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["bundle_layout"] = [list(s) for s in self.bundle_layout]
        return {"format_version": d.pop("format_version"), **d}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n"


def check_relative_name(name: Any, what: str) -> str:
    """A file name inside the artifact: relative, POSIX, no '..', no empty parts."""
    if not isinstance(name, str) or not name:
        raise FormatError(f"manifest.json: {what} must be a non-empty file name, got {name!r}")
    norm = posixpath.normpath(name)
    if (name.startswith(("/", "\\")) or "\\" in name or ":" in name or norm.startswith("..")
            or ".." in name.split("/") or norm != name or "\x00" in name):
        raise FormatError(
            f"manifest.json: {what} {name!r} leaves the artifact directory or is not a plain "
            "relative path; expected a name like 'ffn.safetensors' or 'report/summary.json'")
    return name


def _get(d: dict, key: str, typ: type | tuple, where: str) -> Any:
    if key not in d:
        raise FormatError(f"manifest.json: {where} has no {key!r}")
    v = d[key]
    ok = isinstance(v, typ) and not (typ in (int, (int,)) and isinstance(v, bool))
    if not ok:
        raise FormatError(f"manifest.json: {where}.{key} = {v!r} has the wrong type "
                          f"(expected {getattr(typ, '__name__', typ)})")
    return v


def _nonneg_int(d: dict, key: str, where: str) -> int:
    v = _get(d, key, int, where)
    if v < 0:
        raise FormatError(f"manifest.json: {where}.{key} = {v} is negative")
    return v


def _finite(d: dict, key: str, where: str) -> float:
    v = float(_get(d, key, (int, float), where))
    if not math.isfinite(v):
        raise FormatError(f"manifest.json: {where}.{key} = {v} is not a finite number")
    return v


def parse_manifest(text: bytes | str) -> Manifest:
    """Parse and validate manifest.json; every problem raises FormatError naming the field."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise FormatError(f"manifest.json is {len(text)} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise FormatError(f"manifest.json is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(d, dict):
        raise FormatError(f"manifest.json: expected a JSON object, got {type(d).__name__}")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"manifest.json: format_version {version!r} is not supported "
                          f"(this flashio reads version {FORMAT_VERSION}); use a matching flashio release")
    dtype = _get(d, "dtype", str, "manifest")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"manifest.json: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    layout_raw = _get(d, "bundle_layout", list, "manifest")
    layout = []
    for seg in layout_raw:
        if (not isinstance(seg, list) or len(seg) != 3 or not isinstance(seg[0], str)
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seg[1:])
                or seg[1] >= seg[2]):
            raise FormatError(f"manifest.json: bad bundle_layout segment {seg!r} (expected [part, start, end])")
        layout.append((seg[0], seg[1], seg[2]))
    files = {}
    for name, entry in _get(d, "files", dict, "manifest").items():
        check_relative_name(name, "files key")
        if not isinstance(entry, dict):
            raise FormatError(f"manifest.json: files[{name!r}] must be an object")
        sha = _get(entry, "sha256", str, f"files[{name!r}]")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise FormatError(f"manifest.json: files[{name!r}].sha256 {sha!r} is not a hex sha256")
        files[name] = FileEntry(_nonneg_int(entry, "bytes", f"files[{name!r}]"), sha)
    layers = []
    for i, L in enumerate(_get(d, "ffn_layers", list, "manifest")):
        w = f"ffn_layers[{i}]"
        if not isinstance(L, dict):
            raise FormatError(f"manifest.json: {w} must be an object")
        layer = FFNLayer(
            tensor=_get(L, "tensor", str, w), n_neurons=_nonneg_int(L, "n_neurons", w),
            bundle_width=_nonneg_int(L, "bundle_width", w), offset_bytes=_nonneg_int(L, "offset_bytes", w),
            length_bytes=_nonneg_int(L, "length_bytes", w), order_tensor=_get(L, "order_tensor", str, w),
            active_threshold=_finite(L, "active_threshold", w))
        if layer.n_neurons == 0 or layer.length_bytes != layer.n_neurons * layer.bundle_width * DTYPES[dtype]:
            raise FormatError(f"manifest.json: {w}.length_bytes = {layer.length_bytes} but n_neurons x "
                              f"bundle_width x itemsize = {layer.n_neurons * layer.bundle_width * DTYPES[dtype]}")
        if layout and layout[-1][2] != layer.bundle_width:
            raise FormatError(f"manifest.json: {w}.bundle_width = {layer.bundle_width} but bundle_layout "
                              f"ends at {layout[-1][2]}")
        layers.append(layer)
    if not layers:
        raise FormatError("manifest.json: ffn_layers is empty")
    preds = None
    if d.get("predictor_layers") is not None:
        preds = []
        for i, P in enumerate(_get(d, "predictor_layers", list, "manifest")):
            if not isinstance(P, dict):
                raise FormatError(f"manifest.json: predictor_layers[{i}] must be an object")
            thr = _finite(P, "threshold", f"predictor_layers[{i}]")
            if not 0.0 < thr < 1.0:
                raise FormatError(f"manifest.json: predictor_layers[{i}].threshold = {thr} is not in (0, 1)")
            preds.append(PredictorLayer(_nonneg_int(P, "rank", f"predictor_layers[{i}]"), thr))
        if len(preds) != len(layers):
            raise FormatError(f"manifest.json: {len(preds)} predictor layers for {len(layers)} FFN layers")
    tok = d.get("tokenizer")
    if tok is not None:
        if not isinstance(tok, dict):
            raise FormatError("manifest.json: tokenizer must be an object or null")
        check_relative_name(tok.get("file"), "tokenizer.file")
    pred_file = d.get("predictors_file")
    if (pred_file is None) != (preds is None):
        raise FormatError("manifest.json: predictors_file and predictor_layers must be given together")
    m = Manifest(
        architecture=_get(d, "architecture", str, "manifest"),
        model_config=_get(d, "model_config", dict, "manifest"), dtype=dtype,
        activation=_get(d, "activation", str, "manifest"), gated=_get(d, "gated", bool, "manifest"),
        bundle_layout=tuple(layout), ffn_layers=tuple(layers), files=files,
        predictor_layers=tuple(preds) if preds is not None else None, tokenizer=tok,
        lineage=d.get("lineage") or {}, report=d.get("report"),
        ffn_file=check_relative_name(d.get("ffn_file", FFN), "ffn_file"),
        resident_file=check_relative_name(d.get("resident_file", RESIDENT), "resident_file"),
        predictors_file=check_relative_name(pred_file, "predictors_file") if pred_file else None,
    )
    for name in (m.ffn_file, m.resident_file, m.predictors_file, tok and tok["file"]):
        if name and name not in files:
            raise FormatError(f"manifest.json: {name!r} is used but not listed in files (no size/sha256)")
    return m
