"""A real DRAM limit for a benchmark child: a cgroup v1 memory cgroup.

    ok, why = memory_cgroup_support()
    with MemoryCgroup("flashio-bench-naive", limit_bytes=7 << 30) as cg:
        proc = subprocess.Popen([..., "--cgroup", str(cg.path)])   # the child joins it first thing
        proc.wait()
        cg.usage()   # {'max_usage_bytes': ..., 'failcnt': ..., 'oom_kills': ...}

The cgroup is created under the memory cgroup of the calling process (so the child stays inside
whatever limits apply to its parent) and is removed on exit. Page cache is charged to it, as the
kernel does for cgroup v1: a configuration that reads through the page cache (mmap) pays for it.
cgroup v2 has no memory controller on the target machine class; where v1 is missing the benchmark
says so and falls back to the runtime's own `dram_budget`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from flashio.errors import FlashError

log = logging.getLogger(__name__)

CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


def _own_cgroup(root: Path) -> Path:
    """The memory cgroup directory of this process (root when it cannot tell)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                path = root / rel.lstrip("/")
                if path.is_dir():
                    return path
    except (OSError, ValueError):
        pass
    return root


def memory_cgroup_support(root: Path = CGROUP_V1_MEMORY) -> tuple[bool, str]:
    """(available, reason): whether a v1 memory cgroup can be created here, and why not."""
    if not (root / "memory.limit_in_bytes").exists() and not (root / "cgroup.procs").exists():
        return False, f"no cgroup v1 memory controller at {root}"
    parent = _own_cgroup(root)
    if not (parent / "memory.limit_in_bytes").exists():
        return False, f"{parent} has no memory.limit_in_bytes (not a v1 memory cgroup)"
    if not os.access(parent, os.W_OK):
        return False, f"{parent} is not writable (creating a memory cgroup needs root)"
    return True, f"cgroup v1 memory controller under {parent}"


class MemoryCgroup:
    """A v1 memory cgroup with `memory.limit_in_bytes` set; removed by close()."""

    def __init__(self, name: str, limit_bytes: int, *, root: Path = CGROUP_V1_MEMORY):
        ok, why = memory_cgroup_support(root)
        if not ok:
            raise FlashError(f"cannot create a memory cgroup: {why}")
        self.path = _own_cgroup(root) / f"{name}-{os.getpid()}"
        self.limit_bytes = int(limit_bytes)
        try:
            self.path.mkdir()
        except FileExistsError:  # left behind by a crashed run of this pid: reuse it
            pass
        except OSError as exc:
            raise FlashError(f"cannot create memory cgroup {self.path}: {exc.strerror}") from None
        try:
            self._write("memory.limit_in_bytes", self.limit_bytes)
        except BaseException:
            self.close()
            raise
        try:  # a child that joins after starting brings its pages along (some kernels refuse)
            (self.path / "memory.move_charge_at_immigrate").write_text("3\n")
        except OSError:
            log.debug("memory.move_charge_at_immigrate refused: charges before the join stay outside")

    def _write(self, name: str, value: int) -> None:
        try:
            (self.path / name).write_text(f"{value}\n")
        except OSError as exc:
            raise FlashError(f"cannot write {value} to {self.path / name}: {exc.strerror}") from None

    def _read_int(self, name: str) -> int:
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return -1

    def usage(self) -> dict[str, int]:
        """Peak usage (anon + page cache), hits of the limit and OOM kills so far."""
        oom_kills = 0
        try:
            for line in (self.path / "memory.oom_control").read_text().splitlines():
                key, _, val = line.partition(" ")
                if key == "oom_kill":
                    oom_kills = int(val)
        except (OSError, ValueError):
            pass
        return {"limit_bytes": self.limit_bytes, "max_usage_bytes": self._read_int("memory.max_usage_in_bytes"),
                "failcnt": self._read_int("memory.failcnt"), "oom_kills": oom_kills}

    def close(self) -> None:
        """Remove the cgroup; its processes must have exited (stragglers go to the parent)."""
        if not self.path.exists():
            return
        try:
            left = [p for p in (self.path / "cgroup.procs").read_text().split() if p]
        except OSError:
            left = []
        for pid in left:  # a child that outlived us: hand it back to the parent cgroup
            try:
                (self.path.parent / "cgroup.procs").write_text(f"{pid}\n")
            except OSError:
                log.warning("could not move pid %s out of %s", pid, self.path)
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)  # the kernel frees the last charges asynchronously
        log.warning("could not remove memory cgroup %s; remove it with `rmdir %s`", self.path, self.path)

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def join(cgroup_path: str | os.PathLike) -> None:
    """Move the calling process into the cgroup (a benchmark child, before it allocates)."""
    try:
        (Path(cgroup_path) / "cgroup.procs").write_text(f"{os.getpid()}\n")
    except OSError as exc:
        raise FlashError(f"cannot join memory cgroup {cgroup_path}: {exc.strerror}") from None
