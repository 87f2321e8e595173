"""Write a flash-ready artifact (format version 1; 2 with resident gate rows; 3 quantized) from a model source.

    from flashio.format import write_artifact, source_from_checkpoint
    write_artifact(source_from_checkpoint("hf/opt-125m"), "artifacts/opt-125m", dtype="float16")

The pipeline's bundling task calls the same function with a neuron order and trained predictors.
The artifact is written under a temporary name, fsynced and renamed into place: a crash or a full
disk never leaves a directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from flashio.checkpoint import HFCheckpoint
from flashio.dtypes import SAFETENSORS_CODES, TORCH_DTYPES
from flashio.errors import FlashError, FormatError
from flashio.format.ffnfile import layout_ffn_file
from flashio.format.manifest import (
    FFN,
    FORMAT_VERSION,
    GATE_RESIDENT_VERSION,
    LAYOUTS,
    MANIFEST,
    PREDICTORS,
    QUANTIZED_VERSION,
    RESIDENT,
    SELECTIONS,
    UP_SKETCH_TENSOR,
    FFNLayer,
    FileEntry,
    Manifest,
    PredictorLayer,
    ResidentQuant,
    check_relative_name,
)
from flashio.gptq import gptq_neurons, gptq_rows
from flashio.hashing import sha256_file
from flashio.model_card import render_model_card, source_license
from flashio.models import get_architecture
from flashio.models.base import FFNWeights
from flashio.predictor import PredictorWeights
from flashio.quant import (
    EMBEDDING_ROWS,
    RESIDENT_QUANTIZED,
    RESIDENT_SCHEMES,
    SCALE_DTYPE,
    GroupCodes,
    RowQuant,
    check_scheme,
    embedding_row_quant,
    quantize_embedding_rows,
    quantize_resident,
    quantize_resident_rows,
    quantize_rows,
    resident_row_quant,
    row_quant,
)
from flashio.version import __version__

# the up sketch's group size where it divides d_model: on Gemma 3 270M, ranking by contribution
# against int4 sketches kept top-1 0.9715 at 80% density with groups of 32 and 0.9616 with one
# scale per row (the exact contribution oracle: 0.9882)
SKETCH_GROUP = 32

log = logging.getLogger(__name__)

MODEL_CARD = "README.md"  # Hugging Face's model card: front matter, the report's figures, how to run it


@dataclass
class ModelSource:
    """Everything the writer needs from a model, one FFN layer at a time."""

    model_type: str
    config: dict[str, Any]  # HF config.json
    n_layers: int
    resident: dict[str, torch.Tensor]  # flashio names (see the architecture's table)
    ffn: Callable[[int], FFNWeights]
    tokenizer_files: list[Path] = field(default_factory=list)
    lineage: dict[str, Any] = field(default_factory=dict)  # lineage["source"]["license"]: for the model card
    licence_files: list[Path] = field(default_factory=list)  # LICENSE / NOTICE...: copied as they are


def source_from_checkpoint(path: str | Path, *, hash_files: bool = True) -> ModelSource:
    """A ModelSource over a local Hugging Face checkpoint (config.json + safetensors)."""
    ckpt = HFCheckpoint(path)
    arch = get_architecture(ckpt.config["model_type"])
    args = arch.ModelArgs.from_hf(ckpt.config)
    resident, ffn = arch.read_checkpoint(ckpt, args)
    lineage: dict[str, Any] = {"source": {"path": str(Path(path).resolve()),
                                          "model_type": ckpt.config["model_type"],
                                          "license": source_license(ckpt.path)}}
    if hash_files:
        lineage["source"]["files"] = {p.name: sha256_file(p) for p in ckpt.file_paths()}
    return ModelSource(ckpt.config["model_type"], ckpt.config, args.n_layers, resident, ffn,
                       ckpt.tokenizer_files(), lineage, ckpt.licence_files())


def model_card(name: str, model_type: str, lineage: dict[str, Any], report: dict[str, Any] | None,
               licence_file_names: Sequence[str]) -> str:
    """The artifact's README.md from what its manifest records: the source (a hub id only when it
    came from the hub: a local directory names no base model), its licence, the report's summary."""
    src = lineage.get("source") or {}
    base_model = src.get("id") if src.get("revision") else None
    summary = report.get("summary", report) if report else None
    return render_model_card(name=name, base_model=base_model, license=src.get("license"), family=model_type,
                             report=summary, licence_file_names=licence_file_names)


def _tokenizer_entry(source: ModelSource) -> dict[str, Any] | None:
    names = {p.name: p for p in source.tokenizer_files}
    if "tokenizer.json" not in names:
        return None
    tcfg: dict[str, Any] = {}
    if "tokenizer_config.json" in names:
        tcfg = json.loads(names["tokenizer_config.json"].read_text())
    c = source.config
    return {"file": "tokenizer.json", "bos_token_id": c.get("bos_token_id"),
            "eos_token_id": c.get("eos_token_id"), "add_bos": bool(tcfg.get("add_bos_token", True))}


def _check_order(order: Any, n: int, layer: int) -> torch.Tensor:
    o = torch.as_tensor(np.asarray(order), dtype=torch.int64)
    if o.shape != (n,) or not torch.equal(torch.sort(o).values, torch.arange(n)):
        raise FlashError(f"neuron order of layer {layer} is not a permutation of 0..{n - 1} "
                         f"(shape {tuple(o.shape)})")
    return o


def _check_gate_options(model_type: str, gated: bool, gate_resident: bool, densities: Sequence[float | None] | None,
                        selection: str | None, predictors: Sequence[PredictorWeights] | None,
                        up_sketch: str | None = None) -> None:
    """The exact-gate options, refused before anything is written when the artifact could not hold them."""
    if gate_resident and not gated:
        raise FlashError(f"gate_resident: {model_type} FFNs have no gate (not gated); pack without it")
    if up_sketch is not None and not gate_resident:
        raise FlashError("up_sketch ranks the exact gate's neurons: pass gate_resident=True with it")
    if selection == "gate+up" and up_sketch is None:
        raise FlashError("selection 'gate+up' ranks neurons against the up sketch: pass up_sketch='int4' (or 'int8')")
    bad = [x for x in densities or [] if x is not None and not 0.0 < float(x) <= 1.0]
    if bad:
        raise FlashError(f"densities must be fractions in (0, 1] (or None), got {bad[:3]}")
    if selection is not None:
        if selection not in SELECTIONS:
            raise FlashError(f"selection {selection!r} is not one of {', '.join(SELECTIONS)}")
        if selection != "predictor" and not gate_resident:
            raise FlashError(f"selection {selection!r} computes the gate from resident rows: pass gate_resident=True")
        if "predictor" in selection and predictors is None:
            raise FlashError(f"selection {selection!r} needs predictors")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_artifact(
    source: ModelSource | str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    orders: Sequence[Any] | None = None,
    predictors: Sequence[PredictorWeights] | None = None,
    active_thresholds: Sequence[float] | None = None,
    gate_resident: bool = False,
    densities: Sequence[float | None] | None = None,
    selection: str | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    quantize_resident: str | None = None,
    up_sketch: str | None = None,
    up_sketch_group_size: int | None = None,
    two_level_scales: bool = False,
    embed_scales: bool | None = None,
    hessians: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    resident_hessians: Callable[[str], torch.Tensor | None] | None = None,
    lineage: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    report_files: dict[str, Path] | None = None,
    name: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write an artifact directory and return its path.

    orders[i]: stored row j of layer i holds source neuron orders[i][j] (default: identity).
    predictors[i]: layer i's predictor in *source* neuron order; the writer permutes its rows.
    active_thresholds[i]: what counts as active for layer i (default 0: ReLU output > 0).
    gate_resident: gated FFNs only: the gate rows go to the resident file (`layers.{i}.ffn.gate`,
      [n_neurons, d_model] in stored order) and the bundles hold up + down (format version 2), for
      the exact-gate selection (flashio.exact).
    densities[i]: the fraction of layer i's neurons an exact selection keeps per token (None: its
      active_threshold decides).
    selection: mode='sparse''s default selection, one of flashio.format.manifest.SELECTIONS
      (None: 'gate' for gate_resident, else 'predictor').
    quantize: 'int8' or 'int4': bundle rows quantized group-wise (int8 symmetric, int4 with an offset
      per group too), fp16 scales inside each row (flashio.quant; format version 3); group_size:
      elements per scale along d_model (default: int8 d_model, one scale per part of a row; int4 32
      where it divides d_model). Predictors stay in `dtype`. int8 with one scale per part holds it in
      the parities of the part's first 16 codes (flashio.quant.RowQuant.embedded: rows of exactly
      the codes' bytes) unless embed_scales=False (the scales after the codes, as artifacts before).
    two_level_scales: int4 rows (FFN and resident) with two-level scales (flashio.quant.RowQuant.sub_bits:
      each group's scale and offset a 6-bit multiple of its super-block's fp16 steps, 4.5 bits per
      weight against 5), where d_model allows them (a multiple of 128).
    hessians(i): with quantize, layer i's calibration matrices (H of the FFN input [D, D], of the
      down projection's input [N, N]; tasks.hessians), asked for in layer order: the rows are then
      quantized by GPTQ (flashio.gptq) instead of rounded to nearest.
    resident_hessians(name): with quantize_resident, H of the input of resident matrix `name`
      (layers.{i}.attn.{q,k,v,o}.weight, asked for right after hessians(i); lm_head.weight after the
      last layer; None: rounded to nearest): those matrices are quantized by GPTQ, and so are
      resident gate rows, on hessians(i)'s FFN input (tasks.hessians.CalibrationHessians.resident).
    quantize_resident: 'int8' (the default when quantize is given), 'int4' or 'none': the resident
      matrices (attention, an untied head, resident gate rows): int8 per output channel, int4 in
      groups along the input as the bundle rows (32 where they divide it, with offsets; rounded to
      nearest unless resident_hessians); in either scheme the token embeddings as int8 rows in groups of
      32 (flashio.quant.EMBEDDING_ROWS; by GPTQ on the head's input when a tied head multiplies by them);
      position embeddings stay in `dtype`.
    up_sketch: gate-resident artifacts: 'int4' or 'int8': a quantized copy of every layer's up rows
      stays in DRAM too (UP_SKETCH_TENSOR, unaligned rows; format version 3), with which selection
      'gate+up' ranks neurons by |act(gate) * (x @ up)|; up_sketch_group_size: elements per scale
      (default 32 where it divides d_model, else d_model).
    name: what the model card (README.md) calls the artifact (default: the directory's name).
    progress(done_layers, n_layers) is called after each layer.
    The source's licence files are copied beside the weights and named in the card.
    """
    if not isinstance(source, ModelSource):
        source = source_from_checkpoint(source)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FlashError(f"{out_dir} already exists; choose another directory or pass overwrite=True")
    arch = get_architecture(source.model_type)
    args = arch.ModelArgs.from_hf(source.config)
    dtype = dtype or _source_dtype(source)
    if dtype not in TORCH_DTYPES:
        raise FlashError(f"dtype {dtype!r} is not supported; choose one of {sorted(TORCH_DTYPES)}")
    tdtype = TORCH_DTYPES[dtype]
    n_layers, d, n = source.n_layers, args.dim, args.ffn_dim
    for rel in report_files or {}:  # names the reader would refuse are refused before anything is written
        check_relative_name(rel, "report file", where="write_artifact")
        if rel in (MANIFEST, FFN, RESIDENT, PREDICTORS, MODEL_CARD):
            raise FlashError(f"report file {rel!r} would replace a weight or manifest file; put reports under 'report/'")
    for p in source.tokenizer_files:
        check_relative_name(p.name, "tokenizer file", where="write_artifact")
    for p in source.licence_files:
        check_relative_name(p.name, "licence file", where="write_artifact")
        if p.name in (MANIFEST, FFN, RESIDENT, PREDICTORS, MODEL_CARD) or p.name in {t.name for t in source.tokenizer_files}:
            raise FlashError(f"licence file {p.name!r} would replace another file of the artifact; rename it")
    for what, seq in (("orders", orders), ("predictors", predictors), ("active_thresholds", active_thresholds),
                      ("densities", densities)):
        if seq is not None and len(seq) != n_layers:
            raise FlashError(f"{what} has {len(seq)} entries for a model of {n_layers} layers")
    _check_gate_options(source.model_type, arch.FFN.gated, gate_resident, densities, selection, predictors, up_sketch)
    parts = list(LAYOUTS[(arch.FFN.gated, gate_resident)])
    layout = tuple((p, k * d, (k + 1) * d) for k, p in enumerate(parts))
    width = len(parts) * d
    if quantize is not None:
        check_scheme(quantize, where="write_artifact")
    if two_level_scales and quantize != "int4":
        raise FlashError(f"two_level_scales applies to int4 rows: pass quantize='int4' (got {quantize!r})")
    rq = row_quant(tuple(parts), dim=d, scheme=quantize, group_size=group_size,
                   float_itemsize=tdtype.itemsize, two_level=two_level_scales,
                   embed_scales=embed_scales) if quantize else None
    if group_size is not None and rq is None:
        raise FlashError("group_size applies to quantized rows: pass quantize='int8' or 'int4' with it")
    quantize_resident = quantize_resident or ("int8" if quantize else "none")
    if quantize_resident not in (*RESIDENT_SCHEMES, "none"):
        raise FlashError(f"quantize_resident {quantize_resident!r} is not one of {', '.join(RESIDENT_SCHEMES)}, none")
    row_code, row_width = (("U8", rq.row_bytes) if rq else (SAFETENSORS_CODES[dtype], width))
    sketch = None
    if up_sketch is not None:
        check_scheme(up_sketch, where="write_artifact up_sketch")
        g = up_sketch_group_size or (SKETCH_GROUP if d % SKETCH_GROUP == 0 else d)
        # symmetric: what the method was measured with (Gemma 3 270M, README); it only ranks neurons
        sketch = row_quant(("up",), dim=d, scheme=up_sketch, group_size=g, aligned=False, offsets=False)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        header, placed, total = layout_ffn_file(
            [(f"layers.{i}.bundles", row_code, (n, row_width)) for i in range(n_layers)],
            {"format": "pt", "flashio": "ffn-bundles-v1"})
        resident = {k: v.to(tdtype).contiguous() for k, v in source.resident.items()}
        ffn_layers, preds_out = [], {}
        resident_groups: dict[str, GroupCodes] = {}  # resident matrices quantized by GPTQ
        gptq_resident = resident_hessians is not None and quantize_resident != "none"
        h = hashlib.sha256()
        with open(tmp / FFN, "wb") as f:
            f.write(header)
            h.update(header)
            for i in range(n_layers):
                w = source.ffn(i)
                if w.up.shape != (n, d):
                    raise FormatError(f"layer {i}: FFN up projection has shape {tuple(w.up.shape)}, "
                                      f"config says {(n, d)}")
                order = _check_order(orders[i], n, i) if orders is not None else torch.arange(n)
                mats = {"up": w.up, "gate": w.gate, "down": w.down}
                bundles = torch.cat([mats[p].to(tdtype) for p in parts], dim=1)[order].contiguous()  # [N, W]
                h_in = None
                if rq is not None:  # from the float values the unquantized artifact would hold
                    groups = None
                    if hessians:
                        h_in, h_act = hessians(i)
                        groups = _gptq_groups(mats, parts, rq, tdtype, order, h_in, h_act)
                    bundles = quantize_rows(bundles, rq, groups)  # [N, row_bytes] uint8
                info = placed[f"layers.{i}.bundles"]
                pad = info.start - f.tell()
                if pad:
                    f.write(b"\0" * pad)
                    h.update(b"\0" * pad)
                raw = bundles.view(torch.uint8).numpy()
                f.write(memoryview(raw))
                h.update(memoryview(raw))
                resident[f"layers.{i}.ffn.order"] = order
                if gate_resident:
                    resident[f"layers.{i}.ffn.gate"] = w.gate.to(tdtype)[order].contiguous()  # [N, D]
                    if gptq_resident and h_in is not None:
                        resident_groups[f"layers.{i}.ffn.gate"] = _gptq_resident(
                            f"layers.{i}.ffn.gate", w.gate.to(tdtype), h_in, quantize_resident, two_level_scales)[order]
                if gptq_resident:
                    for key in (f"layers.{i}.attn.{x}.weight" for x in "qkvo"):
                        hm = resident_hessians(key) if key in resident else None
                        if hm is not None:
                            resident_groups[key] = _gptq_resident(key, resident[key], hm, quantize_resident,
                                                                  two_level_scales)
                if sketch is not None:
                    resident[UP_SKETCH_TENSOR.format(i)] = quantize_rows(w.up.to(tdtype)[order], sketch)
                for key, b in (("up_bias", w.up_bias), ("gate_bias", w.gate_bias)):
                    if b is not None:
                        resident[f"layers.{i}.ffn.{key}"] = b.to(tdtype)[order].contiguous()
                if w.down_bias is not None:
                    resident[f"layers.{i}.ffn.down_bias"] = w.down_bias.to(tdtype).contiguous()
                thr = float(active_thresholds[i]) if active_thresholds is not None else 0.0
                ffn_layers.append(FFNLayer(f"layers.{i}.bundles", n, row_width, info.start,
                                           info.end - info.start, f"layers.{i}.ffn.order", thr,
                                           gate_tensor=f"layers.{i}.ffn.gate" if gate_resident else None,
                                           density=None if densities is None or densities[i] is None
                                           else float(densities[i]), quant=rq))
                if predictors is not None:
                    p = predictors[i]
                    if p.n_neurons != n or p.A.shape[1] != d:
                        raise FlashError(f"predictor of layer {i} maps {p.A.shape[1]} -> {p.n_neurons}, "
                                         f"expected {d} -> {n}")
                    p = p.permuted(order)
                    preds_out.update({f"layers.{i}.A": p.A.to(tdtype).contiguous(),
                                      f"layers.{i}.B": p.B.to(tdtype).contiguous(),
                                      f"layers.{i}.bias": p.bias.to(tdtype).contiguous()})
                if progress:
                    progress(i + 1, n_layers)
            assert f.tell() == total, (f.tell(), total)
            f.flush()
            os.fsync(f.fileno())
        files = {FFN: FileEntry(FFN, total, h.hexdigest())}
        # the head by GPTQ on its input: an untied lm_head, or the token embeddings a tied head multiplies by
        # (their rows looked up then carry the errors GPTQ spreads over the head's inputs)
        head = "lm_head.weight" if "lm_head.weight" in resident else EMBEDDING_ROWS
        hm = resident_hessians("lm_head.weight") if gptq_resident and head in resident else None
        if hm is not None:
            resident_groups[head] = _gptq_resident(head, resident[head], hm, quantize_resident,
                                                    two_level_scales)
        resident_quant = (_quantize_resident(resident, quantize_resident, resident_groups, two_level_scales)
                          if quantize_resident != "none" else None)
        save_file(resident, str(tmp / RESIDENT), metadata={"format": "pt"})
        if predictors is not None:
            save_file(preds_out, str(tmp / PREDICTORS), metadata={"format": "pt"})
        tok = _tokenizer_entry(source)
        for p in source.tokenizer_files:
            shutil.copyfile(p, tmp / p.name)
        for p in source.licence_files:
            shutil.copyfile(p, tmp / p.name)
        for rel, src in (report_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        full_lineage = {**source.lineage, **(lineage or {}), "flashio_version": __version__,
                        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        full_lineage.setdefault("artifact_name", name or out_dir.name)
        card = model_card(full_lineage["artifact_name"], source.model_type, full_lineage, report,
                          [p.name for p in source.licence_files])
        (tmp / MODEL_CARD).write_text(card, encoding="utf-8")
        for p in sorted(tmp.rglob("*")):
            rel = p.relative_to(tmp).as_posix()
            if p.is_file() and rel not in files:
                files[rel] = FileEntry(rel, p.stat().st_size, sha256_file(p))
        manifest = Manifest(
            architecture=source.model_type, model_config=source.config, dtype=dtype,
            activation=arch.FFN.activation, gated=arch.FFN.gated, bundle_layout=layout,
            ffn_layers=tuple(ffn_layers), files=dict(sorted(files.items())),
            predictor_layers=tuple(PredictorLayer(p.rank, p.threshold) for p in predictors)
            if predictors is not None else None,
            tokenizer=tok, lineage=full_lineage, report=report,
            predictors_file=PREDICTORS if predictors is not None else None,
            format_version=(QUANTIZED_VERSION if rq is not None or resident_quant is not None or sketch is not None
                            else GATE_RESIDENT_VERSION if gate_resident else FORMAT_VERSION),
            gate_resident=gate_resident, selection=selection, resident_quant=resident_quant, up_sketch=sketch)
        (tmp / MANIFEST).write_text(manifest.dumps())
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote artifact %s (%d layers, %s)", out_dir, n_layers, dtype)
    return out_dir


def _gptq_groups(mats: dict[str, torch.Tensor], parts: Sequence[str], rq: RowQuant, tdtype: torch.dtype,
                 order: torch.Tensor, h_in: torch.Tensor, h_act: torch.Tensor) -> dict[str, GroupCodes]:
    """Each part of a layer's rows quantized by GPTQ on its calibration matrix, in stored order."""
    out = {}
    for p in parts:
        w = mats[p].to(tdtype).float()  # the values the unquantized artifact would hold
        solve = gptq_neurons if p == "down" else gptq_rows
        out[p] = solve(w, h_act if p == "down" else h_in, bits=rq.bits, group_size=rq.group_size,
                       offsets=rq.offsets, super_size=rq.super_size, embedded=rq.embedded)[order]
    return out


def _gptq_resident(name: str, w: torch.Tensor, h: torch.Tensor, scheme: str, two_level: bool = False) -> GroupCodes:
    """A resident [out, in] matrix quantized by GPTQ on H of its input, laid out as _quantize_resident
    stores `scheme`: int4 in the resident rows' groups, int8 one symmetric scale per output row;
    the token embeddings (a tied head) in their int8 rows' groups, whatever the scheme."""
    if name == EMBEDDING_ROWS:
        q = embedding_row_quant(w.shape[1])
        return gptq_rows(w.float(), h, bits=q.bits, group_size=q.group_size, offsets=False)
    if scheme == "int4":
        q = resident_row_quant(w.shape[1], two_level)
        return gptq_rows(w.float(), h, bits=q.bits, group_size=q.group_size, offsets=q.offsets,
                         super_size=q.super_size)
    return gptq_rows(w.float(), h, bits=8, group_size=w.shape[1], offsets=False)


def _quantize_resident(resident: dict[str, torch.Tensor], scheme: str,
                       groups: dict[str, GroupCodes] | None = None, two_level: bool = False) -> ResidentQuant | None:
    """Replace the resident matrices named by flashio.quant.RESIDENT_QUANTIZED (in place): int8,
    codes plus their per-output-channel scales as a tensor of their own; int4, rows of codes,
    scales and offsets per group (flashio.quant.quantize_resident_rows). groups: matrices already
    quantized (GPTQ, _gptq_resident); the others are rounded to nearest. The record for the manifest."""
    scales, rows = {}, {}
    groups = groups or {}
    for name in sorted(resident):
        t = resident[name]
        if not (RESIDENT_QUANTIZED.search(name) and t.ndim == 2 and t.is_floating_point()):
            continue
        gc = groups.get(name)
        if name == EMBEDDING_ROWS:
            resident[name], rows[name] = quantize_embedding_rows(t, gc)
            continue
        if scheme == "int4":
            resident[name], rows[name] = quantize_resident_rows(t, two_level, gc)
            continue
        scale_name = f"{name.removesuffix('.weight')}.scale"
        if scale_name in resident:
            raise FlashError(f"resident tensor {scale_name!r} exists: cannot hold the scales of {name!r}")
        resident[name], resident[scale_name] = quantize_resident(t, gc)
        scales[name] = scale_name
    if not scales and not rows:
        return None
    return ResidentQuant(scheme, SCALE_DTYPE, scales=scales, rows=rows)


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished, fsynced directory `tmp` to `out_dir` (replacing an old one: moved
    aside first, deleted after the swap), then fsync the parent so the rename is durable."""
    _fsync_dir(tmp)
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    _fsync_dir(out_dir.parent)


def _source_dtype(source: ModelSource) -> str:
    name = str(source.config.get("torch_dtype") or source.config.get("dtype") or "float32")
    name = name.replace("torch.", "")
    return name if name in TORCH_DTYPES else "float32"
