"""Content keys for task caching, and the directories the stages write into.

    @task(cache_key_fn=stage_cache("activations", __name__))
    def activations_task(source, calib, ..., work_dir):
        return run_stage("activations", [__name__], lambda out: collect_shard(..., out_dir=out))

Every pipeline @task is cached on a content key: the sha256 of its parameters (paths *together
with* the content hashes of what they point to, and the options) and of the source code of the
modules that implement it, so that a changed algorithm never returns a stale result. Two layers
use the key:
- the stage directory `<work_dir>/<stage>/<key[:16]>/`: outputs, then the result as JSON (+
  safetensors; see tasks.resultfile: no pickle, only known types are constructed), then a
  completion marker, written last. `run_stage` returns the stored result of a complete directory
  without recomputing (this survives a fresh PREFECT_HOME); a result that cannot be read back
  (damaged, tampered with) is logged and the stage runs again. A task run with Prefect's
  `refresh_cache` (`flashio convert --force`) recomputes and rewrites its directory;
- Prefect's own cache: `stage_cache` answers the key plus the work directory's identity (a random
  id created with it), so a deleted work directory invalidates every cached result; and it
  answers None ("run it") when a stage directory recorded as complete (in the work directory's
  ledger) is missing or damaged. A cached result never points at missing files.

The work directory may be shared (a Kubernetes volume): nothing read from it runs code. Prefect's
own result records are another matter: Prefect reads each record with the serializer the record
names (pickle by default), so its result storage (PREFECT_HOME/storage of the process that runs
the task) must stay private to that process and never be put on the shared work volume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import shutil
import typing
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from tasks.errors import StageResultError
from tasks.resultfile import RESULT_FILE, read_result, write_result

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_complete.json"
WORK_ID_FILE = ".flashio-work-id"
LEDGER_DIR = ".flashio-done"
KEY_CHARS = 16  # of the hex key in directory names: 64 bits, plenty for one work directory


def canonical(obj: Any) -> Any:
    """`obj` as plain JSON values with a stable order: dataclasses and pydantic models become
    dicts, paths strings, tuples and sets lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "model_dump") and callable(obj.model_dump):  # pydantic v2 model
        return canonical(obj.model_dump(mode="json"))
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Enum):
        return canonical(obj.value)
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (set, frozenset)):
        return sorted(canonical(v) for v in obj)
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot build a content key from a {type(obj).__name__}: pass paths and hashes, "
                    "not objects (Prefect would pickle and hash them too)")


def sha256_json(obj: Any) -> str:
    text = json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def module_digest(module_name: str) -> str:
    """sha256 of a module's source file: part of every key, so edited code re-runs its stage."""
    module = importlib.import_module(module_name)
    path = getattr(module, "__file__", None)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else module_name


def content_key(stage: str, params: Mapping[str, Any], modules: Iterable[str]) -> str:
    return sha256_json({"stage": stage, "params": params,
                        "code": {m: module_digest(m) for m in sorted(modules)}})


def stage_dir(work_dir: str | Path, stage: str, key: str) -> Path:
    return Path(work_dir).expanduser().resolve() / stage / key[:KEY_CHARS]


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file()


def start_stage(directory: Path) -> Path:
    """An empty directory for a stage's outputs (a previous, incomplete attempt is removed)."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


def work_id(work_dir: str | Path) -> str:
    """The work directory's identity: a random id written when it is first used."""
    root = Path(work_dir).expanduser().resolve()
    path = root / WORK_ID_FILE
    if not path.is_file():
        import uuid

        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{WORK_ID_FILE}.{uuid.uuid4().hex}"
        tmp.write_text(uuid.uuid4().hex)
        try:
            os.link(tmp, path)  # first writer wins; others read its id
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def _ledger_entry(directory: Path) -> Path:
    # <work_dir>/<stage>/<key> -> <work_dir>/.flashio-done/<stage>-<key>
    return directory.parent.parent / LEDGER_DIR / f"{directory.parent.name}-{directory.name}"


def finish_stage(directory: Path, result: Any = None) -> None:
    """Store a stage's result and mark its directory complete (last, after every output file)."""
    if result is not None:
        write_result(directory, result)
    try:
        summary = canonical(result)
    except TypeError:
        summary = repr(result)
    (directory / COMPLETE_MARKER).write_text(json.dumps(summary, indent=1, default=str))
    entry = _ledger_entry(directory)
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.touch()


def load_stage(directory: Path, expected: Any = Any) -> Any:
    """The stored result of a complete stage directory, checked against the type `expected`, or
    None (not complete, no result, or a result that cannot be read back safely: logged)."""
    if not is_complete(directory) or not (directory / RESULT_FILE).is_file():
        return None
    try:
        return read_result(directory, expected)
    except StageResultError as exc:
        log.warning("%s; running the stage again", exc)
        return None


def run_stage(stage: str, modules: Iterable[str], compute: Callable[[Path], Any], *,
              refresh: bool | None = None) -> Any:
    """Inside a @task body: the stored result of this run's stage directory if it is complete,
    else compute(out_dir) into a fresh directory, stored and marked complete. `refresh` (default:
    the task run's Prefect `refresh_cache`) recomputes even a complete directory. The stored
    result is read back as the type the task's function declares it returns."""
    out = task_stage_dir(stage, *modules)
    return reuse_or_compute(out, compute, expected=task_return_type(),
                            refresh=task_refresh_cache() if refresh is None else refresh)


def reuse_or_compute(out: Path, compute: Callable[[Path], Any], *, expected: Any = Any,
                     refresh: bool = False) -> Any:
    """The stored result of the stage directory `out` (of type `expected`) when it is complete
    and `refresh` is off; else compute(out) into the emptied directory, stored and marked complete."""
    if refresh:
        log.info("%s: recomputing %s (cache refresh)", out.parent.name, out)
    elif (found := load_stage(out, expected)) is not None:
        log.info("%s: reusing %s", out.parent.name, out)
        return found
    start_stage(out)
    result = compute(out)
    finish_stage(out, result)
    return result


def stage_cache(stage: str, *modules: str, work_dir_param: str = "work_dir") -> Callable[[Any, dict], str | None]:
    """A Prefect `cache_key_fn` for a task whose parameters include `work_dir_param`: the content
    key of its parameters and the work directory's id; None when the stage directory was
    completed once and is now missing or damaged."""
    mods = (*modules, __name__)

    def key_fn(_context: Any, parameters: dict[str, Any]) -> str | None:
        key = content_key(stage, parameters, mods)
        directory = stage_dir(parameters[work_dir_param], stage, key)
        if _ledger_entry(directory).exists() and not is_complete(directory):
            return None
        return f"flashio-{stage}-{key}-{work_id(parameters[work_dir_param])}"

    return key_fn


def task_stage_dir(stage: str, *modules: str, work_dir_param: str = "work_dir") -> Path:
    """Inside a @task body: the directory `stage_cache` checks for this run's parameters."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is None:
        raise RuntimeError("task_stage_dir() must be called inside a Prefect task run")
    params = dict(ctx.parameters)
    key = content_key(stage, params, (*modules, __name__))
    return stage_dir(params[work_dir_param], stage, key)


def task_refresh_cache() -> bool:
    """Inside a @task body: whether this task runs with Prefect's refresh_cache (the task's
    option, else the PREFECT_TASKS_REFRESH_CACHE setting), as Prefect itself decides it."""
    from prefect.context import TaskRunContext
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE

    ctx = TaskRunContext.get()
    option = getattr(ctx.task, "refresh_cache", None) if ctx is not None else None
    return bool(option if option is not None else PREFECT_TASKS_REFRESH_CACHE.value())


def task_return_type() -> Any:
    """Inside a @task body: the type the task's function declares it returns."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    fn = getattr(getattr(ctx, "task", None), "fn", None)
    return Any if fn is None else declared_return_type(fn)


def declared_return_type(fn: Callable) -> Any:
    """`fn`'s return annotation, resolved (Any when it has none) in the namespace of the module
    that defines it: a function shipped to a Dask worker by value carries only the globals its
    code uses, not the names its (string) annotations mention."""
    try:
        module = importlib.import_module(fn.__module__)
        return typing.get_type_hints(fn, globalns=vars(module)).get("return", Any)
    except (NameError, TypeError, ImportError) as exc:
        raise StageResultError(f"cannot resolve the annotations of {fn.__qualname__} ({exc}): a stage task must "
                               "declare a return type its module defines, so that its stored result can be "
                               "checked") from None
