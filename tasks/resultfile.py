"""A stage's result on disk as JSON (+ safetensors for tensors), read back without running code.

    write_result(out, LayerPredictor(...))              # out/_result.json (+ out/_result.safetensors)
    lp = read_result(out, LayerPredictor)               # the same value, or StageResultError

The work directory can sit on a volume that other machines write (a shared Kubernetes volume):
whoever can write a result file there must not be able to run code in the workers that read it,
so there is no pickle here. A result is plain JSON in which four tags stand for what JSON lacks:
`{"__dataclass__": "tasks.predictors.LayerPredictor", "fields": {...}}`, `{"__path__": "..."}`,
`{"__tuple__": [...]}`, `{"__dict__": [[key, value], ...]}`, and `{"__tensor__": name}` for a
tensor stored in the safetensors file beside it (checked against the sha256 the JSON records).

Reading constructs a dataclass only when (1) its qualified name is in `STAGE_RESULT_TYPES`, the
allowlist of the pipeline's stage results, and (2) it is reachable from the type the caller
expects (the stage task's return annotation), which gives the class object: names from the file
are looked up in that table, never imported. Every field must be present and match its
annotation, and the whole value must match the expected type. Anything else is a
StageResultError, on which the stage runs again (tasks.caching).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

from flashio.errors import FlashError
from flashio.hashing import sha256_file
from tasks.errors import StageResultError

RESULT_FILE = "_result.json"
TENSOR_FILE = "_result.safetensors"
FORMAT = "flashio-stage-result"
VERSION = 1

# The stage results of the pipeline (tasks/*): the only classes a result file may construct.
STAGE_RESULT_TYPES = frozenset({
    "tasks.calibration.CalibrationData",
    "tasks.activations.ShardResult",
    "tasks.activations.ActivationStats",
    "tasks.predictors.LayerPredictor",
    "tasks.bundling.BundledArtifact",
    "tasks.evaluation.Evaluation",
    "tasks.evaluation.Comparison",
    "tasks.evaluation.HeldoutSample",
    "tasks.scoring.QuantizationLoss",
    "tasks.allocation.LayerErrors",
    "tasks.frontier.OracleFrontier",
    "tasks.frontier.FrontierPoint",
    "tasks.windowing.WindowPlan",
    "tasks.windowing.WindowPoint",
    "tasks.windowing.WindowChoice",
})


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# -- writing ---------------------------------------------------------------------------------------

def write_result(directory: Path, result: Any, *, allowed: frozenset[str] = STAGE_RESULT_TYPES) -> Path:
    """`result` as `directory/_result.json` (tensors in `_result.safetensors`); the JSON file is
    written last, so its presence means the tensors are complete."""
    tensors: dict[str, Any] = {}
    value = _encode(result, tensors, allowed)
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, "value": value, "tensors": None}
    if tensors:
        from tasks.tensorfiles import save_tensors

        save_tensors({k: t.contiguous() for k, t in tensors.items()}, directory / TENSOR_FILE)
        doc["tensors"] = {"file": TENSOR_FILE, "sha256": sha256_file(directory / TENSOR_FILE)}
    path = directory / RESULT_FILE
    path.write_text(json.dumps(doc, indent=1, allow_nan=True))
    return path


def _encode(obj: Any, tensors: dict[str, Any], allowed: frozenset[str]) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if isinstance(obj, PurePath):
        return {"__path__": str(obj)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = qualified_name(type(obj))
        if name not in allowed:
            raise StageResultError(f"a stage returned a {name}, which is not a known stage result type: add it to "
                                   "tasks.resultfile.STAGE_RESULT_TYPES (a dataclass of paths, strings, numbers, "
                                   "tuples, lists, dicts and tensors)")
        return {"__dataclass__": name,
                "fields": {f.name: _encode(getattr(obj, f.name), tensors, allowed)
                           for f in dataclasses.fields(obj) if f.init}}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, allowed) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, allowed) for v in obj]
    if isinstance(obj, Mapping):
        if not all(k is None or isinstance(k, (str, int, float, bool)) for k in obj):
            raise StageResultError("a stage result holds a dict whose keys are not all strings, numbers, bools "
                                   f"or None: {_short(list(obj))}")
        return {"__dict__": [[_encode(k, tensors, allowed), _encode(v, tensors, allowed)] for k, v in obj.items()]}
    torch = sys.modules.get("torch")  # no tensor can exist unless torch was imported
    if torch is not None and isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu()
        return {"__tensor__": name}
    raise StageResultError(f"a stage result holds a {type(obj).__name__}, which a result file cannot store: return "
                           "paths, strings, numbers, tuples, lists, dicts, tensors and stage result dataclasses")


# -- reading ---------------------------------------------------------------------------------------

def read_result(directory: Path, expected: Any = Any, *, allowed: frozenset[str] = STAGE_RESULT_TYPES) -> Any:
    """The result stored in `directory`, checked against the `expected` type. Raises
    StageResultError when the file is missing, damaged, or holds anything else."""
    path = directory / RESULT_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StageResultError(f"{path}: unreadable stage result ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise StageResultError(f"{path}: not a {FORMAT} file of version {VERSION}")
    table = result_types(expected, allowed)
    tensors = _read_tensors(directory, doc.get("tensors"))
    value = _Decoder(table, tensors, path).decode(doc.get("value"))
    if not conforms(value, expected):
        raise StageResultError(f"{path}: holds a {type(value).__name__}, expected {expected!r}")
    return value


def result_types(expected: Any, allowed: frozenset[str] = STAGE_RESULT_TYPES) -> dict[str, type]:
    """Qualified name -> class of the allowed dataclasses reachable from the type `expected`
    (through type arguments and dataclass field annotations): what a result may construct."""
    table: dict[str, type] = {}
    todo = [expected]
    while todo:
        hint = todo.pop()
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            name = qualified_name(hint)
            if name in allowed and name not in table:
                table[name] = hint
                todo.extend(_field_hints(hint).values())
        else:
            todo.extend(a for a in typing.get_args(hint) if a is not Ellipsis)
    return table


def _field_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError) as exc:  # an annotation that names what its module does not define
        raise StageResultError(f"cannot resolve the field types of {qualified_name(cls)}: {exc}") from None


def _read_tensors(directory: Path, entry: Any) -> dict[str, Any]:
    if entry is None:
        return {}
    if not isinstance(entry, dict) or entry.get("file") != TENSOR_FILE or not isinstance(entry.get("sha256"), str):
        raise StageResultError(f"{directory / RESULT_FILE}: bad tensor file entry {entry!r}")
    path = directory / TENSOR_FILE
    if not path.is_file() or sha256_file(path) != entry["sha256"]:
        raise StageResultError(f"{path}: missing, or not the tensors the result was written with (sha256 differs)")
    from safetensors.torch import load_file

    return load_file(str(path))


class _Decoder:
    def __init__(self, table: dict[str, type], tensors: dict[str, Any], path: Path):
        self.table, self.tensors, self.path = table, tensors, path

    def fail(self, what: str) -> StageResultError:
        return StageResultError(f"{self.path}: {what}")

    def decode(self, node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict) or len(node) not in (1, 2):
            raise self.fail(f"unexpected JSON value {_short(node)}")
        if "__dataclass__" in node:
            return self.dataclass(node.get("__dataclass__"), node.get("fields"))
        if len(node) != 1:
            raise self.fail(f"unexpected JSON object {_short(node)}")
        ((tag, body),) = node.items()
        if tag == "__path__" and isinstance(body, str):
            return Path(body)
        if tag == "__tuple__" and isinstance(body, list):
            return tuple(self.decode(v) for v in body)
        if tag == "__dict__" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
            keys = [self.decode(k) for k, _ in body]
            if not all(isinstance(k, (str, int, float, bool, type(None))) for k in keys):
                raise self.fail("a dict key that is not a string, number, bool or null")
            return dict(zip(keys, (self.decode(v) for _, v in body)))
        if tag == "__tensor__" and isinstance(body, str) and body in self.tensors:
            return self.tensors[body]
        raise self.fail(f"unknown or malformed tag {_short(node)}")

    def dataclass(self, name: Any, fields: Any) -> Any:
        cls = self.table.get(name) if isinstance(name, str) else None
        if cls is None:  # never imported by name: only the classes the caller's type names
            raise self.fail(f"refusing to construct {name!r}: not a stage result type this stage returns "
                            f"(known here: {sorted(self.table)})")
        if not isinstance(fields, dict):
            raise self.fail(f"{name}: fields must be a JSON object")
        expected = {f.name for f in dataclasses.fields(cls) if f.init}
        required = {f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        if not set(fields) <= expected or not required <= set(fields):
            raise self.fail(f"{name}: fields {sorted(fields)}, expected {sorted(expected)}")
        values = {k: self.decode(v) for k, v in fields.items()}
        hints = _field_hints(cls)
        for k, v in values.items():
            if not conforms(v, hints[k]):
                raise self.fail(f"{name}.{k}: {_short(v)} is not a {hints[k]!r}")
        try:
            return cls(**values)
        except (TypeError, ValueError, FlashError) as exc:  # the class's own checks (__post_init__)
            raise self.fail(f"{name}: {type(exc).__name__}: {exc}") from None


def conforms(value: Any, hint: Any) -> bool:
    """Whether `value` matches the type annotation `hint` (the forms stage results use)."""
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(conforms(v, a) for v, a in zip(value, args)))
    if origin in (list, Sequence):
        kinds = list if origin is list else (list, tuple)
        return isinstance(value, kinds) and (not args or all(conforms(v, args[0]) for v in value))
    if origin in (dict, Mapping):
        return isinstance(value, dict) and (not args or all(conforms(k, args[0]) and conforms(v, args[1])
                                                            for k, v in value.items()))
    if origin is not None:
        return isinstance(value, origin)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a form stage results do not use (a TypeVar...): nothing to check against


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
