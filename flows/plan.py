"""A conversion plan: the models to keep converted, in a YAML file (example: infra/plan.example.yaml).

    plan = load_plan("infra/plan.example.yaml")
    for entry in plan.enabled_models():
        config = plan.convert_config(entry)      # a validated ConvertConfig, skip_published=True

```yaml
registry: s3://flashio-models/models   # where every model is published (a model may override it)
work_dir: /var/lib/flashio/work        # stage outputs: keep it between runs (interrupted runs resume)
runner: threads                        # or dask (a local cluster of `workers`, or dask_address)
schedule: {cron: "0 3 * * *", timezone: UTC}   # for `flashio schedule` (infra/prefect.yaml has its own)
defaults: {samples: 512, seq_len: 256}         # ConvertConfig options of every model
models:
  - name: opt-125m                      # the registry name
    source: facebook/opt-125m           # hub id or checkpoint directory
    revision: latest                    # or a branch, tag or commit; latest = the default branch's head
    calibration: allenai/c4:en:validation
    options: {order: coactivation}      # this model's ConvertConfig options (win over defaults)
    aliases: [prod]
```

Paths starting with ./ or ../ (source, calibration, heldout, registry, work_dir) are relative to
the plan file, so a plan and its data can move together. Every model's options are validated
when the plan is loaded: a typo fails at once, naming the model and the field, not at 3 a.m.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flows.config import DEFAULT_REGISTRY, ConvertConfig

LATEST = "latest"
# ConvertConfig fields a plan sets itself (per model or for the whole plan), never in `options`.
PLAN_FIELDS = frozenset({"model", "revision", "calibration", "heldout", "name", "registry", "registry_endpoint",
                         "aliases", "work_dir", "workers", "dask", "dask_address", "skip_published", "version"})
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a registry model name (flashio.registry.refs)


class ScheduleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cron: str = Field(description="cron expression, e.g. '0 3 * * *' (every day at 03:00)")
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _check(self) -> ScheduleSpec:
        from prefect.client.schemas.schedules import CronSchedule

        CronSchedule(cron=self.cron, timezone=self.timezone)  # raises ValueError on a bad expression
        return self


class PlannedModel(BaseModel):
    """One model to keep converted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="registry model name")
    source: str = Field(min_length=1, description="hub id or checkpoint directory")
    revision: str = Field(LATEST, min_length=1, description="branch, tag or commit; 'latest' tracks the "
                                                              "default branch")
    calibration: str | None = Field(None, description="calibration spec (default: ConvertConfig's)")
    heldout: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="ConvertConfig options")
    registry: str | None = None
    registry_endpoint: str | None = None
    aliases: tuple[str, ...] = ()
    enabled: bool = True

    @field_validator("options")
    @classmethod
    def _no_plan_fields(cls, options: dict[str, Any]) -> dict[str, Any]:
        return _check_options(options)


class ConversionPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    registry: str = DEFAULT_REGISTRY
    registry_endpoint: str | None = None
    work_dir: Path | None = Field(None, description="stage outputs (default: ConvertConfig's)")
    runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = Field(None, description="an existing Dask scheduler (runner: dask)")
    workers: int = Field(1, ge=1, description="threads, or local Dask workers")
    schedule: ScheduleSpec | None = None
    defaults: dict[str, Any] = Field(default_factory=dict, description="ConvertConfig options of every model")
    models: tuple[PlannedModel, ...] = Field(min_length=1)

    @field_validator("defaults")
    @classmethod
    def _no_plan_fields(cls, options: dict[str, Any]) -> dict[str, Any]:
        return _check_options(options)

    @model_validator(mode="after")
    def _check(self) -> ConversionPlan:
        names = [m.name for m in self.models]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        if self.dask_address and self.runner != "dask":
            raise ValueError("dask_address is set but runner is 'threads'; set runner: dask")
        for m in self.models:  # every model's options, validated now rather than when its run starts
            self.convert_config(m)
        return self

    def enabled_models(self, names: Iterable[str] | None = None) -> list[PlannedModel]:
        """The enabled models, or those named (which must exist; disabled ones included)."""
        if names is None:
            return [m for m in self.models if m.enabled]
        by_name = {m.name: m for m in self.models}
        wanted = list(names)
        if missing := [n for n in wanted if n not in by_name]:
            from tasks.errors import InputError

            raise InputError(f"the plan has no model {', '.join(map(repr, missing))}; its models: "
                             f"{', '.join(by_name)}")
        return [by_name[n] for n in wanted]

    def convert_config(self, model: PlannedModel) -> ConvertConfig:
        """The conversion of `model`: defaults, then its options, then what the plan sets."""
        fields = _merge(self.defaults, model.options)
        fields.update(model=model.source, revision=None if model.revision == LATEST else model.revision,
                      name=model.name, registry=model.registry or self.registry,
                      registry_endpoint=model.registry_endpoint or self.registry_endpoint,
                      aliases=model.aliases, dask=self.runner == "dask", dask_address=self.dask_address,
                      workers=self.workers, skip_published=True)
        if model.calibration is not None:
            fields["calibration"] = model.calibration
        if model.heldout is not None:
            fields["heldout"] = model.heldout
        if self.work_dir is not None:
            fields["work_dir"] = self.work_dir
        try:
            return ConvertConfig(**fields)
        except ValidationError as exc:
            raise ValueError(f"model {model.name!r}: {_problems(exc)}") from None


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    if misplaced := sorted(PLAN_FIELDS & set(options)):
        raise ValueError(f"{', '.join(misplaced)} cannot be set in options: set model fields (source, revision, "
                         "calibration, heldout, registry, aliases) on the model and execution fields (work_dir, "
                         "runner, workers, dask_address) at the top of the plan; versions are timestamps")
    if unknown := sorted(set(options) - set(ConvertConfig.model_fields)):
        raise ValueError(f"unknown options {', '.join(unknown)}; see `flashio convert --help` "
                         "(the options are ConvertConfig fields, with underscores)")
    return options


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` on `base`; nested mappings (budget) are merged one level deep."""
    out = dict(base)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'plan'}: {e['msg']}" for e in exc.errors())


def _relative_to(base: Path, text: str | None) -> str | None:
    if text is None or not text.startswith(("./", "../")):
        return text
    return os.path.normpath(base / text)


def _resolve_paths(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    doc = dict(doc)
    for key in ("registry", "work_dir"):
        if isinstance(doc.get(key), str):
            doc[key] = _relative_to(base, doc[key])
    models = []
    for m in doc.get("models") or []:
        if isinstance(m, Mapping):
            m = dict(m)
            for key in ("source", "calibration", "heldout", "registry"):
                if isinstance(m.get(key), str):
                    m[key] = _relative_to(base, m[key])
        models.append(m)
    if "models" in doc:
        doc["models"] = models
    return doc


def parse_plan(doc: Any, *, base_dir: Path, where: str = "plan") -> ConversionPlan:
    """A plan from its parsed YAML (`base_dir`: what ./ paths are relative to)."""
    from tasks.errors import InputError

    if not isinstance(doc, Mapping):
        raise InputError(f"{where}: a plan is a mapping with a 'models' list; got {type(doc).__name__}")
    try:
        return ConversionPlan.model_validate(_resolve_paths(dict(doc), base_dir))
    except ValidationError as exc:
        raise InputError(f"{where}: {_problems(exc)}") from None


def load_plan(path: str | Path) -> ConversionPlan:
    """Read and validate a plan file; raises InputError naming the file and the field."""
    import yaml

    from tasks.errors import InputError

    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read the plan {p}: {exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"plan {p} is not valid YAML: {exc}") from None
    return parse_plan(doc, base_dir=p.resolve().parent, where=f"plan {p}")
