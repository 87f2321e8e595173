"""Conversion plans (flows/plan.py), the idempotence key (flows.convert.lineage_key), the
deployments `flashio schedule` builds and the `--runner` / `--skip-published` flags: no Prefect
server, no tensors."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("pydantic")
pytest.importorskip("prefect")

from flows.cli import add_convert_command, build_config, config_fields
from flows.config import ConvertConfig
from flows.plan import ConversionPlan, load_plan, parse_plan
from tasks.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "infra" / "plan.example.yaml"


def plan_of(tmp_path: Path, **doc) -> ConversionPlan:
    doc.setdefault("models", [{"name": "m", "source": "org/m"}])
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_plan(path)


# -- the example plan ------------------------------------------------------------------------

def test_example_plan_loads_and_every_model_validates():
    plan = load_plan(EXAMPLE)
    assert [m.name for m in plan.enabled_models()] == ["opt-stdlib"]
    demo = plan.convert_config(plan.models[0])
    assert Path(demo.model) == ROOT / "tasks" / "demo" / "opt-stdlib" and (Path(demo.model) / "config.json").is_file()
    assert (demo.calibration, demo.registry, demo.aliases, demo.name) == \
        ("stdlib:train", "s3://flashio-models/models", ("prod",), "opt-stdlib")
    assert demo.skip_published and demo.samples == 128 and not demo.dask
    hub = plan.convert_config(plan.models[1])
    assert hub.revision is None and hub.samples == 512 and hub.order == "coactivation"  # latest = default branch
    llama = plan.convert_config(plan.models[2])
    assert llama.revision == "main" and llama.gated_density == 0.4
    assert (llama.budget.max_perplexity_increase, llama.budget.min_top1_agreement) == (0.05, 0.97)  # merged
    assert (plan.schedule.cron, plan.schedule.timezone) == ("0 3 * * *", "UTC")


def test_relative_paths_are_relative_to_the_plan_file(tmp_path):
    plan = plan_of(tmp_path, registry="./reg", work_dir="../work",
                   models=[{"name": "m", "source": "./ckpt", "calibration": "./data/*.jsonl", "heldout": "held.txt",
                            "registry": "s3://b/p"}])
    cfg = plan.convert_config(plan.models[0])
    assert cfg.model == str(tmp_path / "ckpt") and cfg.calibration == str(tmp_path / "data" / "*.jsonl")
    assert cfg.heldout == "held.txt"  # not ./-relative: left as written (a hub dataset or a cwd path)
    assert cfg.registry == "s3://b/p" and cfg.work_dir == tmp_path.parent / "work"
    assert plan.registry == str(tmp_path / "reg")


def test_dask_runner_and_execution_fields_reach_the_config(tmp_path):
    plan = plan_of(tmp_path, runner="dask", dask_address="tcp://sched:8786", workers=4,
                   defaults={"samples": 64, "budget": {"allow_loss": True}})
    cfg = plan.convert_config(plan.models[0])
    assert (cfg.dask, cfg.dask_address, cfg.workers, cfg.samples, cfg.budget.allow_loss) == \
        (True, "tcp://sched:8786", 4, 64, True)


@pytest.mark.parametrize(("doc", "message"), [
    ({"models": [{"name": "m", "source": "x", "options": {"smaples": 3}}]}, "unknown options smaples"),
    ({"models": [{"name": "m", "source": "x", "options": {"version": "1"}}]}, "version cannot be set in options"),
    ({"defaults": {"registry": "/r"}, "models": [{"name": "m", "source": "x"}]}, "registry cannot be set in options"),
    ({"models": [{"name": "m", "source": "x", "options": {"recall": 1.5}}]}, "model 'm': recall"),
    ({"models": [{"name": "m", "source": "x"}, {"name": "m", "source": "y"}]}, "repeated: m"),
    ({"models": [{"name": "a/b", "source": "x"}]}, "models.0.name"),
    ({"models": []}, "models"),
    ({"models": [{"name": "m", "source": "x", "revison": "v1"}]}, "revison"),
    ({"schedule": {"cron": "every night"}, "models": [{"name": "m", "source": "x"}]}, "schedule"),
    ({"dask_address": "tcp://s:8786", "models": [{"name": "m", "source": "x"}]}, "set runner: dask"),
])
def test_bad_plans_fail_at_load_naming_the_problem(tmp_path, doc, message):
    with pytest.raises(InputError, match=message) as err:
        plan_of(tmp_path, **doc)
    assert str(tmp_path / "plan.yaml") in str(err.value)


def test_unreadable_or_malformed_plan_files(tmp_path):
    with pytest.raises(InputError, match="cannot read the plan"):
        load_plan(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("models: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_plan(tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="a plan is a mapping"):
        parse_plan(["not", "a", "mapping"], base_dir=tmp_path)


def test_selecting_models_by_name(tmp_path):
    plan = plan_of(tmp_path, models=[{"name": "a", "source": "x"}, {"name": "b", "source": "y", "enabled": False}])
    assert [m.name for m in plan.enabled_models()] == ["a"]
    assert [m.name for m in plan.enabled_models(["b", "a"])] == ["b", "a"]  # named: disabled ones too
    with pytest.raises(InputError, match="no model 'c'; its models: a, b"):
        plan.enabled_models(["c"])


# -- the idempotence key -------------------------------------------------------------------------

def _source(**kw):
    from tasks.source import SourceModel

    base = dict(ref="org/m", path=Path("/cache/m"), revision="abc", model_type="opt", n_layers=2, dim=8, ffn_dim=32,
                gated=False, max_positions=64, config_dtype="float32",
                files=(("config.json", "1" * 64), ("model.safetensors", "2" * 64)), fingerprint="f" * 64)
    return SourceModel(**{**base, **kw})


def _calib(**kw):
    from tasks.calibration import CalibrationData

    base = dict(path=Path("/work/t.safetensors"), fingerprint="c" * 64, spec="stdlib:train", heldout_spec=None,
                n_sequences=8, n_heldout=2, seq_len=16, seed=0, documents=3, heldout_documents=1)
    return CalibrationData(**{**base, **kw})


def test_lineage_key_covers_content_not_execution():
    from flows.convert import lineage_key

    cfg = ConvertConfig(model="org/m", samples=8)
    key = lineage_key(_source(), _calib(), cfg)
    same = [lineage_key(_source(path=Path("/elsewhere")), _calib(path=Path("/w2/t")), cfg.model_copy(update={
        "dask": True, "workers": 4, "registry": "s3://b/p", "work_dir": Path("/tmp/w"), "skip_published": True,
        "version": "7", "aliases": ("prod",), "prompt": "x"}))]
    changed = [lineage_key(_source(revision="def"), _calib(), cfg),
               lineage_key(_source(files=(("config.json", "1" * 64), ("model.safetensors", "3" * 64))), _calib(), cfg),
               lineage_key(_source(), _calib(fingerprint="d" * 64), cfg),
               lineage_key(_source(), _calib(), cfg.model_copy(update={"recall": 0.95}))]
    assert same == [key] and len({key, *changed}) == 5


def test_plan_and_command_line_conversions_share_lineage(tmp_path):
    """`flashio convert --skip-published` and a scheduled run of the same options find each other."""
    plan = plan_of(tmp_path, registry="/r", defaults={"samples": 64},
                   models=[{"name": "m", "source": "org/m", "calibration": "c4:en", "options": {"recall": 0.98}}])
    from_plan = plan.convert_config(plan.models[0])
    from_cli = build_config(config_fields(parse("org/m", "--calibration", "c4:en", "--samples", "64", "--recall",
                                                "0.98", "--registry", "/r", "--name", "m", "--skip-published",
                                                "--no-sample")))
    assert from_plan.lineage() == from_cli.lineage() and from_cli.skip_published


# -- the command line: --runner, serve -------------------------------------------------------------

def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_convert_command(sub)
    return parser.parse_args(["convert", *argv])


def test_runner_flag():
    from flows.convert import task_runner

    dask = build_config(config_fields(parse("m", "--runner", "dask", "--workers", "2")))
    assert dask.dask and type(task_runner(dask)).__name__ == "DaskTaskRunner"
    remote = build_config(config_fields(parse("m", "--runner", "dask", "--dask-address", "tcp://h:8786")))
    assert task_runner(remote).address == "tcp://h:8786"
    assert type(task_runner(build_config(config_fields(parse("m"))))).__name__ == "ThreadPoolTaskRunner"
    with pytest.raises(InputError, match="--dask-address needs --runner dask"):
        config_fields(parse("m", "--runner", "threads", "--dask-address", "tcp://h:8786"))
    assert "dask" not in dask.lineage() and "skip_published" not in dask.lineage()


def test_serve_builds_the_plan_and_convert_deployments(tmp_path):
    from flows.schedule import build_deployments

    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"schedule": {"cron": "15 2 * * 1", "timezone": "Europe/Paris"},
                                    "models": [{"name": "m", "source": "org/m"}]}))
    convert_dep, plan_dep = build_deployments(str(plan))
    assert (convert_dep.flow_name, convert_dep.name, convert_dep.schedules) == ("flashio-convert", "served", [])
    assert convert_dep.entrypoint == "flows.convert.convert"
    assert (plan_dep.flow_name, plan_dep.name, plan_dep.entrypoint) == \
        ("flashio-convert-plan", "served", "flows.scheduled.convert_plan")
    assert plan_dep.parameters == {"plan": str(plan.resolve())}
    [s] = plan_dep.schedules
    assert (s.schedule.cron, s.schedule.timezone) == ("15 2 * * 1", "Europe/Paris")
    assert plan_dep.concurrency_limit == 1 and plan_dep.concurrency_options.collision_strategy.value == "ENQUEUE"
    [s] = build_deployments(str(plan), cron="0 4 * * *")[1].schedules
    assert (s.schedule.cron, s.schedule.timezone) == ("0 4 * * *", "Europe/Paris")
    assert build_deployments(str(plan), no_schedule=True)[1].schedules == []
    assert [d.name for d in build_deployments(None)] == ["served"]  # no plan: the convert flow only


def test_schedule_is_a_flashio_command(capsys):
    from flashio.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["schedule", "--help"])
    assert exit_.value.code == 0 and "--plan" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "--runner {threads,dask}" in capsys.readouterr().out
