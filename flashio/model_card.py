"""The artifact's README.md model card and the source's licence files that travel with it.

    card = render_model_card(name="opt-stdlib-flash", base_model="facebook/opt-125m",
                             license=source_license(source_dir), family="opt", report=summary)
    for f in licence_files(source_dir): copy f into the artifact

Llama's and Gemma's licences require their notice to travel with every copy, so the source's
LICENSE / NOTICE / USE_POLICY files are copied verbatim; the card's Hugging Face front matter
names the base model, the licence and the tags (flashio among them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# names a model repository keeps its licence terms under (Llama: LICENSE + USE_POLICY.md; Gemma: LICENSE/NOTICE;
# packaged GGUFs: GEMMA_TERMS.html and the upstream model card README.upstream.md beside NOTICE.md)
LICENCE_NAMES = re.compile(r"^((licen[cs]e|notice|use_policy|copying)(\.(txt|md))?|[\w.-]*terms[\w.-]*\.(txt|md|html)"
                           r"|readme\.upstream\.md)$", re.IGNORECASE)


def licence_files(source_dir: str | Path) -> list[Path]:
    """The licence and notice files at the top of a source checkpoint, sorted by name."""
    d = Path(source_dir)
    return sorted((p for p in d.iterdir() if p.is_file() and LICENCE_NAMES.match(p.name)), key=lambda p: p.name)


def source_license(source_dir: str | Path) -> str | None:
    """The `license:` of the source README's front matter (e.g. "llama3.2", "gemma", "apache-2.0")."""
    readme = Path(source_dir) / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.DOTALL)
    if not m:
        return None
    for line in m.group(1).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip():
            return value.strip().strip("'\"")
    return None


def render_model_card(*, name: str, base_model: str | None, license: str | None, family: str,
                      report: Mapping[str, Any] | None = None, tags: Sequence[str] = (),
                      licence_file_names: Sequence[str] = ()) -> str:
    """README.md text: front matter (base_model, license, tags incl. flashio), the report's figures,
    how to run the artifact, and where its licence terms are."""
    all_tags = list(dict.fromkeys(["flashio", "llm-in-a-flash", family, *tags]))
    front = ["---"]
    if base_model:
        front.append(f"base_model: {json.dumps(base_model)}")
    front.append(f"license: {json.dumps(license or 'other')}")
    front.append("library_name: flashio")
    front.append("tags:")
    front.extend(f"- {json.dumps(t)}" for t in all_tags)
    front.append("---")
    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"a {family} model"
    body = [f"# {name}", "",
            f"A flash-ready artifact of {source} for flashio, after \"LLM in a flash\" (Alizadeh et al., ACL 2024): "
            "the FFN weights stay on flash and only the neurons predicted active are read.", ""]
    if report:
        body += ["## Accuracy and sparsity", "", "| figure | value |", "| --- | --- |"]
        body += [f"| {k} | {_fmt(v)} |" for k, v in report.items() if not isinstance(v, (Mapping, list))]
        body.append("")
    body += ["## Run it", "", "```sh", "pip install flashio", f"flashio chat {name}",
             f"flashio run {name} --prompt 'Hello'", f"flashio serve {name} --port 8000   # OpenAI-compatible",
             "```", "", "```python", "import flashio", f'with flashio.open("{name}") as model:',
             '    print(model.generate("Hello", max_new_tokens=32).text)', "```", ""]
    body += ["## Licence", ""]
    if licence_file_names:
        body.append(f"This artifact is a derivative of {base_model or 'its source model'} and is distributed under "
                    f"the same terms ({license or 'see the files'}): {', '.join(licence_file_names)}, copied from the "
                    "source, travel with it.")
    else:
        body.append(f"Licence of the source model: {license or 'not stated by the source'}.")
    return "\n".join(front) + "\n\n" + "\n".join(body) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")
