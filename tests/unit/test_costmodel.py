"""The flash cost model: interpolation of a device profile, and the choices the runtime makes."""

from __future__ import annotations

import numpy as np
import pytest

import flashio
from flashio.costmodel import (
    PROFILE_ENV,
    CostModel,
    DeviceProfile,
    ThroughputPoint,
    default_profile,
    default_profile_path,
    find_profile,
    find_profile_path,
)
from flashio.errors import FormatError


def iops_bound_profile() -> DeviceProfile:
    """A device that does 50 k reads/s up to 64 KiB, then 3.2 GB/s: small reads are IOPS-bound."""
    pts = []
    for c in (4096, 16384, 65536, 262144):
        for t in (1, 4, 16):
            per_read_s = max(1 / 50_000, c / 3.2e9) * (16 / t if t < 16 else 1)
            pts.append(ThroughputPoint(c, t, c / per_read_s / 1e6))
    return DeviceProfile(random=tuple(pts), sequential_mbps=3200.0, device="test")


def bandwidth_bound_profile() -> DeviceProfile:
    """Every read costs exactly size / 1 GB/s: gaps never pay."""
    pts = [ThroughputPoint(c, t, 1000.0) for c in (4096, 16384, 65536) for t in (1, 16)]
    return DeviceProfile(random=tuple(pts), sequential_mbps=1000.0, device="test")


def test_measured_points_are_reproduced_exactly():
    p = iops_bound_profile()
    cm = CostModel(p)
    for pt in p.random:
        assert cm.throughput_mbps(pt.chunk_bytes, pt.threads) == pytest.approx(pt.mbps, rel=1e-9)


def test_read_time_adds_reads_and_limits_concurrency_to_their_number():
    cm = CostModel(iops_bound_profile())
    one = cm.read_time_s([16384], threads=16)  # one read cannot use 16 threads
    assert one == pytest.approx(16 / 50_000)
    many = cm.read_time_s(np.full(1000, 16384), threads=16)
    assert many == pytest.approx(1000 / 50_000)
    assert cm.read_time_s([], 16) == 0.0
    # between measured chunk sizes the time of a read is linear in its size
    mid = cm.read_time_s(np.full(100, (16384 + 65536) // 2), 16)
    assert cm.read_time_s(np.full(100, 16384), 16) <= mid <= cm.read_time_s(np.full(100, 65536), 16)
    # beyond the largest measured chunk, time scales with size
    assert cm.read_time_s([1 << 20] * 16, 16) == pytest.approx(4 * cm.read_time_s([1 << 18] * 16, 16))


def test_thread_choice_and_gap_choice():
    cm = CostModel(iops_bound_profile())
    assert cm.best_threads(16384) == 16
    # two 16 KiB reads cost 2/50k s; one read of up to 64 KiB costs 1/50k: a gap of 2 rows pays
    assert cm.best_max_gap(16384, 16) >= 2
    bw = CostModel(bandwidth_bound_profile())
    assert bw.best_max_gap(16384, 16) == 0
    assert bw.best_threads(16384) == 1  # no gain from more threads


def test_default_profile_is_sane():
    cm = CostModel()
    assert not cm.measured and cm.profile.source == "default"
    # README's profile of the developers' machine class (flashio's reader): 16 KiB 191 MB/s on 1
    # thread, 426 on 16, 502 on 32; 64 KiB 916 on 16
    assert 170 < cm.throughput_mbps(16384, 1) < 210
    assert 380 < cm.throughput_mbps(16384, 16) < 470
    assert 450 < cm.throughput_mbps(16384, 32) < 550
    assert 820 < cm.throughput_mbps(65536, 16) < 1100
    assert cm.throughput_mbps(1 << 20, 64) <= 2000
    # and the choices that profile led to: 32 threads, gap reads of up to 1 row at 16 KiB
    assert (cm.best_threads(16384), cm.best_max_gap(16384, 32)) == (32, 1)
    assert default_profile() == default_profile()


def test_profile_round_trip_and_errors(tmp_path):
    p = iops_bound_profile()
    path = p.save(tmp_path / "p.json")
    assert DeviceProfile.load(path) == p
    path.write_text('{"format_version": 99}')
    with pytest.raises(FormatError, match="format_version"):
        DeviceProfile.load(path)
    with pytest.raises(flashio.FlashError, match="bench device"):
        DeviceProfile.load(tmp_path / "missing.json")
    with pytest.raises(FormatError, match="positive"):
        DeviceProfile(random=(ThroughputPoint(4096, 1, 0.0),), sequential_mbps=1.0)


def test_runtime_uses_the_profile_for_threads_and_gap(opt_artifact, tmp_path, monkeypatch):
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no installed profile
    builtin = CostModel()
    with flashio.open(opt_artifact, mode="oracle") as model:  # no profile: the built-in model's choice
        assert not model.plan.cost_model.measured
        assert model.plan.threads == builtin.best_threads(512)
        assert model.plan.max_gap == builtin.best_max_gap(512, model.plan.threads)
        assert model.reader.max_gap == model.plan.max_gap
    path = iops_bound_profile().save(tmp_path / "dev.json")
    monkeypatch.setenv(PROFILE_ENV, str(path))
    with flashio.open(opt_artifact, mode="oracle") as model:
        cm = CostModel(iops_bound_profile())
        assert model.plan.threads == cm.best_threads(512)
        assert model.plan.max_gap == cm.best_max_gap(512, model.plan.threads) > 0
        model.forward([2, 17, 101, 55], token_by_token=True)
        s = model.stats[-1]
        assert s.io_predicted_ms > 0 and s.io_busy_ms >= s.io_ms >= 0
    with flashio.open(opt_artifact, mode="oracle", threads=3, max_gap=1) as model:  # explicit wins
        assert (model.plan.threads, model.plan.max_gap) == (3, 1)


def test_installed_profile_is_found_and_the_environment_wins(opt_artifact, tmp_path, monkeypatch):
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert default_profile_path() == tmp_path / "config" / "flashio" / "device-profile.json"
    assert find_profile_path() is None and find_profile() is None  # nothing installed
    iops_bound_profile().save(default_profile_path())
    assert find_profile_path() == default_profile_path()
    with flashio.open(opt_artifact, mode="oracle") as model:  # no flags: the installed profile
        assert model.plan.cost_model.profile == iops_bound_profile()
        cm = CostModel(iops_bound_profile())
        assert (model.plan.threads, model.plan.max_gap) == (cm.best_threads(512),
                                                            cm.best_max_gap(512, cm.best_threads(512)))
    other = bandwidth_bound_profile().save(tmp_path / "other.json")
    monkeypatch.setenv(PROFILE_ENV, str(other))
    assert find_profile() == bandwidth_bound_profile()  # $FLASHIO_DEVICE_PROFILE wins
    with flashio.open(opt_artifact, mode="oracle", device_profile=iops_bound_profile()) as model:
        assert model.plan.cost_model.profile == iops_bound_profile()  # and an explicit one over both
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(flashio.FlashError, match=r"missing\.json"):  # a named file that is not there
        find_profile()
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_profile_path() == tmp_path / "home" / ".config" / "flashio" / "device-profile.json"
