"""The part layout and the checks that decide whether an unfinished S3 multipart upload is resumed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from flashio.errors import RegistryError
from flashio.registry.backend import UploadedPart
from flashio.registry.s3_multipart import (
    MAX_PARTS,
    composite_etag,
    content_problem,
    layout_problem,
    part_size_for,
    plan_parts,
)

MiB = 1024 * 1024


def test_plan_covers_the_blob_with_equal_parts_and_a_shorter_last_one():
    plan = plan_parts(12 * MiB + 123, 5 * MiB)
    assert [(p.number, p.start, p.end) for p in plan] == [(1, 0, 5 * MiB), (2, 5 * MiB, 10 * MiB),
                                                          (3, 10 * MiB, 12 * MiB + 123)]
    assert [p.size_bytes for p in plan_parts(10 * MiB, 5 * MiB)] == [5 * MiB, 5 * MiB]


def test_part_size_doubles_to_stay_within_10000_parts():
    assert part_size_for(9 * 1024**3, 16 * MiB) == 16 * MiB  # a 7B model's FFN file: 576 parts
    assert part_size_for(MAX_PARTS * 16 * MiB, 16 * MiB) == 16 * MiB
    assert part_size_for(MAX_PARTS * 16 * MiB + 1, 16 * MiB) == 32 * MiB
    assert len(plan_parts(200 * 1024**3, part_size_for(200 * 1024**3, 5 * MiB))) <= MAX_PARTS
    with pytest.raises(RegistryError, match="too large for one S3 object"):
        part_size_for(MAX_PARTS * 5 * 1024**3 + 1, 16 * MiB)


def test_layout_problem_names_the_part_that_does_not_fit():
    plan = plan_parts(12 * MiB + 123, 5 * MiB)

    def part(n: int, size: int) -> UploadedPart:
        return UploadedPart(number=n, size_bytes=size, etag="0" * 32, modified_s=0.0)

    assert layout_problem([], plan) is None
    assert layout_problem([part(1, 5 * MiB), part(3, 2 * MiB + 123)], plan) is None  # gaps are fine
    assert "part 1 has 6291456 bytes" in layout_problem([part(1, 6 * MiB)], plan)
    assert "part 3 has 5242880 bytes" in layout_problem([part(3, 5 * MiB)], plan)
    assert "it has part 4" in layout_problem([part(4, 5 * MiB)], plan)


def test_content_problem_compares_etags_with_the_md5_of_the_local_ranges(tmp_path: Path):
    data = os.urandom(11 * MiB)
    path = tmp_path / "blob"
    path.write_bytes(data)
    plan = plan_parts(len(data), 5 * MiB)
    parts = [UploadedPart(p.number, p.size_bytes, hashlib.md5(data[p.start:p.end]).hexdigest(), 0.0) for p in plan]
    assert content_problem(path, parts, plan, concurrency=2) is None
    tampered = [*parts[:1], UploadedPart(2, 5 * MiB, "f" * 32, 0.0)]
    assert "1 of its 2 parts do not match the local bytes (part 2: ETag ffff" in content_problem(path, tampered, plan, 2)


def test_composite_etag_is_the_md5_of_the_part_md5s():
    md5s = [hashlib.md5(b"a").digest(), hashlib.md5(b"b").digest()]
    assert composite_etag(md5s) == hashlib.md5(md5s[0] + md5s[1]).hexdigest() + "-2"
