"""Generation through FlashModel: the artifact's generation_config.json (a Llama 3 style list of
eos ids), the options of stream/generate, the old keyword call, and what every artifact carries
(model card, licence files)."""

from __future__ import annotations

import json
import shutil

import pytest

import flashio
from flashio.format import Artifact, write_artifact
from flashio.generation import GenerationConfigError

PROMPT = [1, 17, 42, 99, 5]


@pytest.fixture(scope="module")
def llama_greedy(llama_artifact):
    with flashio.open(llama_artifact, mode="dense") as model:
        return model.generate(PROMPT, max_new_tokens=12, stop_at_eos=False).token_ids


def _with_generation_config(tiny_llama, tmp_path, gen: dict):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llama[1], ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    return write_artifact(ckpt, tmp_path / "art")


def test_a_list_of_eos_ids_stops_at_the_second_one(tiny_llama, llama_greedy, tmp_path):
    # Llama 3 ends a turn with <|eot_id|> as well as <|end_of_text|>: eos_token_id is a list
    k = next(i for i, t in enumerate(llama_greedy) if i >= 3 and t not in llama_greedy[:i] and t != 2)
    unused = next(t for t in range(300, 320) if t not in llama_greedy)
    art = _with_generation_config(tiny_llama, tmp_path, {"bos_token_id": 1, "eos_token_id": [unused, llama_greedy[k]]})
    assert (art / "generation_config.json").is_file()
    with flashio.open(art, mode="dense") as model:
        assert model.generation_defaults.eos_token_ids == {unused, llama_greedy[k], 2}  # + config.json's
        gen = model.generate(PROMPT, max_new_tokens=12)
        assert gen.token_ids == llama_greedy[: k + 1] and gen.finish_reason == "stop"
        toks = list(model.stream(PROMPT, max_new_tokens=12))
        assert [t.token_id for t in toks] == llama_greedy[: k + 1] and toks[-1].finish_reason == "stop"
        # stop_at_eos=False (the old keyword) generates through it
        assert model.generate(PROMPT, max_new_tokens=12, stop_at_eos=False).token_ids == llama_greedy


def test_defaults_come_from_generation_config(tiny_llama, tmp_path):
    art = _with_generation_config(tiny_llama, tmp_path, {"eos_token_id": 2, "do_sample": True, "temperature": 0.6,
                                                         "top_p": 0.9, "max_new_tokens": 7})
    with flashio.open(art, mode="dense") as model:
        d = model.generation_defaults
        assert (d.temperature, d.top_p, d.top_k, d.max_new_tokens) == (0.6, 0.9, 50, 7)
        a = model.generate(PROMPT, seed=5, stop_at_eos=False)
        assert len(a.token_ids) == 7 and a.finish_reason == "length"
        assert model.generate(PROMPT, seed=5, stop_at_eos=False).token_ids == a.token_ids  # seeded sampling repeats
        assert model.generate(PROMPT, temperature=0.0, max_new_tokens=3).token_ids == \
            model.generate(PROMPT, config=d.updated(temperature=0.0, max_new_tokens=3)).token_ids


def test_the_old_keyword_call_still_works(opt_artifact):
    with flashio.open(opt_artifact, mode="dense") as model:
        gen = model.generate("def add(a, b):", max_new_tokens=16, temperature=0.0, top_p=1.0, seed=None,
                             stop_at_eos=True)
        assert 1 <= len(gen.token_ids) <= 16
        # the text is the streamed pieces joined, and equals decoding the ids at once
        assert gen.text == model.codec.decode(gen.token_ids)
        positional = model.generate("def add(a, b):", 16, temperature=0.0)
        assert positional.token_ids == gen.token_ids
        with pytest.raises(GenerationConfigError, match=r"top_p=1\.5"):
            model.generate("def add", top_p=1.5)
        with pytest.raises(GenerationConfigError, match="unknown generation options"):
            model.generate("def add", nucleus=0.5)


def test_stop_strings_and_options(demo_chat_artifact):
    with flashio.open(demo_chat_artifact, mode="dense") as model:
        full = model.generate("def read_lines(path):", max_new_tokens=30, stop_at_eos=False)
        at = next(i for i in range(4, len(full.text) - 3) if full.text[i:i + 3] not in full.text[:i + 2])
        cut = full.text[at:at + 3]  # first seen at `at`, and likely across token boundaries
        stopped = model.generate("def read_lines(path):", max_new_tokens=30, stop_at_eos=False, stop=[cut])
        assert stopped.text == full.text[:at] and stopped.finish_reason == "stop"
        assert len(stopped.token_ids) < len(full.token_ids)
        penalised = model.generate("def read_lines(path):", max_new_tokens=30, stop_at_eos=False,
                                   repetition_penalty=5.0)
        assert len(set(penalised.token_ids)) > len(set(full.token_ids))


def test_every_artifact_has_a_model_card_and_the_licence_files(demo_chat_artifact, tmp_path):
    art = Artifact(demo_chat_artifact, verify=True)  # README.md and LICENSE are in the checked file table
    assert {"README.md", "LICENSE", "chat_template.jinja", "generation_config.json"} <= set(art.manifest.files)
    card = (demo_chat_artifact / "README.md").read_text()
    assert card.startswith("---\n") and '- "flashio"' in card and "# opt-stdlib-chat" in card
    # the demo is a local directory, not a hub model, and states no licence: the card claims neither
    assert "base_model" not in card.split("---")[1] and 'license: "other"' in card
    assert "LICENSE, copied from the source" in card
    assert (demo_chat_artifact / "LICENSE").read_text() == "Demo licence text: travels with every copy.\n"


def test_finalize_renders_the_card_with_the_report(opt_artifact, tmp_path):
    from flashio.format import finalize_artifact

    out = finalize_artifact(opt_artifact, tmp_path / "final",
                            report={"summary": {"perplexity_dense": 12.5, "perplexity_sparse": 12.75}})
    card = (out / "README.md").read_text()
    assert "| perplexity_sparse | 12.75 |" in card and "# art" in card
    assert "perplexity_sparse" not in (opt_artifact / "README.md").read_text()  # the source is not touched
    Artifact(out, verify=True)
