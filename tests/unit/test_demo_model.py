"""The shipped demo checkpoint (tasks/demo/opt-stdlib): loads like a hub OPT, fits the size and
alignment contract, and has learned the standard library's code.

The perplexities are recomputed here, with transformers' own loss, on held-out files: the training
report is only read for the training-token counts behind the unigram baseline.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from tasks.demo import DEMO_CHECKPOINT_DIR, stdlib_text_files

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safe_open = pytest.importorskip("safetensors").safe_open

MAX_CHECKPOINT_BYTES = 10_000_000
SEQ_LEN = 256
N_SEQUENCES = 8


@pytest.fixture(scope="module")
def model():
    model = transformers.AutoModelForCausalLM.from_pretrained(
        DEMO_CHECKPOINT_DIR, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(DEMO_CHECKPOINT_DIR)


@pytest.fixture(scope="module")
def report():
    return json.loads((DEMO_CHECKPOINT_DIR / "training_report.json").read_text())


@pytest.fixture(scope="module")
def heldout_windows(tokenizer):
    """The first SEQ_LEN tokens of each of the first N_SEQUENCES long enough held-out files."""
    windows = []
    for path in stdlib_text_files("heldout"):
        text = path.read_text(encoding="utf-8")
        ids = tokenizer(text, truncation=True, max_length=SEQ_LEN)["input_ids"]
        if len(ids) == SEQ_LEN:
            windows.append(ids)
        if len(windows) == N_SEQUENCES:
            return torch.tensor(windows)  # [N_SEQUENCES, SEQ_LEN]
    raise AssertionError(f"only {len(windows)} held-out files have {SEQ_LEN} tokens")


def test_splits_are_disjoint_and_not_empty():
    train, heldout = stdlib_text_files("train"), stdlib_text_files("heldout")
    assert train and heldout
    assert not set(train) & set(heldout)
    assert len(heldout) < len(train) / 10
    with pytest.raises(ValueError, match="unknown split"):
        stdlib_text_files("validation")


def test_checkpoint_is_a_small_relu_opt(model):
    files = [p for p in DEMO_CHECKPOINT_DIR.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_CHECKPOINT_BYTES
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in files
    }
    config = model.config
    assert config.model_type == "opt"
    assert config.activation_function == "relu"
    assert config.do_layer_norm_before and config.enable_bias and config.tie_word_embeddings
    assert config.word_embed_proj_dim == config.hidden_size
    assert config.ffn_dim == 4 * config.hidden_size
    assert config.max_position_embeddings >= 512
    # A neuron's bundle (its fc1 row and fc2 column) is read with O_DIRECT: whole 512-byte sectors.
    with safe_open(DEMO_CHECKPOINT_DIR / "model.safetensors", framework="pt") as weights:
        fc1 = weights.get_tensor("model.decoder.layers.0.fc1.weight")  # [ffn_dim, hidden]
        fc2 = weights.get_tensor("model.decoder.layers.0.fc2.weight")  # [hidden, ffn_dim]
    assert fc1.shape == fc2.T.shape == (config.ffn_dim, config.hidden_size)
    assert fc1.dtype == fc2.dtype
    assert (fc1[0].nbytes + fc2[:, 0].nbytes) % 512 == 0


def test_tokenizer_starts_with_bos_the_opt_way(tokenizer):
    from tokenizers import Tokenizer

    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("</s>", 2)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 1)
    text = "def fibonacci(n):\n    return n\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    raw = Tokenizer.from_file(str(DEMO_CHECKPOINT_DIR / "tokenizer.json"))
    assert raw.encode(text).ids == ids


def test_heldout_perplexity_is_far_below_unigram_baseline(model, heldout_windows, report):
    with torch.no_grad():
        loss = model(input_ids=heldout_windows, labels=heldout_windows).loss  # shifted inside
    model_perplexity = math.exp(loss.item())

    counts = torch.tensor(report["train_token_counts"], dtype=torch.float64)
    assert len(counts) == model.config.vocab_size
    assert counts.sum() == report["train_tokens"]
    log_probabilities = torch.log((counts + 1) / (counts.sum() + len(counts)))
    targets = heldout_windows[:, 1:].flatten()  # the same tokens the model predicted
    unigram_perplexity = math.exp(-log_probabilities[targets].mean().item())

    assert unigram_perplexity > 100, unigram_perplexity
    # Shipped checkpoint, Python 3.11: about 81 against 1122 on these file openings.
    assert model_perplexity < unigram_perplexity / 5, (model_perplexity, unigram_perplexity)


def test_training_report_perplexity_is_transformers_loss_on_the_same_ids(model, tokenizer):
    """`tasks.demo.train.evaluate` (the training report's held-out perplexity) on consecutive
    windows of seq_len + 1 ids of the held-out token stream equals exp of transformers' loss on
    the same windows; only the windows' number and length differ from the shipped report's."""
    import numpy as np

    from tasks.demo.train import TrainConfig, evaluate, tokenize

    texts = [path.read_text(encoding="utf-8") for path in stdlib_text_files("heldout")[:3]]
    ids = tokenize(tokenizer, texts)  # one stream, bos at each file's start, as in training
    config = TrainConfig(seq_len=64, eval_sequences=5)
    result = evaluate(model, ids, config)
    assert (result["sequences"], result["targets"]) == (5, 5 * 64)
    windows = torch.from_numpy(np.stack([ids[r * 64 : (r + 1) * 64 + 1] for r in range(5)])).long()
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss.item()
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
