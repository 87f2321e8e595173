"""`flashio convert`: options become a validated config; bad input fails before Prefect starts."""

from __future__ import annotations

import argparse
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("pydantic")

from flashio.cli import main
from flows.cli import add_convert_command, build_config, config_fields
from tasks.errors import InputError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_convert_command(sub)
    return parser.parse_args(["convert", *argv])


def test_no_arguments_is_the_demo_with_a_sample():
    config = build_config(config_fields(parse()))
    assert config.model.endswith("opt-stdlib") and config.calibration == "stdlib:train"
    assert config.heldout_spec() == "stdlib:heldout" and config.registry == "./flashio-registry"
    assert config.prompt and config.recall == 0.99 and config.budget.min_top1_agreement == 0.97


def test_flags_map_to_fields(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"samples": 7, "recall": 0.9, "budget": {"min_top1_agreement": 0.5}}))
    args = parse("m", "--config", str(cfg_file), "--recall", "0.995", "--max-ppl-increase", "0.05",
                 "--allow-accuracy-loss", "--sweep", "0.9,0.99", "--zero-shot", "arc=a.jsonl", "--alias", "prod",
                 "--no-sample")
    config = build_config(config_fields(args))
    assert (config.model, config.samples, config.recall, config.sweep) == ("m", 7, 0.995, (0.9, 0.99))
    assert config.budget.max_perplexity_increase == 0.05 and config.budget.allow_loss
    assert config.budget.min_top1_agreement == 0.5  # from the file, not overridden
    assert config.zero_shot == ("arc=a.jsonl",) and config.aliases == ("prod",) and config.prompt is None
    assert "work_dir" not in config.lineage() and config.lineage()["recall"] == 0.995


def test_force_recomputes_without_changing_the_lineage():
    forced = build_config(config_fields(parse("m", "--force", "--no-sample")))
    plain = build_config(config_fields(parse("m", "--no-sample")))
    assert forced.force and not plain.force
    assert forced.lineage() == plain.lineage()  # same artifact content: --force only refreshes the caches


def test_refreshed_tasks_ignore_their_cache():
    pytest.importorskip("prefect")
    from flows.convert import refreshed
    from tasks.calibration import calibration_task

    assert refreshed(calibration_task, False) is calibration_task
    forced = refreshed(calibration_task, True)
    assert forced.refresh_cache is True and forced.cache_key_fn is calibration_task.cache_key_fn


def test_invalid_options_are_input_errors():
    with pytest.raises(InputError, match="recall"):
        build_config(config_fields(parse("m", "--recall", "1.5")))
    with pytest.raises(InputError, match="samples"):
        build_config(config_fields(parse("m", "--samples", "1")))


@pytest.fixture
def checkpoint(tmp_path):
    """config + weights + tokenizer files: enough for the pre-flight checks."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "opt", "vocab_size": 16, "hidden_size": 8, "ffn_dim": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 32}))
    save_file({"model.decoder.embed_tokens.weight": torch.zeros(16, 8)}, str(d / "model.safetensors"))
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.mark.parametrize(("argv", "message"), [
    (["/no/such/model"], "model directory '/no/such/model' does not exist"),
    (["{ckpt}", "--calibration", "/no/such/dir/*.txt"], "matches no files"),
    (["{ckpt}", "--calibration", "{ckpt}/config.json", "--heldout", "/no/such.jsonl"], "matches no files"),
])
def test_bad_input_fails_before_any_work(capsys, tmp_path, checkpoint, argv, message):
    work = tmp_path / "work"
    argv = [a.format(ckpt=checkpoint) for a in argv]
    rc = main(["convert", *argv, "--work-dir", str(work), "--registry", str(tmp_path / "reg")])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "reg").exists() and not work.exists()  # nothing ran
