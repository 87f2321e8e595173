"""GGUF as a conversion source (tasks/gguf.py): a tiny Llama written here with gguf's GGUFWriter the
way llama.cpp's converter writes it (q/k rows permuted, F32 norms, F16 and Q8_0 matrices, a
byte-level BPE tokenizer and a chat template in the metadata) becomes a Hugging Face directory
whose logits equal transformers' own `from_pretrained(gguf_file=)`; split parts give the same
directory; an architecture flashio does not import is refused with the supported list."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers' gguf_file= loading needs it

import numpy as np  # noqa: E402

import flashio  # noqa: E402
from flashio.errors import UnsupportedArchitectureError  # noqa: E402
from flashio.format import write_artifact  # noqa: E402
from tasks.gguf import gguf_checkpoint, gguf_pieces, read_header, write_hf_checkpoint  # noqa: E402
from tasks.source import inspect_source  # noqa: E402
from tasks.testing import build_tiny_model, build_tokenizer, write_corpus  # noqa: E402

PROMPT = [1, 17, 101, 55, 9, 120, 33, 78, 12, 5, 99, 64]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
HEADS, KV_HEADS = 4, 2
Q8 = "blk.0.ffn_down.weight"  # the quantized tensor (rows of 128 = 4 blocks of 32)
LLAMA_CPP = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight", "lm_head.weight": "output.weight"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf_model, tok, *, arch: str = "llama") -> None:
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_license("apache-2.0")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_scores([0.0] * len(vocab))
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t, _ in vocab])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(True)
    w.add_chat_template(TEMPLATE)
    for name, t in hf_model.state_dict().items():
        name = name.removeprefix("model.")
        layer = ""
        if name.startswith("layers."):
            _, i, name = name.split(".", 2)
            layer = f"blk.{i}."
        a = t.detach().float().numpy()
        if name == "self_attn.q_proj.weight":
            a = _permute(a, HEADS)
        elif name == "self_attn.k_proj.weight":
            a = _permute(a, KV_HEADS)
        gname = layer + LLAMA_CPP[name]
        if gname == Q8:
            w.add_tensor(gname, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:  # norms F32 as llama.cpp writes them, matrices F16
            w.add_tensor(gname, a if a.ndim == 1 else a.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(directory holding tiny.gguf and a LICENSE, the original transformers model, its tokenizer)."""
    root = tmp_path_factory.mktemp("gguf")
    tok = build_tokenizer(write_corpus(root / "text", n_files=2, lines_per_file=20), root / "tok", vocab_size=160)
    ckpt = build_tiny_model("llama", root / "ckpt", tok, hidden=64, ffn=128, layers=2, heads=HEADS,
                            kv_heads=KV_HEADS, max_positions=64)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    src = root / "src"
    src.mkdir()
    write_gguf(src / "tiny.gguf", hf, tok)
    (src / "LICENSE").write_text("Apache-2.0\n")
    return src, hf, tok


def logits(model, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def test_hf_directory_matches_transformers_gguf_loading(tiny_gguf, tmp_path):
    src, original, tok = tiny_gguf
    header = read_header(src / "tiny.gguf")
    assert {t.ggml_type for t in header.tensors} == {0, 1, 8}  # F32, F16, Q8_0
    hf_dir = write_hf_checkpoint(src / "tiny.gguf", tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["model_type"], config["torch_dtype"], config["rms_norm_eps"]) == ("llama", "float32", 1e-6)
    assert not config["tie_word_embeddings"] and config["num_key_value_heads"] == KV_HEADS
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(src), gguf_file="tiny.gguf",
                                                               dtype=torch.float32).eval()
    assert (logits(ours) - logits(theirs)).abs().max().item() <= 1e-5
    # the weights are the original ones up to F16 rounding and one Q8_0 matrix: the q/k permutation is undone
    assert (logits(ours) - logits(original)).abs().max().item() <= 0.02
    q = ours.model.layers[1].self_attn.q_proj.weight
    assert (q - original.model.layers[1].self_attn.q_proj.weight).abs().max() <= 1e-3
    # tokenizer and chat template as transformers builds them for gguf_file=
    ours_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    theirs_tok = transformers.AutoTokenizer.from_pretrained(str(src), gguf_file="tiny.gguf")
    text = "def value(self):\n    return  self.items[0]"
    assert ours_tok(text)["input_ids"] == theirs_tok(text)["input_ids"]
    assert ours_tok(text)["input_ids"][1:] == tok(text)["input_ids"][1:]  # the original vocabulary and merges
    assert ours_tok.chat_template == TEMPLATE
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert (hf_dir / "LICENSE").read_text() == "Apache-2.0\n"
    assert "license: apache-2.0" in (hf_dir / "README.md").read_text()


def test_flashio_runs_the_converted_checkpoint(tiny_gguf, tmp_path):
    src, _, _ = tiny_gguf
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(src), gguf_file="tiny.gguf",
                                                               dtype=torch.float32).eval()
    hf_dir = gguf_checkpoint(src / "tiny.gguf", cache_dir=tmp_path / "cache")
    assert gguf_checkpoint(src / "tiny.gguf", cache_dir=tmp_path / "cache") == hf_dir  # cached
    art = write_artifact(hf_dir, tmp_path / "art", dtype="float32")
    assert (art / "LICENSE").is_file()
    with flashio.open(art, mode="dense") as model:
        assert (model.forward(PROMPT) - logits(theirs)).abs().max().item() <= 1e-4


def test_split_parts_give_the_same_checkpoint(tiny_gguf, tmp_path):
    src, _, _ = tiny_gguf
    data = (src / "tiny.gguf").read_bytes()
    parts = tmp_path / "parts"
    parts.mkdir()
    cut = [0, 1000, len(data) // 2, len(data)]  # the first part holds only part of the header
    for k in range(3):
        (parts / f"tiny.gguf.part{k:02d}").write_bytes(data[cut[k] : cut[k + 1]])
    (parts / "NOTICE.md").write_text("notice\n")
    assert [p.name for p in gguf_pieces(parts)] == ["tiny.gguf.part00", "tiny.gguf.part01", "tiny.gguf.part02"]
    whole = gguf_checkpoint(src / "tiny.gguf", cache_dir=tmp_path / "cache")
    split = gguf_checkpoint(parts, cache_dir=tmp_path / "cache2")
    assert (split / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert (split / "config.json").read_text() == (whole / "config.json").read_text()
    assert (split / "NOTICE.md").is_file()
    # the pipeline's first step takes the directory of parts (and names the model after the file)
    os.environ["FLASHIO_GGUF_CACHE"] = str(tmp_path / "cache2")
    try:
        src_model = inspect_source(str(parts / "tiny.gguf.part00"), hash_files=False)
    finally:
        del os.environ["FLASHIO_GGUF_CACHE"]
    assert (src_model.model_type, src_model.path, src_model.name) == ("llama", split, "tiny")
    (parts / "tiny.gguf.part01").unlink()
    with pytest.raises(Exception, match="numbered \\[0, 2\\]: a part is missing"):
        gguf_pieces(parts)


def test_an_unsupported_architecture_is_refused(tiny_gguf, tmp_path):
    _, original, tok = tiny_gguf
    write_gguf(tmp_path / "other.gguf", original, tok, arch="falcon")
    with pytest.raises(UnsupportedArchitectureError,
                       match="GGUF architecture 'falcon' is not supported; supported: gemma3, llama, qwen2"):
        gguf_checkpoint(tmp_path / "other.gguf", cache_dir=tmp_path / "cache")
    with pytest.raises(UnsupportedArchitectureError, match="'falcon'"):
        inspect_source(str(tmp_path / "other.gguf"), hash_files=False)


@pytest.mark.parametrize("source,name", [("/m/gemma-3-270m-q4_k_m.gguf", "gemma-3-270m-q4_k_m"),
                                         ("/m/Model.Q8_0.GGUF", "Model.Q8_0"),
                                         ("/m/model.gguf.part01", "model"), ("/m/dir-with-gguf/", "dir-with-gguf"),
                                         ("org/Some Model", "Some-Model")])
def test_the_registry_name_of_a_gguf_source_drops_its_extension(source, name):
    from flows.config import ConvertConfig
    from flows.convert import model_name

    assert model_name(ConvertConfig(model=source)) == name
    assert model_name(ConvertConfig(model=source, name="mine")) == "mine"
