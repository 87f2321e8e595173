"""What a GGUF file means for each architecture flashio imports from it: the Hugging Face config it
stands for, the GGUF -> Hugging Face tensor names, and the transforms llama.cpp's converter applied.

llama.cpp's names (blk.N.attn_q.weight...) are the same across families; what differs:
- llama: q and k rows were permuted for ggml's rotary layout (undone here, as transformers does);
- qwen2: q/k/v biases, no permutation;
- gemma3: norms stored as 1 + weight (Gemma multiplies by 1 + w; undone here), no permutation, and
  the facts llama.cpp hard-codes instead of writing them (5 local layers : 1 global, the local rope
  base, query_pre_attn_scalar, GeGLU) come from transformers' Gemma3TextConfig defaults.
Shapes: GGUF lists dimensions fastest first ([in, out]); these tables see them in torch order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flashio.models import gemma3

GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_ATTN_FFN = {
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
LLAMA_BLOCK = {**_ATTN_FFN, "ffn_norm.weight": "post_attention_layernorm.weight"}
QWEN2_BLOCK = {**LLAMA_BLOCK, **{f"attn_{x}.bias": f"self_attn.{x}_proj.bias" for x in "qkv"}}
GEMMA3_BLOCK = {
    **_ATTN_FFN,
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}


class GGUFMetadataError(ValueError):
    """A key the architecture needs is missing or has an unexpected form (tasks.gguf rewraps it)."""


@dataclass(frozen=True)
class GGUFFamily:
    """One GGUF `general.architecture` as flashio imports it."""

    model_type: str  # the Hugging Face model_type it becomes
    block_names: dict[str, str]  # blk.N.<key> -> model.layers.N.<value>
    config: Callable[[dict, int, bool], dict]  # (metadata, vocab size, tied head) -> config.json fields
    transform: Callable[[str, np.ndarray, dict], np.ndarray]  # (HF name, fp32 tensor, config) -> tensor

    def hf_name(self, gguf_name: str) -> str | None:
        """The Hugging Face name of a GGUF tensor; None for one the HF model does not have."""
        if gguf_name in GLOBAL_NAMES:
            return GLOBAL_NAMES[gguf_name]
        blk, _, rest = gguf_name.partition(".")
        layer, _, leaf = rest.partition(".")
        if blk == "blk" and layer.isdigit() and leaf in self.block_names:
            return f"model.layers.{layer}.{self.block_names[leaf]}"
        return None


def _get(meta: dict, key: str, default=None):
    value = meta.get(key, default)
    if value is None:
        raise GGUFMetadataError(f"metadata key {key!r} is missing")
    if isinstance(value, list):
        raise GGUFMetadataError(f"metadata key {key!r} is a per-layer list; flashio needs one value for all layers")
    return value


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def _llama_like(meta: dict, vocab: int, tied: bool) -> dict:
    """The config fields every llama.cpp decoder writes the same way."""
    a = meta["general.architecture"]
    heads = int(_get(meta, f"{a}.attention.head_count"))
    c = {"vocab_size": vocab, "hidden_size": int(_get(meta, f"{a}.embedding_length")),
         "intermediate_size": int(_get(meta, f"{a}.feed_forward_length")),
         "num_hidden_layers": int(_get(meta, f"{a}.block_count")), "num_attention_heads": heads,
         "num_key_value_heads": int(_get(meta, f"{a}.attention.head_count_kv", heads)),
         "max_position_embeddings": int(_get(meta, f"{a}.context_length")),
         "rms_norm_eps": _f32(_get(meta, f"{a}.attention.layer_norm_rms_epsilon")),
         "rope_theta": _f32(_get(meta, f"{a}.rope.freq_base", 10000.0)), "tie_word_embeddings": tied}
    if f"{a}.attention.key_length" in meta:
        c["head_dim"] = int(meta[f"{a}.attention.key_length"])
    scaling = meta.get(f"{a}.rope.scaling.type", "none")
    if scaling == "linear":
        c["rope_scaling"] = {"rope_type": "linear", "factor": _f32(_get(meta, f"{a}.rope.scaling.factor"))}
    elif scaling != "none":
        raise GGUFMetadataError(f"rope scaling {scaling!r} is not supported (supported: none, linear)")
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            c[f"{name}_token_id"] = int(meta[f"tokenizer.ggml.{key}"])
    return c


def _llama_config(meta: dict, vocab: int, tied: bool) -> dict:
    return {**_llama_like(meta, vocab, tied), "model_type": "llama", "hidden_act": "silu"}


def _qwen2_config(meta: dict, vocab: int, tied: bool) -> dict:
    return {**_llama_like(meta, vocab, tied), "model_type": "qwen2", "hidden_act": "silu",
            "use_sliding_window": False}


def _gemma3_config(meta: dict, vocab: int, tied: bool) -> dict:
    c = _llama_like(meta, vocab, tied)
    head_dim = c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
    global_rope = {"rope_type": "default", "rope_theta": c.pop("rope_theta"), **c.pop("rope_scaling", {})}
    # llama.cpp (src/llama-model.cpp, LLM_ARCH_GEMMA3): queries scaled by 1/sqrt(head_dim), except the
    # 27B (62 layers), scaled by 1/sqrt(hidden / heads) as its HF config says
    big = c["num_hidden_layers"] == 62
    return {**c, "model_type": "gemma3_text", "hidden_activation": gemma3.FFN.activation,
            "query_pre_attn_scalar": c["hidden_size"] // c["num_attention_heads"] if big else head_dim,
            "sliding_window": int(_get(meta, "gemma3.attention.sliding_window")),
            "layer_types": gemma3.default_layer_types(c["num_hidden_layers"]),
            "rope_parameters": {gemma3.FULL: global_rope,
                                gemma3.SLIDING: {"rope_type": "default", "rope_theta": gemma3.LOCAL_ROPE_THETA}},
            "final_logit_softcapping": None, "attn_logit_softcapping": None}


def _unpermute_qk(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutes q/k rows (per head: the two rotary halves interleaved);
    this is its inverse (transformers' LlamaTensorProcessor does the same)."""
    if name.endswith("self_attn.q_proj.weight"):
        heads = config["num_attention_heads"]
    elif name.endswith("self_attn.k_proj.weight"):
        heads = config["num_key_value_heads"]
    else:
        return w
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _keep(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    return w


def _gemma_norms(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """llama.cpp stores Gemma's norm weights as 1 + w (its RMSNorm multiplies by the weight)."""
    return w - np.float32(1.0) if name.endswith("norm.weight") else w


FAMILIES = {
    "llama": GGUFFamily("llama", LLAMA_BLOCK, _llama_config, _unpermute_qk),
    "qwen2": GGUFFamily("qwen2", QWEN2_BLOCK, _qwen2_config, _keep),
    "gemma3": GGUFFamily("gemma3_text", GEMMA3_BLOCK, _gemma3_config, _gemma_norms),
}
