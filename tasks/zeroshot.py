"""Zero-shot multiple choice (ARC, HellaSwag, PIQA formats), scored dense and sparse.

    results = evaluate_zero_shot(artifact, ["arc=allenai/ai2_arc:ARC-Easy:test", "piqa=./piqa.jsonl"])
    results[0]["accuracy_dense"], results[0]["accuracy_sparse"]

A spec is `[name=]data`, where data is anything `tasks.calibration.resolve_spec` accepts (local
.jsonl/.json/.parquet/.csv files, or a hub dataset `name[:config][:split]`). The format is read
from each row's fields:
- ARC: question, choices {text, label}, answerKey
- HellaSwag: ctx (or ctx_a + ctx_b), endings, label
- PIQA: goal, sol1, sol2, label
- generic: context or question, choices (list of strings), label or answer (index)
Each choice is scored by the log-likelihood of its tokens after the context (sum: "accuracy";
per token: "accuracy_norm"), with the runtime in dense mode and in sparse mode (token by token,
as in generation). The first `limit` rows are used, in file order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import flashio
from flashio.config import FlashConfig
from tasks.calibration import iter_rows, resolve_spec
from tasks.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int


def parse_example(row: dict) -> Example:
    """One row of any supported format as an Example; InputError names the fields seen."""
    if "question" in row and isinstance(row.get("choices"), dict) and "answerKey" in row:  # ARC
        labels = list(row["choices"]["label"])
        key = str(row["answerKey"])
        if key not in labels:
            raise InputError(f"ARC row: answerKey {key!r} not among labels {labels}")
        return Example(f"Question: {row['question']}\nAnswer:", tuple(row["choices"]["text"]), labels.index(key))
    if "endings" in row:  # HellaSwag
        ctx = row.get("ctx") or f"{row.get('ctx_a', '')} {row.get('ctx_b', '')}".strip()
        return Example(ctx, tuple(row["endings"]), int(row["label"]))
    if "goal" in row and "sol1" in row:  # PIQA
        return Example(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), int(row["label"]))
    if isinstance(row.get("choices"), list):
        ctx = row.get("context") or row.get("question")
        label = row.get("label", row.get("answer"))
        if ctx is not None and label is not None:
            return Example(str(ctx), tuple(str(c) for c in row["choices"]), int(label))
    raise InputError(f"multiple-choice row with fields {sorted(row)} is in no known format (ARC: question, "
                     "choices, answerKey; HellaSwag: ctx, endings, label; PIQA: goal, sol1, sol2, label; "
                     "generic: context, choices, label)")


def load_examples(spec: str, limit: int) -> tuple[str, list[Example]]:
    name, sep, data = spec.partition("=")
    if not sep:
        name, data = Path(spec).stem if Path(spec).suffix else spec.split(":")[0].split("/")[-1], spec
    examples = []
    for row in iter_rows(resolve_spec(data)):
        examples.append(parse_example(row))
        if len(examples) >= limit:
            break
    if not examples:
        raise InputError(f"zero-shot data {data!r} has no rows")
    return name, examples


def _continuation_ids(codec, context: str, choice: str) -> tuple[list[int], int]:
    """Token ids of context + ' ' + choice, and how many of them are the choice's."""
    ctx = codec.encode(context)
    full = codec.encode(f"{context} {choice.strip()}")
    if full[: len(ctx)] == ctx and len(full) > len(ctx):
        return full, len(full) - len(ctx)
    cont = [i for i in codec.encode(" " + choice.strip()) if i != codec.bos]
    return ctx + cont, len(cont)


def score_choices(model, example: Example, *, token_by_token: bool) -> tuple[list[float], list[int]]:
    """Log-likelihood of each choice given the context, and each choice's token count."""
    lls, lens = [], []
    for choice in example.choices:
        ids, n = _continuation_ids(model.codec, example.context, choice)
        logits = model.forward(ids, token_by_token=token_by_token)  # [L, V]
        lp = F.log_softmax(logits[:-1].float(), -1)
        target = torch.tensor(ids[1:])
        ll = lp[torch.arange(len(target)), target][-n:].sum()
        lls.append(float(ll))
        lens.append(n)
    return lls, lens


def evaluate_zero_shot(artifact: Path, specs: Sequence[str], *, limit: int = 100,
                       config: FlashConfig | None = None) -> list[dict]:
    """Accuracy of dense and sparse on each task; `config` says how the artifact is opened (its
    mode is set to each in turn; default: FlashConfig())."""
    out = []
    config = config or FlashConfig()
    with flashio.open(artifact, config, mode="dense") as dense, flashio.open(artifact, config, mode="sparse") as sparse:
        if dense.codec is None:
            raise InputError(f"{artifact} has no tokenizer: zero-shot tasks need text")
        for spec in specs:
            name, examples = load_examples(spec, limit)
            correct = {"dense": 0, "sparse": 0, "dense_norm": 0, "sparse_norm": 0}
            for ex in examples:
                for mode, model in (("dense", dense), ("sparse", sparse)):
                    lls, lens = score_choices(model, ex, token_by_token=mode == "sparse")
                    correct[mode] += int(max(range(len(lls)), key=lls.__getitem__) == ex.label)
                    norm = [ll / max(n, 1) for ll, n in zip(lls, lens)]
                    correct[f"{mode}_norm"] += int(max(range(len(norm)), key=norm.__getitem__) == ex.label)
            n = len(examples)
            out.append({"task": name, "spec": spec, "examples": n,
                        "accuracy_dense": correct["dense"] / n, "accuracy_sparse": correct["sparse"] / n,
                        "accuracy_norm_dense": correct["dense_norm"] / n,
                        "accuracy_norm_sparse": correct["sparse_norm"] / n})
            log.info("zero-shot %s: accuracy dense %.3f sparse %.3f on %d examples", name,
                     correct["dense"] / n, correct["sparse"] / n, n)
    return out
