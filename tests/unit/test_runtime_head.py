"""The head (final norm, lm_head, Gemma's logit soft-capping) applied only where logits are needed:
after a token-by-token forward once over all positions, while generating on the last position of
each step. Checked on tiny models of each family against the head run within every step."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import flashio  # noqa: E402
from flashio.format import write_artifact  # noqa: E402
from tasks.testing import build_tiny_model, build_tokenizer, write_corpus  # noqa: E402

PROMPT = [2, 17, 101, 55, 9, 140, 33, 78, 12, 5, 99, 64]
SOFTCAP = 3.0
TIGHT = {"rtol": 1e-5, "atol": 1e-5}  # fp32: one matmul over all rows vs a matrix-vector product per row


@pytest.fixture(scope="module", params=["opt", "llama", "gemma3_text", "qwen2"])
def artifact(request, opt_artifact, llama_artifact, tmp_path_factory):
    """(family, fp32 artifact): OPT and Llama from the shared fixtures, Gemma 3 with soft-capping
    and local/global layers, Qwen 2 with attention biases."""
    if request.param == "opt":
        return "opt", opt_artifact
    if request.param == "llama":
        return "llama", llama_artifact
    root = tmp_path_factory.mktemp(request.param)
    tok = build_tokenizer(write_corpus(root / "text", n_files=2, lines_per_file=20), root / "tok", vocab_size=160)
    config = {"final_logit_softcapping": SOFTCAP, "sliding_window": 4} if request.param == "gemma3_text" else None
    path = build_tiny_model(request.param, root / "ckpt", tok, hidden=64, ffn=192, layers=3, heads=4, kv_heads=2,
                            max_positions=64, config=config)
    return request.param, write_artifact(path, root / "art", dtype="float32")


@pytest.mark.parametrize("mode", ["dense", "oracle"])
def test_deferred_head_equals_the_head_of_each_step(artifact, mode):
    family, art = artifact
    with flashio.open(art, mode=mode, window=3) as model:
        per_step = model.forward(PROMPT, token_by_token=True, head_per_step=True)  # [T, V]
        deferred = model.forward(PROMPT, token_by_token=True)
        assert [s.tokens for s in model.stats] == [1] * len(PROMPT)  # still one step per token
        whole = model.forward(PROMPT)
    assert deferred.shape == per_step.shape == (len(PROMPT), model.args.vocab_size)
    assert deferred.dtype == torch.float32 and per_step.std() > 0.01
    torch.testing.assert_close(deferred, per_step, **TIGHT)
    torch.testing.assert_close(deferred, whole, rtol=1e-4, atol=1e-4)  # a different path through attention
    if family == "gemma3_text":  # the soft-capping is applied after the deferred head too
        assert deferred.abs().max().item() < SOFTCAP


def test_generation_heads_the_last_position_only(artifact):
    _, art = artifact
    with flashio.open(art, mode="dense") as model:
        want = model.forward(PROMPT, token_by_token=True, head_per_step=True)[-1]
        model.reset()
        last = model._next_logits(PROMPT)  # the prefill: one step of the whole prompt
        assert last.shape == want.shape
        torch.testing.assert_close(last, want, rtol=1e-4, atol=1e-4)
        assert model.stats[-1].tokens == len(PROMPT)
        gen = model.generate(PROMPT[:4], max_new_tokens=8, stop_at_eos=False, temperature=0.0)
        # greedy decoding recomputed from scratch: each token is the argmax of the whole sequence's last row
        seq = PROMPT[:4]
        for tok in gen.token_ids:
            assert tok == int(model.forward(seq)[-1].argmax())
            seq = [*seq, tok]
    assert len(gen.token_ids) == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_in_vocabulary_chunks_equals_one_linear(dtype):
    from flashio.models.base import HEAD_CHUNK_ROWS, head_linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(2 * HEAD_CHUNK_ROWS + 77, 48, generator=g).to(dtype)  # two whole chunks and a part
    for t in (1, 7):
        x = torch.randn(t, 48, generator=g).to(dtype)
        got = head_linear(x, w)
        assert got.shape == (t, w.shape[0]) and got.dtype == dtype
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got, torch.nn.functional.linear(x, w), rtol=tol, atol=tol)
