"""The artifact's model card (Hugging Face front matter, figures, how to run) and licence files."""

from __future__ import annotations

import json

from flashio.model_card import licence_files, render_model_card, source_license


def _front_matter(card: str) -> dict:
    head = card.split("---\n")[1]
    out: dict = {}
    key = None
    for line in head.splitlines():
        if line.startswith("- "):
            out.setdefault(key, []).append(json.loads(line[2:]))
        else:
            key, _, value = line.partition(":")
            value = value.strip()
            if value:
                out[key] = json.loads(value) if value.startswith('"') else value
    return out


def test_card_front_matter_figures_and_run_instructions(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text("---\nlicense: llama3.2\nlanguage:\n- en\n---\n# Llama\n")
    for n in ("LICENSE.txt", "USE_POLICY.md", "NOTICE", "config.json", "README.md"):
        if n != "README.md":
            (src / n).write_text(n)
    files = licence_files(src)
    assert [f.name for f in files] == ["LICENSE.txt", "NOTICE", "USE_POLICY.md"]
    assert source_license(src) == "llama3.2"
    card = render_model_card(name="llama-1b-flash", base_model="meta-llama/Llama-3.2-1B-Instruct",
                             license=source_license(src), family="llama",
                             report={"perplexity_dense": 12.345678, "perplexity_sparse": 12.9, "ffn_sparsity": 0.81,
                                     "per_layer": [0.8, 0.82]},
                             licence_file_names=[f.name for f in files])
    fm = _front_matter(card)
    assert fm["base_model"] == "meta-llama/Llama-3.2-1B-Instruct" and fm["license"] == "llama3.2"
    assert fm["tags"][:3] == ["flashio", "llm-in-a-flash", "llama"] and fm["library_name"] == "flashio"
    assert "| perplexity_dense | 12.35 |" in card and "| ffn_sparsity | 0.81 |" in card and "per_layer" not in card
    assert "flashio chat llama-1b-flash" in card and "flashio serve llama-1b-flash" in card
    assert "LICENSE.txt, NOTICE, USE_POLICY.md" in card


def test_card_without_a_source_licence_or_base_model(tmp_path):
    assert source_license(tmp_path) is None and licence_files(tmp_path) == []
    card = render_model_card(name="demo", base_model=None, license=None, family="opt")
    fm = _front_matter(card)
    assert fm["license"] == "other" and "base_model" not in fm
    assert "not stated by the source" in card and "a opt model" in card
