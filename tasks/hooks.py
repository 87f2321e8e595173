"""The source model through transformers, and forward hooks on each layer's FFN.

    model = load_model(str(source.path), "float32", source.fingerprint)
    run_hooked(model, source, ids, batch_sequences=8, gate=lambda i: fn_of_layer_i)
    with ffn_hooks(model, source, down=lambda i: pre_hook_of_layer_i):
        logits = model(input_ids=ids, use_cache=False).logits

Per layer two modules are hooked: the one the family declares as its FFN's first projection
(`flashio.models.<family>.FFN.hook_path`: fc1 for ReLU families, gate_proj when gated), whose
input is the FFN input and whose output decides which neurons are active, and the down
projection, whose input is h = act(gate)·up (gated) or act(up). The stages that hook the model
(tasks.activations, tasks.allocation, tasks.frontier) share one loaded model per process and
hold one lock while it runs with their hooks.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator

import torch

from flashio.dtypes import TORCH_DTYPES
from flashio.models import get_architecture
from flashio.models.base import FFNSpec
from tasks.errors import InputError
from tasks.source import SourceModel
from tasks.threads import torch_threads

# hook factories: layer index -> a forward hook (module, inputs, output) or pre-hook (module, inputs)
HookFactory = Callable[[int], Callable]

_MODEL_LOCK = threading.Lock()


def ffn_spec(source: SourceModel) -> FFNSpec:
    """The source family's FFN declaration (inspect_source already checked the family exists)."""
    return get_architecture(source.model_type).FFN


def hooked_modules(model, source: SourceModel) -> list[torch.nn.Module]:
    """Per layer, the transformers module the family declares as its FFN's first projection."""
    paths = ffn_spec(source).hook_paths(source.n_layers)
    try:
        return [model.get_submodule(p) for p in paths]
    except AttributeError as exc:
        raise InputError(f"{source.ref}: the {source.model_type} declaration hooks {paths[0]!r}, which this "
                         f"transformers model ({type(model).__name__}) lacks ({exc}); fix FFN.hook_path in "
                         f"flashio/models for this transformers version") from None


def down_modules(model, source: SourceModel) -> list[torch.nn.Linear]:
    """Per layer, the FFN's down projection: the Linear beside the hooked module (same parent)
    that maps the N neurons back to the model width D; its input is act(gate)·up (gated) or
    act(up). Families name it differently (down_proj, fc2): found by shape, not by name."""
    out = []
    for path, hooked in zip(ffn_spec(source).hook_paths(source.n_layers), hooked_modules(model, source)):
        parent = model.get_submodule(path.rsplit(".", 1)[0])
        downs = [m for m in parent.children() if isinstance(m, torch.nn.Linear) and m is not hooked
                 and m.in_features == source.ffn_dim and m.out_features == source.dim]
        if len(downs) != 1:
            raise InputError(f"{source.ref}: found {len(downs)} Linear modules mapping {source.ffn_dim} -> "
                             f"{source.dim} beside {path!r} (expected the one down projection); this "
                             f"transformers model ({type(model).__name__}) is laid out differently")
        out.append(downs[0])
    return out


ATTENTION_LINEARS = {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj", "out_proj")}


def attention_modules(model, source: SourceModel) -> list[dict[str, torch.nn.Linear]]:
    """Per layer, its attention's projections by flashio name ("q", "k", "v", "o"): the Linear
    children of the layer's `self_attn` (every supported family's name) called q_proj, k_proj,
    v_proj and o_proj or out_proj (OPT). The layer is the `layers.{i}` prefix of its FFN's hook path."""
    out = []
    for i, path in enumerate(ffn_spec(source).hook_paths(source.n_layers)):
        parts = path.split(".")
        at = next((k for k in range(len(parts) - 1) if parts[k] == "layers" and parts[k + 1] == str(i)), None)
        try:
            attn = model.get_submodule(".".join([*parts[: at + 2], "self_attn"])) if at is not None else None
        except AttributeError:
            attn = None
        found = {} if attn is None else {
            key: m for key, names in ATTENTION_LINEARS.items() for name, m in attn.named_children()
            if name in names and isinstance(m, torch.nn.Linear)}
        if len(found) != len(ATTENTION_LINEARS):
            raise InputError(f"{source.ref}: layer {i}'s attention (self_attn beside {path!r}) lacks "
                             f"{sorted(set(ATTENTION_LINEARS) - set(found))} projections in this transformers "
                             f"model ({type(model).__name__})")
        out.append(found)
    return out


def model_lock() -> threading.Lock:
    """The lock every forward pass of the shared source model holds (hooks are per model)."""
    return _MODEL_LOCK


@functools.lru_cache(maxsize=1)
def load_model(path: str, dtype: str, fingerprint: str = ""):
    """The transformers model, loaded once per process (shards of one conversion share it);
    `fingerprint` (the source's file hashes) keeps a rewritten checkpoint from being reused."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype])
    return model.eval()


@contextlib.contextmanager
def ffn_hooks(model, source: SourceModel, *, gate: HookFactory | None = None, down: HookFactory | None = None,
              threads: int | None = None, more: Callable[[], list] | None = None) -> Iterator[None]:
    """Inside the block: the model lock held, inference mode, `threads` torch threads (None: torch's),
    `gate(i)` a forward hook on layer i's hooked module and `down(i)` a forward pre-hook on its down
    projection (either None: not hooked); `more()` registers any other hooks and returns their
    handles. The hooks are removed on the way out."""
    with _MODEL_LOCK, torch.inference_mode(), torch_threads(threads):
        handles = [m.register_forward_hook(gate(i)) for i, m in enumerate(hooked_modules(model, source))] \
            if gate is not None else []
        if down is not None:
            handles += [d.register_forward_pre_hook(down(i)) for i, d in enumerate(down_modules(model, source))]
        if more is not None:
            handles += more()
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def run_hooked(model, source: SourceModel, ids: torch.Tensor, *, batch_sequences: int,
               gate: HookFactory | None = None, down: HookFactory | None = None, threads: int | None = None,
               more: Callable[[], list] | None = None, before_batch: Callable[[torch.Tensor], None] | None = None,
               progress: Callable[[int, int], None] | None = None) -> None:
    """The decoder (not the LM head: its logits are not needed) over `ids` [S, L], `batch_sequences`
    rows at a time, with the hooks of `ffn_hooks`; `before_batch(batch)` before each batch,
    `progress(done, total)` after it."""
    with ffn_hooks(model, source, gate=gate, down=down, threads=threads, more=more):
        for b in range(0, len(ids), batch_sequences):
            batch = ids[b : b + batch_sequences]
            if before_batch is not None:
                before_batch(batch)
            model.base_model(input_ids=batch, use_cache=False)
            if progress:
                progress(min(b + batch_sequences, len(ids)), len(ids))
