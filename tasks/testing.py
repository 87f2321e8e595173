"""Tiny checkpoints, tokenizers and corpora for tests and examples (no downloads).

    files = write_corpus(tmp / "text", n_files=8)
    tok = build_tokenizer(files, tmp / "tok")
    opt_dir = build_tiny_model("opt", tmp / "opt", tok)
    llama_dir = build_tiny_model("llama", tmp / "llama", tok)
    mistral_dir = build_tiny_model("mistral", tmp / "mistral", tok, config={"sliding_window": 8})

Any family of flashio.models works: its `hf_config` gives the transformers config.

The models are random but not degenerate: weights are drawn with a larger spread than
transformers' default initialisation (std 0.02), so that their next-token distributions are
peaked and their FFNs matter. With the default, logits are nearly uniform and any perturbation
flips the arg-max, which would make accuracy checks meaningless.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from flashio.models import get_architecture
from flashio.models.base import ConfigDims

WORDS = ("def", "return", "self", "value", "for", "in", "if", "else", "import", "class", "None", "True",
         "range", "len", "print", "items", "key", "data", "result", "index", "list", "dict", "=", "(", ")",
         ":", ",", "+", "-", "*", "0", "1", "2", "x", "y", "n", "i", "name", "path", "open", "with", "as")


def write_corpus(out_dir: Path, *, n_files: int = 8, lines_per_file: int = 60, seed: int = 0,
                 suffix: str = ".txt") -> list[Path]:
    """Deterministic code-like text files: a small vocabulary with local structure (a Markov
    chain over WORDS), so that a tokenizer and a model have something to learn."""
    rng = random.Random(seed)
    nxt = {w: rng.sample(WORDS, 5) for w in WORDS}
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for f in range(n_files):
        lines = []
        w = rng.choice(WORDS)
        for _ in range(lines_per_file):
            words = []
            for _ in range(rng.randint(4, 12)):
                w = rng.choice(nxt[w]) if rng.random() < 0.85 else rng.choice(WORDS)
                words.append(w)
            lines.append("    " * rng.randint(0, 2) + " ".join(words))
        path = out_dir / f"doc{f:03d}{suffix}"
        path.write_text("\n".join(lines) + "\n")
        files.append(path)
    return files


def build_tokenizer(files: list[Path], out_dir: Path, *, vocab_size: int = 256):
    """A byte-level BPE trained on `files` whose encodings start with bos (like OPT's), saved with
    PreTrainedTokenizerFast.save_pretrained. Returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]  # OPT convention: </s> is bos and eos
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(f) for f in files], trainer)
    bos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(family: str, out_dir: Path, tokenizer, *, hidden: int = 64, ffn: int = 256,
                     layers: int = 2, heads: int = 4, kv_heads: int = 2, max_positions: int = 128,
                     init_std: float = 0.08, relu_shift: float = 1.0, seed: int = 0,
                     dtype: str = "float32", fit_files: list[Path] | None = None, fit_steps: int = 0,
                     config: dict[str, Any] | None = None) -> Path:
    """A random checkpoint of `family` (a flashio.models model_type: OPT with ReLU, Llama with
    SwiGLU and grouped-query attention, ...) plus its tokenizer, written with save_pretrained
    (safetensors) into `out_dir`. `config` overrides keys of the family's Hugging Face config
    (e.g. {"sliding_window": 8}).

    relu_shift: in ReLU families, the biases of the FFN's first projection (OPT's fc1) are
    lowered by this many standard deviations of the pre-activation, so that about
    P(z > relu_shift) of the neurons fire (16% for 1.0) as in a trained ReLU model, instead of
    the half of a random one.
    fit_steps: when > 0, the random model is then fitted for that many steps to `fit_files`
    (next-token loss), so that its predictions are peaked like a real model's: a purely random
    model's top-2 logits are nearly tied and any perturbation flips its arg-max."""
    import torch
    import transformers

    arch = get_architecture(family)
    torch.manual_seed(seed)
    dims = ConfigDims(vocab_size=len(tokenizer), dim=hidden, ffn_dim=ffn, n_layers=layers, n_heads=heads,
                      n_kv_heads=kv_heads, max_positions=max_positions)
    c = {**arch.hf_config(dims, init_std=init_std), "bos_token_id": tokenizer.bos_token_id,
         "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **(config or {})}
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**c))
    # ReLU FFNs: the first projection's bias sets how many neurons fire
    shifted = {f"{p}.bias" for p in arch.FFN.hook_paths(layers)} if arch.FFN.exactly_sparse else set()
    with torch.no_grad():  # biases and norms random too, so no neuron is trivially symmetric
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, init_std)
            if name in shifted:
                p.sub_(relu_shift * init_std * hidden**0.5)  # pre-activation std ~ init_std * sqrt(D)
    if fit_steps:
        _fit(model, tokenizer, fit_files or [], fit_steps, seq_len=min(64, max_positions), seed=seed)
    model = model.to(getattr(torch, dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def _fit(model, tokenizer, files: list[Path], steps: int, *, seq_len: int, seed: int) -> None:
    import torch

    if not files:
        raise ValueError("fit_steps > 0 needs fit_files")
    ids = torch.tensor([i for f in files for i in tokenizer(f.read_text())["input_ids"]])
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(ids)} tokens are fewer than one sequence of {seq_len}")
    windows = ids[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)  # [n, L+1]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (16,), generator=gen)]
        loss = model(input_ids=batch[:, :-1], labels=batch[:, 1:].clone()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
