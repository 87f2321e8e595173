"""Shared fixtures: tiny random Hugging Face checkpoints (OPT and Llama with grouped-query
attention) saved with save_pretrained, and their flashio artifacts."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The runtime picks up a device profile saved by `flashio bench device` (in $XDG_CONFIG_HOME) or
# named by $FLASHIO_DEVICE_PROFILE: the suite runs with neither, so a developer's own profile
# never changes what the tests read (tests of the lookup set their own).
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="flashio-test-config-")
os.environ.pop("FLASHIO_DEVICE_PROFILE", None)

import pytest
import torch

# The models here are tiny: one intra-op thread is fastest, and it keeps OpenMP's spinning
# threads from fighting the flash reader's threads on a 2-core machine.
torch.set_num_threads(1)

TINY_TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
             "        self.x = x\n        self.y = y\n") * 20


def save_tiny_tokenizer(path, vocab_size: int) -> None:
    """A byte-level BPE trained on a few lines, saved the transformers way."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)


def make_opt(path, *, seed: int = 0, with_tokenizer: bool = True, **overrides):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=320, hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, word_embed_proj_dim=64, bos_token_id=2, eos_token_id=2,
               pad_token_id=1)
    cfg.update(overrides)
    model = OPTForCausalLM(OPTConfig(**cfg)).eval()
    model.save_pretrained(path)
    if with_tokenizer:
        save_tiny_tokenizer(path, cfg["vocab_size"])
    return model


def make_llama(path, *, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory):
    path = tmp_path_factory.mktemp("opt") / "ckpt"
    return make_opt(path), path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "ckpt"
    return make_llama(path), path


@pytest.fixture(scope="session")
def opt_artifact(tiny_opt, tmp_path_factory):
    from flashio.format import write_artifact

    return write_artifact(tiny_opt[1], tmp_path_factory.mktemp("opt-art") / "art")


@pytest.fixture(scope="session")
def llama_artifact(tiny_llama, tmp_path_factory):
    from flashio.format import write_artifact

    return write_artifact(tiny_llama[1], tmp_path_factory.mktemp("llama-art") / "art")


DEMO_CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "tasks", "demo", "opt-stdlib")
# a plain chat template (the demo is a base model of Python code and has none of its own)
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="session")
def demo_chat_artifact(tmp_path_factory):
    """The shipped demo model packed with a chat template and a LICENSE file beside it."""
    import shutil

    from flashio.format import write_artifact

    ckpt = tmp_path_factory.mktemp("demo-ckpt") / "opt-stdlib"
    shutil.copytree(DEMO_CHECKPOINT, ckpt, ignore=shutil.ignore_patterns("training_report.json"))
    (ckpt / "chat_template.jinja").write_text(PLAIN_CHAT_TEMPLATE)
    (ckpt / "LICENSE").write_text("Demo licence text: travels with every copy.\n")
    return write_artifact(ckpt, tmp_path_factory.mktemp("demo-art") / "opt-stdlib-chat")
