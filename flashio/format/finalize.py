"""Derive a final artifact from a written one: same weights, a manifest with more lineage and a
report. The weight files are hard-linked (copied only across file systems), so finishing a 7B
artifact costs a manifest, not 13 GB of writes.

    finalize_artifact("work/candidate", "work/final", lineage={...}, report={...},
                      report_files={"report/sweep.png": Path("sweep.png")})
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from flashio.errors import FlashError
from flashio.format.manifest import MANIFEST, FileEntry, check_relative_name
from flashio.format.reader import Artifact
from flashio.format.writer import MODEL_CARD, model_card, move_into_place
from flashio.hashing import sha256_file
from flashio.model_card import LICENCE_NAMES


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def finalize_artifact(src: str | Path, out_dir: str | Path, *, lineage: dict[str, Any] | None = None,
                      report: dict[str, Any] | None = None, report_files: dict[str, Path] | None = None,
                      overwrite: bool = False) -> Path:
    """Write `out_dir`: the artifact at `src` plus lineage (merged) and a report (replaced)."""
    art = Artifact(src)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FlashError(f"{out_dir} already exists; choose another directory or pass overwrite=True")
    m = art.manifest
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        files = dict(m.files)
        for name in m.files:
            _link_or_copy(art.file(name), tmp / name)
        for rel, path in (report_files or {}).items():
            check_relative_name(rel, "report file", where="finalize_artifact")
            if rel == MANIFEST or (rel in m.files and not rel.startswith("report/")):
                raise FlashError(f"report file {rel!r} would replace a weight or manifest file")
            (tmp / rel).unlink(missing_ok=True)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp / rel)
            files[rel] = FileEntry(rel, (tmp / rel).stat().st_size, sha256_file(tmp / rel))
        new_lineage, new_report = {**m.lineage, **(lineage or {})}, report if report is not None else m.report
        if MODEL_CARD in m.files:  # the card shows the report and lineage: rendered again (not through the link)
            (tmp / MODEL_CARD).unlink()
            licences = [n for n in m.files if "/" not in n and LICENCE_NAMES.match(n)]
            (tmp / MODEL_CARD).write_text(model_card(new_lineage.get("artifact_name", out_dir.name), m.architecture,
                                                     new_lineage, new_report, licences), encoding="utf-8")
            files[MODEL_CARD] = FileEntry(MODEL_CARD, (tmp / MODEL_CARD).stat().st_size, sha256_file(tmp / MODEL_CARD))
        new = dataclasses.replace(m, lineage=new_lineage, report=new_report, files=dict(sorted(files.items())))
        (tmp / MANIFEST).write_text(new.dumps())
        with open(tmp / MANIFEST, "rb") as fh:
            os.fsync(fh.fileno())
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    Artifact(out_dir)  # the result must open
    return out_dir
