"""The artifact manifest (format versions 1-3): its dataclasses and its one validating parser.

`manifest.json` is the only place where the artifact's contracts live: file names, dtypes, the
per-layer FFN layout (offsets into ffn.safetensors), predictor settings, checksums and lineage.
Everything that reads one goes through this module:

    m = parse_manifest(raw)                       # the whole manifest, for the runtime
    table = parse_manifest_files(raw)             # format_version, file table and lineage only:
                                                  # what tools that move artifacts (the registry) need
    check_files_on_disk(directory, table.files)   # each listed file inside, present, of its size

One rule for file names (check_relative_name): a relative POSIX path without empty, '.' or '..'
segments, backslashes, colons or NUL, so that it means the same file on every system.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flashio.dtypes import ITEMSIZE
from flashio.errors import FormatError
from flashio.quant import (
    EMBEDDING_ROWS,
    RESIDENT_SCHEMES,
    SCALE_DTYPE,
    SCHEMES,
    PartQuant,
    RowQuant,
    check_row_quant,
)

FORMAT_VERSION = 1  # what an artifact with 3-part (or ReLU's 2-part) bundles is written as
GATE_RESIDENT_VERSION = 2  # version 1 + gate rows resident (bundles of up + down for a gated FFN)
QUANTIZED_VERSION = 3  # version 2 + quantized bundle rows / resident matrices (flashio.quant)
READ_VERSIONS = (FORMAT_VERSION, GATE_RESIDENT_VERSION, QUANTIZED_VERSION)  # what this flashio reads
MANIFEST = "manifest.json"
RESIDENT = "resident.safetensors"
FFN = "ffn.safetensors"
PREDICTORS = "predictors.safetensors"
MAX_MANIFEST_BYTES = 64 << 20  # a 7B model's manifest is a few KiB; refuse absurd ones early
_SHA256 = re.compile(r"[0-9a-f]{64}")
# the bundle layouts this flashio reads: (gated, gate_resident) -> the parts of a row, in order.
# With gate_resident the gate rows are a [n_neurons, d_model] tensor per layer in the resident
# file (FFNLayer.gate_tensor) and flash holds up + down only (the "exact gate" layout).
LAYOUTS = {(False, False): ("up", "down"), (True, False): ("up", "gate", "down"), (True, True): ("up", "down")}
# how mode='sparse' chooses each step's neurons by default (Manifest.selection; flashio.config.Selection)
SELECTIONS = ("predictor", "gate", "gate+predictor", "gate+up")
# a gate-resident artifact's optional up sketch (Manifest.up_sketch): layer i's up rows quantized,
# [n_neurons, row_bytes] uint8 in stored order, in the resident file under this name
UP_SKETCH_TENSOR = "layers.{}.ffn.up_sketch"


class UnsafeNameError(FormatError):
    """A file name in a manifest could leave the artifact directory or collide with another file."""


@dataclass(frozen=True)
class FileEntry:
    """One file of the artifact: its relative POSIX path, size and sha256 (hex)."""

    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ManifestFiles:
    """What every reader of an artifact relies on: its files and lineage (format_version checked)."""

    files: dict[str, FileEntry]  # path -> entry, sorted by path; manifest.json itself not included
    lineage: dict[str, Any]


@dataclass(frozen=True)
class FFNLayer:
    tensor: str  # name of the [n_neurons, bundle_width] tensor in ffn.safetensors
    n_neurons: int
    bundle_width: int  # elements per bundle (row)
    offset_bytes: int  # absolute offset of the tensor's data in ffn.safetensors (4096-aligned)
    length_bytes: int
    order_tensor: str  # int64 [n_neurons] in resident.safetensors: stored row -> source neuron id
    active_threshold: float  # |activation| above this counts as active (0 for ReLU: output > 0)
    gate_tensor: str | None = None  # gate rows [n_neurons, d_model] in resident.safetensors (gate_resident)
    density: float | None = None  # fraction of neurons an exact selection keeps per token (None: the threshold)
    # quantized rows (format version 3): the tensor is uint8 [n_neurons, bundle_width = quant.row_bytes]
    quant: RowQuant | None = None


@dataclass(frozen=True)
class ResidentQuant:
    """Which resident matrices are stored quantized, and how.

    int8 (per output channel): codes under the matrix's own name, int8 [out, in], and its fp16
    scales [out] under the name in `scales`. int4 (groups along the input, as the FFN's bundle
    rows): one uint8 tensor [out, row_bytes] under the matrix's name, each row its codes, scales
    and offsets as the RowQuant in `rows` (one part, "w") lays them out. The token embeddings are
    rows of int8 in groups (flashio.quant.embedding_row_quant) in either scheme's record."""

    scheme: str  # "int8" | "int4"
    scale_dtype: str
    scales: dict[str, str] = field(default_factory=dict)  # int8: matrix name -> scale tensor name
    rows: dict[str, RowQuant] = field(default_factory=dict)  # matrix name -> its rows' layout

    @property
    def matrices(self) -> tuple[str, ...]:
        """The names of the quantized matrices."""
        return (*self.rows, *self.scales)

    @property
    def stored_tensors(self) -> tuple[str, ...]:
        """Every resident tensor kept as stored (codes and scales), whatever the compute dtype."""
        return (*self.matrices, *self.scales.values())

    def to_json(self) -> dict:
        tensors = {**self.scales, **{k: q.to_json() for k, q in self.rows.items()}}
        return {"scheme": self.scheme, "axis": "output", "scale_dtype": self.scale_dtype, "tensors": tensors}


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
    gate_resident: bool = False  # gate rows in DRAM (FFNLayer.gate_tensor), bundles of up + down
    selection: str | None = None  # mode='sparse''s default active-set selection (SELECTIONS); None: by layout
    resident_quant: ResidentQuant | None = None  # quantized resident matrices (format version 3)
    # gate-resident artifacts (format version 3): a quantized copy of every layer's up rows in DRAM
    # (UP_SKETCH_TENSOR), with which selection 'gate+up' ranks neurons by their contribution
    up_sketch: RowQuant | None = None

    @property
    def itemsize(self) -> int:
        """Bytes per element of the float weights (resident, predictors, unquantized rows)."""
        return ITEMSIZE[self.dtype]

    @property
    def quant(self) -> RowQuant | None:
        """The bundle rows' quantization (every layer's row has the same width), None for float rows."""
        return self.ffn_layers[0].quant

    @property
    def row_itemsize(self) -> int:
        """Bytes per stored element of a bundle row: 1 for quantized rows (uint8), else itemsize;
        a row is bundle_width x row_itemsize bytes."""
        return 1 if self.quant is not None else self.itemsize

    @property
    def row_bytes(self) -> int:
        return self.ffn_layers[0].bundle_width * self.row_itemsize

    @property
    def n_layers(self) -> int:
        return len(self.ffn_layers)

    def ffn_resident_tensors(self) -> list[str]:
        """The resident tensors that are the FFN's (DRAM of the FFN): gate rows and up sketches."""
        gates = [L.gate_tensor for L in self.ffn_layers if L.gate_tensor]
        return gates + ([UP_SKETCH_TENSOR.format(i) for i in range(self.n_layers)] if self.up_sketch else [])

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["bundle_layout"] = [list(s) for s in self.bundle_layout]
        d["files"] = {name: {"bytes": e.size_bytes, "sha256": e.sha256} for name, e in self.files.items()}
        # the version-2 fields only where used: a version-1 manifest reads as it always did
        for key, unused in (("gate_resident", False), ("selection", None), ("resident_quant", None),
                            ("up_sketch", None)):
            if d[key] == unused:
                del d[key]
        if self.resident_quant is not None:
            d["resident_quant"] = self.resident_quant.to_json()
        if self.up_sketch is not None:
            d["up_sketch"] = self.up_sketch.to_json()
        for L, layer in zip(d["ffn_layers"], self.ffn_layers):
            for key in ("gate_tensor", "density", "quant"):
                if L[key] is None:
                    del L[key]
            if layer.quant is not None:
                L["quant"] = layer.quant.to_json()
        return {"format_version": d.pop("format_version"), **d}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n"


def check_relative_name(name: Any, what: str, *, where: str = MANIFEST) -> str:
    """`name` if it is a file name inside the artifact (see the module docstring), else UnsafeNameError."""
    if not isinstance(name, str) or not name:
        raise UnsafeNameError(f"{where}: {what} must be a non-empty file name, got {name!r}")
    if ("\x00" in name or "\\" in name or ":" in name or name.startswith("/")
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise UnsafeNameError(
            f"{where}: {what} {name!r} would leave the artifact directory or is not a plain relative "
            "POSIX path (absolute, an empty, '.' or '..' segment, a backslash, a colon or NUL); expected "
            "a name like 'ffn.safetensors' or 'report/summary.json'")
    return name


def parse_file_entry(path: str, entry: Any, *, where: str = MANIFEST) -> FileEntry:
    """One `{"bytes": n, "sha256": hex}` object of a file table (the caller checks `path`)."""
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: files[{path!r}] = {entry!r} must be an object with 'bytes' and 'sha256'")
    size, digest = entry.get("bytes"), entry.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError(f"{where}: files[{path!r}].bytes = {size!r}, expected a non-negative integer")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise FormatError(f"{where}: files[{path!r}].sha256 = {digest!r}, expected 64 lowercase hex digits")
    return FileEntry(path, size, digest)


def parse_file_table(table: Any, *, where: str = MANIFEST) -> dict[str, FileEntry]:
    """A `files` object (path -> {bytes, sha256}) as path -> FileEntry, sorted by path.

    Every path follows check_relative_name; the table may not list manifest.json itself, nor a file
    that is also the directory of another ('report' and 'report/x.json'): UnsafeNameError.
    """
    if not isinstance(table, dict) or not table:
        raise FormatError(f"{where}: files = {str(table)[:80]!r} must be a non-empty object of "
                          "path -> {bytes, sha256}")
    files: dict[str, FileEntry] = {}
    for path in sorted(table):
        check_relative_name(path, "file name", where=where)
        if path == MANIFEST:
            raise UnsafeNameError(f"{where}: the file table lists {MANIFEST!r} itself; the manifest cannot "
                                  "record its own size and sha256: remove that entry")
        files[path] = parse_file_entry(path, table[path], where=where)
    for path in files:
        parent = posixpath.dirname(path)
        while parent:
            if parent in files:
                raise UnsafeNameError(f"{where}: {parent!r} is both a file and the directory of {path!r}")
            parent = posixpath.dirname(parent)
    return files


def _load_document(text: bytes | str, where: str) -> dict[str, Any]:
    """manifest.json's JSON object, once its size and format_version are acceptable."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{where} is {len(text)} bytes, more than the {MAX_MANIFEST_BYTES} allowed: "
                          "not an artifact manifest")
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise FormatError(f"{where} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(d, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
    version = d.get("format_version")
    if type(version) is not int or version not in READ_VERSIONS:
        raise FormatError(f"{where}: format_version {version!r} is not supported (this flashio reads versions "
                          f"{', '.join(map(str, READ_VERSIONS))}); rebuild the artifact with this flashio, or use "
                          "a matching release")
    return d


def _lineage(d: dict[str, Any], where: str) -> dict[str, Any]:
    lineage = d.get("lineage")
    if lineage is None:
        return {}
    if not isinstance(lineage, dict):
        raise FormatError(f"{where}: lineage must be an object, got {type(lineage).__name__}")
    return lineage


def parse_manifest_files(text: bytes | str, *, where: str = MANIFEST) -> ManifestFiles:
    """The format version, file table and lineage of manifest.json, validated; the rest is not read.

    For tools that store or move artifacts without running them (the registry): what they need
    is checked by exactly the code that parse_manifest runs first.
    """
    d = _load_document(text, where)
    return ManifestFiles(parse_file_table(d.get("files"), where=where), _lineage(d, where))


def read_manifest_bytes(directory: str | Path) -> bytes:
    """The bytes of `directory`/manifest.json; FormatError when it is missing or absurdly large."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FormatError(f"{directory} is not a flashio artifact: {MANIFEST} is missing (an incomplete copy, "
                          "or not the artifact's directory)")
    if (size := path.stat().st_size) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{path} is {size} bytes, more than the {MAX_MANIFEST_BYTES} allowed: "
                          "not an artifact manifest")
    return path.read_bytes()


def check_files_on_disk(directory: str | Path, files: Mapping[str, FileEntry]) -> None:
    """Each listed file resolves inside `directory` (UnsafeNameError otherwise: a link that leaves
    it), is a regular file and has its recorded size. Contents are not hashed (see Artifact.verify)."""
    directory = Path(directory)
    root = directory.resolve()
    for path, entry in files.items():
        file = directory / path
        if not (resolved := file.resolve()).is_relative_to(root):
            raise UnsafeNameError(f"{directory / MANIFEST}: file {path!r} is a link that resolves outside the "
                                  f"artifact directory ({resolved}); replace it with the file itself")
        if not file.is_file():
            raise FormatError(f"{directory / MANIFEST} lists {path!r}, but {file} is not a file (missing); "
                              "copy the whole artifact again or rebuild it")
        if (size := file.stat().st_size) != entry.size_bytes:
            raise FormatError(f"{file} has {size} bytes on disk, but {MANIFEST} records {entry.size_bytes} "
                              "(a truncated or replaced file); copy the artifact again or rebuild it")


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


def _optional(d: dict, key: str, typ: type, where: str) -> Any:
    """d[key] when present and not null (of type `typ`), else None."""
    return None if d.get(key) is None else _get(d, key, typ, where)


def _density(d: dict, where: str) -> float | None:
    if d.get("density") is None:
        return None
    v = _finite(d, "density", where)
    if not 0.0 < v <= 1.0:
        raise FormatError(f"manifest.json: {where}.density = {v} is not a fraction in (0, 1]")
    return v


def _check_layout(layout: tuple[tuple[str, int, int], ...], gated: bool, gate_resident: bool,
                  layers: list[FFNLayer], version: int) -> None:
    """The bundle layout is one this flashio reads, its parts tile the row, and the gate rows are
    named by every layer exactly when they are resident."""
    parts = tuple(p for p, _, _ in layout)
    want = LAYOUTS.get((gated, gate_resident))
    if want is None or parts != want:
        known = "; ".join(f"{list(v)} for gated={g}, gate_resident={r}" for (g, r), v in LAYOUTS.items())
        raise FormatError(f"manifest.json: bundle_layout parts {list(parts)} with gated={gated}, "
                          f"gate_resident={gate_resident} is not a layout this flashio reads ({known}); the "
                          "artifact comes from a newer flashio or was edited: upgrade flashio or rebuild it")
    for k, (p, a, b) in enumerate(layout):
        if a != (layout[k - 1][2] if k else 0) or b - a != layout[0][2] - layout[0][1]:
            raise FormatError(f"manifest.json: bundle_layout part {p!r} spans [{a}, {b}); the parts must tile "
                              "the row in equal, adjacent segments from 0")
    if gate_resident and version < GATE_RESIDENT_VERSION:
        raise FormatError(f"manifest.json: gate_resident needs format_version {GATE_RESIDENT_VERSION}, the "
                          f"manifest says {version} (an older flashio would read the bundles wrongly)")
    seen: dict[str, int] = {}
    for i, L in enumerate(layers):
        if L.gate_tensor is not None and seen.setdefault(L.gate_tensor, i) != i:
            raise FormatError(f"manifest.json: ffn_layers[{i}].gate_tensor {L.gate_tensor!r} is also "
                              f"ffn_layers[{seen[L.gate_tensor]}]'s: each layer has its own gate rows")
        if gate_resident and not L.gate_tensor:
            raise FormatError(f"manifest.json: gate_resident is true but ffn_layers[{i}] names no gate_tensor "
                              "(its resident gate rows)")
        if not gate_resident and L.gate_tensor is not None:
            raise FormatError(f"manifest.json: ffn_layers[{i}].gate_tensor = {L.gate_tensor!r} but gate_resident "
                              "is false: the bundles hold the gate")


def _row_quant(L: dict, layout: list[tuple[str, int, int]], where: str) -> RowQuant | None:
    """ffn_layers[i].quant: the layer's quantization record (flashio.quant.RowQuant), validated."""
    raw = _optional(L, "quant", dict, where)
    if raw is None:
        return None
    if not layout:
        raise FormatError(f"manifest.json: {where}.quant needs a bundle_layout")
    return _parse_row_quant(raw, tuple(p for p, _, _ in layout), layout[0][2] - layout[0][1], f"{where}.quant")


def _up_sketch(d: dict, layout: list[tuple[str, int, int]], gate_resident: bool, version: int) -> RowQuant | None:
    """up_sketch: a gate-resident artifact's quantized copy of the up rows (format version 3)."""
    raw = _optional(d, "up_sketch", dict, "manifest")
    if raw is None:
        return None
    if not gate_resident or version < QUANTIZED_VERSION:
        raise FormatError(f"manifest.json: up_sketch needs gate_resident and format_version {QUANTIZED_VERSION} "
                          f"(gate_resident {gate_resident}, format_version {version}); rebuild the artifact")
    return _parse_row_quant(raw, ("up",), layout[0][2] - layout[0][1], "up_sketch")


def _parse_row_quant(raw: dict, parts: tuple[str, ...], dim: int, w: str) -> RowQuant:
    """A RowQuant record of rows holding `parts` of `dim` elements, validated."""
    scheme = _get(raw, "scheme", str, w)
    offsets = _optional(raw, "offsets", bool, w) or False  # asymmetric groups; absent: symmetric
    n_fields = 7 if offsets else 5
    stored = []
    for k, p in enumerate(_get(raw, "parts", list, w)):
        if (not isinstance(p, list) or len(p) != n_fields or not isinstance(p[0], str)
                or not all(type(x) is int and 0 <= x < 1 << 40 for x in p[1:])):
            raise FormatError(f"manifest.json: {w}.parts[{k}] = {str(p)[:80]} is not [part, codes_start, "
                              "codes_end, scales_start, scales_end" + (", offsets_start, offsets_end]" if offsets
                                                                       else "]"))
        stored.append(PartQuant(*p))
    # two-level scales (flashio.quant.RowQuant.sub_bits); absent: fp16 scales per group
    sub_bits = _optional(raw, "sub_bits", int, w) or 0
    super_size = _optional(raw, "super_size", int, w) or 0
    # scales in the codes (flashio.quant.RowQuant.embedded); absent: after the codes
    embedded = _optional(raw, "scales_in_codes", bool, w) or False
    q = RowQuant(scheme=scheme, group_size=_nonneg_int(raw, "group_size", w),
                 scale_dtype=_get(raw, "scale_dtype", str, w), row_bytes=_nonneg_int(raw, "row_bytes", w),
                 parts=tuple(stored), offsets=offsets, sub_bits=sub_bits, super_size=super_size, embedded=embedded)
    check_row_quant(q, parts, dim, f"manifest.json: {w}")
    return q


def _check_quant_layers(layers: list[FFNLayer], version: int) -> None:
    """Quantized rows: every layer's or none, of one width, and only in format version 3."""
    quant = [L.quant for L in layers]
    if all(q is None for q in quant):
        return
    if version < QUANTIZED_VERSION:
        raise FormatError(f"manifest.json: quantized rows need format_version {QUANTIZED_VERSION}, the manifest "
                          f"says {version} (an older flashio would read the codes as floats)")
    if any(q is None for q in quant) or len({L.bundle_width for L in layers}) != 1:
        raise FormatError("manifest.json: ffn_layers mix quantized and float rows or rows of different widths; "
                          "every layer's rows must have the same stored width")
    if len(set(quant)) != 1:  # the runtime decodes every layer with one record (Manifest.quant)
        raise FormatError("manifest.json: ffn_layers' quant records differ (scheme, group size, offsets or "
                          "layout); every layer's rows must be stored alike")


def _resident_quant(d: dict) -> ResidentQuant | None:
    raw = _optional(d, "resident_quant", dict, "manifest")
    if raw is None:
        return None
    w = "resident_quant"
    scheme, scale_dtype = _get(raw, "scheme", str, w), _get(raw, "scale_dtype", str, w)
    if scheme not in RESIDENT_SCHEMES or _get(raw, "axis", str, w) != "output" or scale_dtype != SCALE_DTYPE:
        raise FormatError(f"manifest.json: resident_quant scheme {scheme!r} along {raw.get('axis')!r} with "
                          f"{scale_dtype!r} scales is not one this flashio reads ({', '.join(RESIDENT_SCHEMES)} "
                          f"along 'output', {SCALE_DTYPE} scales): upgrade flashio or rebuild the artifact")
    tensors = _get(raw, "tensors", dict, w)
    if d["format_version"] < QUANTIZED_VERSION:
        raise FormatError(f"manifest.json: resident_quant needs format_version {QUANTIZED_VERSION}")
    # rows (a one-part RowQuant record: "w", its input width): every int4 matrix, and the token
    # embeddings as int8 rows in groups in either record; the other int8 matrices: a scale tensor's name
    rows, scales = {}, {}
    for k, v in tensors.items():
        if isinstance(k, str) and isinstance(v, str) and scheme == "int8":
            scales[k] = v
            continue
        if not isinstance(k, str) or not isinstance(v, dict):
            raise FormatError(f"manifest.json: resident_quant.tensors[{str(k)[:60]!r}] must be the row layout "
                              f"of a quantized matrix" + (" or its scale tensor's name" if scheme == "int8" else "")
                              + f", got {str(v)[:80]}")
        parts = v.get("parts")
        span = parts[0] if isinstance(parts, list) and len(parts) == 1 and isinstance(parts[0], list) else None
        if span is None or len(span) < 3 or not all(type(x) is int for x in span[1:3]) or span[2] <= span[1]:
            raise FormatError(f"manifest.json: resident_quant.tensors[{k!r}].parts must be one part's "
                              f"[name, codes_start, codes_end, ...], got {str(parts)[:80]}")
        row_scheme = v.get("scheme")
        if row_scheme != scheme and not (row_scheme == "int8" and k == EMBEDDING_ROWS):
            raise FormatError(f"manifest.json: resident_quant.tensors[{k!r}] is {str(row_scheme)[:20]}, "
                              f"the record says {scheme}")
        rows[k] = _parse_row_quant(v, ("w",), (span[2] - span[1]) * 8 // SCHEMES[row_scheme], f"{w}.tensors[{k!r}]")
    if len(set(scales.values())) != len(scales) or (set(scales) | set(rows)) & set(scales.values()):
        raise FormatError(f"manifest.json: resident_quant.tensors must map each matrix to its own scale tensor, "
                          f"got {str(tensors)[:120]}")
    return ResidentQuant(scheme, scale_dtype, scales, rows)


def parse_manifest(text: bytes | str) -> Manifest:
    """Parse and validate manifest.json; every problem raises FormatError naming the field."""
    d = _load_document(text, MANIFEST)
    files = parse_file_table(d.get("files"))
    dtype = _get(d, "dtype", str, "manifest")
    if dtype not in ITEMSIZE:
        raise FormatError(f"manifest.json: dtype {dtype!r} is not one of {sorted(ITEMSIZE)}")
    layout_raw = _get(d, "bundle_layout", list, "manifest")
    layout = []
    for seg in layout_raw:
        if (not isinstance(seg, list) or len(seg) != 3 or not isinstance(seg[0], str)
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seg[1:])
                or seg[1] >= seg[2]):
            raise FormatError(f"manifest.json: bad bundle_layout segment {seg!r} (expected [part, start, end])")
        layout.append((seg[0], seg[1], seg[2]))
    layers = []
    for i, L in enumerate(_get(d, "ffn_layers", list, "manifest")):
        w = f"ffn_layers[{i}]"
        if not isinstance(L, dict):
            raise FormatError(f"manifest.json: {w} must be an object")
        layer = FFNLayer(
            tensor=_get(L, "tensor", str, w), n_neurons=_nonneg_int(L, "n_neurons", w),
            bundle_width=_nonneg_int(L, "bundle_width", w), offset_bytes=_nonneg_int(L, "offset_bytes", w),
            length_bytes=_nonneg_int(L, "length_bytes", w), order_tensor=_get(L, "order_tensor", str, w),
            active_threshold=_finite(L, "active_threshold", w),
            gate_tensor=_optional(L, "gate_tensor", str, w), density=_density(L, w),
            quant=_row_quant(L, layout, w))
        itemsize = 1 if layer.quant is not None else ITEMSIZE[dtype]
        if layer.n_neurons == 0 or layer.length_bytes != layer.n_neurons * layer.bundle_width * itemsize:
            raise FormatError(f"manifest.json: {w}.length_bytes = {layer.length_bytes} but n_neurons x "
                              f"bundle_width x itemsize = {layer.n_neurons * layer.bundle_width * itemsize}")
        width = layer.quant.row_bytes if layer.quant is not None else (layout[-1][2] if layout else None)
        if width is not None and width != layer.bundle_width:
            raise FormatError(f"manifest.json: {w}.bundle_width = {layer.bundle_width} but "
                              + ("its quant.row_bytes is" if layer.quant else "bundle_layout ends at") + f" {width}")
        layers.append(layer)
    if not layers:
        raise FormatError("manifest.json: ffn_layers is empty")
    _check_quant_layers(layers, d["format_version"])
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
    gated = _get(d, "gated", bool, "manifest")
    gate_resident = _optional(d, "gate_resident", bool, "manifest") or False
    _check_layout(tuple(layout), gated, gate_resident, layers, d["format_version"])
    selection = _optional(d, "selection", str, "manifest")
    if selection is not None:
        if selection not in SELECTIONS:
            raise FormatError(f"manifest.json: selection {selection!r} is not one of {', '.join(SELECTIONS)} "
                              "(written by a newer flashio?): upgrade flashio or rebuild the artifact")
        if selection != "predictor" and not gate_resident:
            raise FormatError(f"manifest.json: selection {selection!r} needs the gate rows resident "
                              "(gate_resident: true)")
        if "predictor" in selection and preds is None:
            raise FormatError(f"manifest.json: selection {selection!r} needs predictors; the artifact has none")
    up_sketch = _up_sketch(d, layout, gate_resident, d["format_version"])
    if selection == "gate+up" and up_sketch is None:
        raise FormatError("manifest.json: selection 'gate+up' needs the up sketch (up_sketch); the artifact has none")
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
        activation=_get(d, "activation", str, "manifest"), gated=gated,
        bundle_layout=tuple(layout), ffn_layers=tuple(layers), files=files,
        predictor_layers=tuple(preds) if preds is not None else None, tokenizer=tok,
        lineage=_lineage(d, MANIFEST), report=d.get("report"),
        ffn_file=check_relative_name(d.get("ffn_file", FFN), "ffn_file"),
        resident_file=check_relative_name(d.get("resident_file", RESIDENT), "resident_file"),
        predictors_file=check_relative_name(pred_file, "predictors_file") if pred_file else None,
        format_version=d["format_version"], gate_resident=gate_resident, selection=selection,
        resident_quant=_resident_quant(d), up_sketch=up_sketch,
    )
    for name in (m.ffn_file, m.resident_file, m.predictors_file, tok and tok["file"]):
        if name and name not in files:
            raise FormatError(f"manifest.json: {name!r} is used but not listed in files (no size/sha256)")
    return m
