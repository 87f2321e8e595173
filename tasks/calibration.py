"""Calibration text -> token ids: N sequences of L tokens, a held-out part, and a fingerprint.

    spec = resolve_spec("data/*.jsonl")                 # or "allenai/c4:en:validation", "stdlib:train"
    data = prepare_calibration(source, spec, n_sequences=128, seq_len=256, n_heldout=16, seed=0,
                               out_dir=Path("work/calibration"))
    ids = load_tokens(data, "calibration")              # [128, 256] int64

Specs (resolved by `resolve_spec`, which fails at once when nothing matches):
- local files: a file, a directory (searched recursively) or a glob, of one kind: text
  (.txt .py .md .rst: one document per file), JSON lines (.jsonl .json), .parquet or .csv;
- a hub dataset `name[:config][:split]` (split defaults to train; a two-part spec whose second
  part is a split name such as `imdb:test` means name:split), always read streaming, so a
  corpus such as C4 is never downloaded whole;
- `stdlib:train` / `stdlib:heldout`: the Python standard library's sources as split by
  `tasks.demo` (what the demo model was trained on / never saw).

Documents are read through `datasets` in a seeded shuffled order, tokenized with the source
model's tokenizer (each document as the tokenizer encodes a text, so with its bos; eos appended
when the tokenizer adds neither), concatenated and cut into sequences. When the tokenizer puts a
bos before every text, every row starts with it (in place of the row's first token where the row
starts mid-document), as the model always sees text at inference. The held-out part comes
from `heldout_spec` when given, else from the documents after those used for calibration.

The two parts are sampled differently:
- calibration (activation statistics, predictor training): the first N rows of the stream, so
  from as few documents as N x L tokens need (`_fill`);
- held-out (the evaluation's perplexity): rows spread over documents (`_fill_spread`). A document
  of at least L tokens gives rows of its own, cut from its start; shorter ones are concatenated
  into rows that hold several of them. Each long document and each row of short ones is a group;
  reading stops once there are N groups (or, once the rows suffice, after 4N documents), and rows
  are taken round-robin over the groups in reading order, one per group per round, each group's
  rows in a seeded random order: one passage from each of N documents when there are N, more rows
  per document only when there are fewer. When even that leaves too few rows, they are cut from
  the concatenated stream of all the documents read, as for calibration. The evaluation's figure
  is thus a mean over documents' passages, not over the opening of the first document
  (`CalibrationData.heldout_documents`: the documents the chosen rows overlap).

The fingerprint hashes the spec, the options and the token ids.
"""

from __future__ import annotations

import glob
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from prefect import get_run_logger, task
from safetensors.torch import load_file

from flashio.hashing import sha256_file
from tasks.caching import run_stage, sha256_json, stage_cache
from tasks.errors import InputError
from tasks.source import SourceModel
from tasks.tensorfiles import save_tensors

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".py", ".md", ".rst")
BUILDERS = {**dict.fromkeys(TEXT_SUFFIXES, "text"), ".jsonl": "json", ".json": "json",
            ".parquet": "parquet", ".csv": "csv"}
SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")
SHUFFLE_BUFFER = 1000  # documents; the datasets shuffle buffer for streaming reads
TOKENS_FILE = "tokens.safetensors"
HELDOUT_READ_FACTOR = 4  # held-out sampling reads at most this many documents per row once the rows suffice


@dataclass(frozen=True)
class CalibrationSpec:
    """A resolved data spec: what `datasets` will read, and a digest of it for cache keys."""

    text: str  # as given
    kind: str  # "files" | "hub"
    builder: str | None = None  # datasets builder for local files: text, json, parquet, csv
    files: tuple[Path, ...] = ()
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    digest: str = ""  # sha256 over the files' contents (local) or the spec (hub)

    def describe(self) -> str:
        if self.kind == "hub":
            return f"hub dataset {self.hub_name} (config {self.hub_config or 'default'}, split {self.hub_split})"
        return f"{len(self.files)} {self.builder} file(s) from {self.text!r}"


@dataclass(frozen=True)
class CalibrationData:
    """Token ids on disk (`path`: safetensors with `calibration` [N, L] and `heldout` [M, L])."""

    path: Path
    fingerprint: str
    spec: str
    heldout_spec: str | None
    n_sequences: int
    n_heldout: int
    seq_len: int
    seed: int
    documents: int  # documents the calibration part drew from
    heldout_documents: int  # documents the held-out rows overlap (see _fill_spread)


def _is_local(spec: str) -> bool:
    return (spec.startswith(("/", "./", "../", "~", "."))
            or any(c in spec for c in "*?[")
            or Path(spec).suffix.lower() in BUILDERS
            or Path(spec).expanduser().exists())


def _file_digest(files: tuple[Path, ...]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        h.update(bytes.fromhex(sha256_file(f)))  # the same digest as before, read in chunks
    return h.hexdigest()


def _local_spec(text: str, files: list[Path]) -> CalibrationSpec:
    files = sorted({f.resolve() for f in files if f.is_file()})
    if not files:
        raise InputError(f"calibration spec {text!r} matches no files; give a file, a directory or a glob of "
                         f"{', '.join(sorted(BUILDERS))} files, or a hub dataset 'name[:config][:split]'")
    kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        bad = sorted({f.suffix or f.name for f in files if f.suffix.lower() not in BUILDERS})
        raise InputError(f"calibration spec {text!r} matches files of unsupported kinds {bad}; "
                         f"supported: {', '.join(sorted(BUILDERS))}")
    if len(kinds) > 1:
        raise InputError(f"calibration spec {text!r} mixes kinds of files ({', '.join(sorted(kinds))}); "
                         "point it at one kind (e.g. a glob such as 'data/*.jsonl')")
    tup = tuple(files)
    return CalibrationSpec(text=text, kind="files", builder=kinds.pop(), files=tup, digest=_file_digest(tup))


def resolve_spec(spec: str) -> CalibrationSpec:
    """Resolve a calibration spec; raises InputError when it matches nothing."""
    spec = spec.strip()
    if not spec:
        raise InputError("empty calibration spec")
    if spec == "stdlib" or spec.startswith("stdlib:"):
        from tasks.demo import SPLITS, stdlib_text_files

        split = spec.partition(":")[2] or "train"
        if split not in SPLITS:
            raise InputError(f"calibration spec {spec!r}: unknown stdlib split {split!r}; use one of {SPLITS}")
        return _local_spec(spec, stdlib_text_files(split))
    if _is_local(spec):
        p = Path(spec).expanduser()
        if p.is_dir():
            files = [f for f in p.rglob("*") if f.suffix.lower() in BUILDERS
                     and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        elif p.is_file():
            files = [p]
        else:
            files = [Path(f) for f in glob.glob(str(p), recursive=True)]
        return _local_spec(spec, files)
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise InputError(f"calibration spec {spec!r} is neither a local path nor a hub dataset "
                         "'name[:config][:split]'")
    name, config, split = parts[0], None, "train"
    if len(parts) == 2:
        if parts[1].split("[")[0] in SPLIT_NAMES:
            split = parts[1]
        else:
            config = parts[1] or None
    elif len(parts) == 3:
        config, split = parts[1] or None, parts[2] or "train"
    return CalibrationSpec(text=spec, kind="hub", hub_name=name, hub_config=config, hub_split=split,
                           digest=sha256_json({"hub": name, "config": config, "split": split}))


def iter_rows(spec: CalibrationSpec, *, seed: int | None = None) -> Iterator[dict]:
    """The spec's rows (dicts), streaming; in a seeded shuffled order when `seed` is given."""
    import datasets

    try:
        if spec.kind == "files":
            kw = {"sample_by": "document"} if spec.builder == "text" else {}
            ds = datasets.load_dataset(spec.builder, data_files=[str(f) for f in spec.files], split="train",
                                       streaming=True, **kw)
        else:
            ds = datasets.load_dataset(spec.hub_name, spec.hub_config, split=spec.hub_split, streaming=True)
        if seed is not None:
            ds = ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        yield from ds
    except InputError:
        raise
    except Exception as exc:  # datasets raises many types (offline, missing config, bad files)
        raise InputError(f"cannot read {spec.describe()}: {type(exc).__name__}: {exc}") from None


def iter_documents(spec: CalibrationSpec, *, seed: int, text_field: str | None = None) -> Iterator[str]:
    """The spec's documents (non-empty text values) in a seeded shuffled order."""
    field = None
    for row in iter_rows(spec, seed=seed):
        if field is None:
            field = _text_field(row, text_field, spec)
        value = row[field]
        if isinstance(value, str) and value:
            yield value


def _text_field(row: dict, wanted: str | None, spec: CalibrationSpec) -> str:
    if wanted is not None:
        if wanted not in row:
            raise InputError(f"calibration data {spec.text!r} has no field {wanted!r}; fields: {sorted(row)}")
        return wanted
    for name in ("text", "content", "document"):
        if isinstance(row.get(name), str):
            return name
    for name, value in row.items():
        if isinstance(value, str):
            return name
    raise InputError(f"calibration data {spec.text!r} has no text field (fields: {sorted(row)}); "
                     "pass text_field=")


def _fill(docs: Iterator[str], encode: Callable[[str], list[int]], n: int, seq_len: int) -> tuple[np.ndarray, int, int]:
    """Cut the concatenated token stream of `docs` into `n` rows of `seq_len`; stops reading
    once they are full. Returns (ids [n', seq_len], documents read, tokens read)."""
    rows: list[np.ndarray] = []
    buf: list[int] = []
    n_docs = n_tokens = 0
    if n == 0:
        return np.zeros((0, seq_len), np.int32), 0, 0
    for text in docs:
        ids = encode(text)
        n_docs += 1
        n_tokens += len(ids)
        buf.extend(ids)
        full = len(buf) // seq_len
        if full:
            take = min(full, n - len(rows))
            arr = np.asarray(buf[: take * seq_len], dtype=np.int32).reshape(take, seq_len)
            rows.extend(arr)
            buf = buf[full * seq_len:]
        if len(rows) >= n:
            break
    out = np.stack(rows) if rows else np.zeros((0, seq_len), np.int32)
    return out, n_docs, n_tokens


def _fill_spread(docs: Iterator[str], encode: Callable[[str], list[int]], n: int, seq_len: int, *,
                 seed: int) -> tuple[np.ndarray, int, int, int]:
    """`n` rows of `seq_len` spread over documents. A document of at least `seq_len` tokens gives
    rows of its own, cut from its start (its last partial row is left out); shorter documents are
    concatenated, in reading order, into rows that hold several of them. Each long document, and
    each row of short ones, is a group; rows are taken round-robin over the groups in reading order
    (one per group per round; a group's rows in a seeded random order), so from `n` groups when
    there are `n`. Reading stops once there are `n` groups, or after HELDOUT_READ_FACTOR x `n`
    documents once their rows suffice. When the groups hold too few rows (the long documents'
    partial rows left out), the rows are cut from the concatenated stream of all the documents read,
    as `_fill` cuts it. Returns (ids [n', seq_len], documents the rows overlap, documents read,
    tokens read)."""
    if n == 0:
        return np.zeros((0, seq_len), np.int32), 0, 0, 0
    groups: list[list[tuple[np.ndarray, set[int]]]] = []  # rows and the documents each overlaps
    encoded: list[list[int]] = []
    short: list[int] = []  # the pending short documents' tokens
    short_docs: set[int] = set()
    n_tokens = selectable = 0
    for text in docs:
        ids = encode(text)
        d = len(encoded)
        encoded.append(ids)
        n_tokens += len(ids)
        if len(ids) >= seq_len:
            k = len(ids) // seq_len
            arr = np.asarray(ids[: k * seq_len], dtype=np.int32).reshape(k, seq_len)
            groups.append([(row, {d}) for row in arr])
            selectable += k
        else:
            short.extend(ids)
            short_docs.add(d)
            if len(short) >= seq_len:  # one row of short documents; the rest starts the next one
                groups.append([(np.asarray(short[:seq_len], dtype=np.int32), set(short_docs))])
                selectable += 1
                short = short[seq_len:]
                short_docs = {d} if short else set()
        if len(groups) >= n or (len(encoded) >= HELDOUT_READ_FACTOR * n and selectable >= n):
            break
    if selectable < n:  # too little text to leave anything out: consecutive rows of all of it
        rows, _, _ = _fill(iter(encoded), lambda ids: ids, n, seq_len)
        starts = np.cumsum([0, *(len(ids) for ids in encoded[:-1])])  # each document's first token
        used: set[int] = set()
        for r in range(len(rows)):  # row r holds the stream's tokens [r * seq_len, (r + 1) * seq_len)
            first = int(np.searchsorted(starts, r * seq_len, side="right")) - 1
            last = int(np.searchsorted(starts, (r + 1) * seq_len, side="left")) - 1
            used.update(range(first, last + 1))
        return rows, len(used), len(encoded), n_tokens
    rng = np.random.default_rng(seed)
    orders = [[g[i] for i in rng.permutation(len(g))] for g in groups]
    chosen: list[tuple[np.ndarray, set[int]]] = []
    for k in range(max(len(o) for o in orders)):
        chosen += [o[k] for o in orders if k < len(o)][: n - len(chosen)]
        if len(chosen) >= n:
            break
    used = set().union(*(docs_of for _, docs_of in chosen))
    return np.stack([row for row, _ in chosen]), len(used), len(encoded), n_tokens


def _encoder(tokenizer) -> tuple[Callable[[str], list[int]], int | None]:
    """(encode, the bos every row must start with, or None when the tokenizer adds none)."""
    probe = tokenizer("a")["input_ids"]
    specials = set(tokenizer.all_special_ids)
    adds_special = any(i in specials for i in probe)
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    leading_bos = bos if (bos is not None and probe and probe[0] == bos) else None

    def encode(text: str) -> list[int]:
        ids = tokenizer(text)["input_ids"]
        return [*ids, eos] if (not adds_special and eos is not None) else ids

    return encode, leading_bos


def _open_with_bos(rows: np.ndarray, bos: int | None) -> np.ndarray:
    """Every row starts with bos when the tokenizer puts one before every text: a row cut from
    the middle of the stream gets it in place of its first token (which is context only in the
    evaluation), as llama.cpp's perplexity does. A model that always saw bos first (Gemma: dense
    perplexity 88 on rows without it, 4-19 with it) is otherwise measured off its distribution."""
    if bos is not None and rows.size:
        rows[:, 0] = bos
    return rows


def prepare_calibration(source: SourceModel, spec: CalibrationSpec, *, n_sequences: int, seq_len: int,
                        n_heldout: int, seed: int, out_dir: Path, heldout_spec: CalibrationSpec | None = None,
                        text_field: str | None = None) -> CalibrationData:
    """Tokenize calibration text into [n_sequences, seq_len] + held-out [n_heldout, seq_len]."""
    if n_sequences < 1 or n_heldout < 0 or seq_len < 2:
        raise InputError(f"need n_sequences >= 1, n_heldout >= 0 and seq_len >= 2; got {n_sequences}, "
                         f"{n_heldout}, {seq_len}")
    if seq_len > source.max_positions:
        raise InputError(f"seq_len {seq_len} exceeds the model's {source.max_positions} positions; lower --seq-len")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    tokenizer.model_max_length = 1 << 62  # documents are cut into sequences here, not truncated
    encode, bos = _encoder(tokenizer)
    docs = iter_documents(spec, seed=seed, text_field=text_field)
    calib, n_docs, n_tok = _fill(docs, encode, n_sequences, seq_len)
    calib = _open_with_bos(calib, bos)
    if len(calib) < n_sequences:
        raise InputError(
            f"calibration data {spec.text!r} ({spec.describe()}) holds {n_tok:,} tokens in {n_docs} documents; "
            f"{n_sequences} sequences of {seq_len} tokens need {n_sequences * seq_len:,}: lower the sample count "
            "or the sequence length, or give more text")
    if heldout_spec is not None:
        docs = iter_documents(heldout_spec, seed=seed, text_field=text_field)
    held, h_docs, h_read, h_tok = _fill_spread(docs, encode, n_heldout, seq_len, seed=seed)
    held = _open_with_bos(held, bos)
    if len(held) < n_heldout:
        where = heldout_spec.text if heldout_spec else f"{spec.text} (after the calibration part)"
        raise InputError(
            f"held-out data {where!r} holds {h_tok:,} tokens in {h_read} documents; {n_heldout} sequences of "
            f"{seq_len} tokens need {n_heldout * seq_len:,}: lower the held-out count or give more text")
    vocab = _model_vocab(source)
    for name, ids in (("calibration", calib), ("held-out", held)):
        if ids.size and int(ids.max()) >= vocab:
            raise InputError(f"{name} token id {int(ids.max())} is outside the model's vocabulary ({vocab}): "
                             f"the tokenizer in {source.path} does not match the model")
    fingerprint = hashlib.sha256(
        sha256_json({"spec": spec.text, "digest": spec.digest, "heldout": heldout_spec.text if heldout_spec else None,
                     "seed": seed, "seq_len": seq_len}).encode()
        + calib.tobytes() + b"|" + held.tobytes()).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / TOKENS_FILE
    save_tensors({"calibration": torch.from_numpy(calib), "heldout": torch.from_numpy(held)}, str(path),
                 metadata={"fingerprint": fingerprint, "spec": spec.text})
    log.info("calibration: %d x %d tokens from %d documents, held out %d x %d from %d documents (of %d read)",
             n_sequences, seq_len, n_docs, n_heldout, seq_len, h_docs, h_read)
    return CalibrationData(path=path, fingerprint=fingerprint, spec=spec.text,
                           heldout_spec=heldout_spec.text if heldout_spec else None, n_sequences=n_sequences,
                           n_heldout=n_heldout, seq_len=seq_len, seed=seed, documents=n_docs,
                           heldout_documents=h_docs)


def _model_vocab(source: SourceModel) -> int:
    import json

    return int(json.loads((source.path / "config.json").read_text())["vocab_size"])


def load_tokens(data: CalibrationData, part: str) -> torch.Tensor:
    """`part` ("calibration" or "heldout") as int64 [n, seq_len]."""
    return load_file(str(data.path))[part].long()


@task(name="resolve-calibration-spec")
def resolve_spec_task(spec: str) -> CalibrationSpec:
    return resolve_spec(spec)


@task(name="calibration", cache_key_fn=stage_cache("calibration", __name__))
def calibration_task(source: SourceModel, spec: CalibrationSpec, heldout_spec: CalibrationSpec | None,
                     n_sequences: int, seq_len: int, n_heldout: int, seed: int, text_field: str | None,
                     work_dir: Path) -> CalibrationData:
    data = run_stage("calibration", [__name__], lambda out: prepare_calibration(
        source, spec, n_sequences=n_sequences, seq_len=seq_len, n_heldout=n_heldout, seed=seed, out_dir=out,
        heldout_spec=heldout_spec, text_field=text_field))
    get_run_logger().info("calibration: %d x %d tokens (+%d held out), fingerprint %s", n_sequences, seq_len,
                          n_heldout, data.fingerprint[:16])
    return data
