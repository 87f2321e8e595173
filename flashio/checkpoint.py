"""Read a Hugging Face checkpoint directory (config.json + safetensors) without transformers.

    ckpt = HFCheckpoint("path/to/opt-125m")
    ckpt.config["model_type"]            # 'opt'
    w = ckpt.get("model.decoder.layers.0.fc1.weight")

Tensors are loaded one at a time through safetensors' lazy reader, so converting a model never
holds more than one layer's FFN in memory at once. Pickled checkpoints (`pytorch_model.bin`) are
refused: loading them would execute code from the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from flashio.errors import FormatError
from flashio.model_card import licence_files

# what the runtime reads besides the weights: text in and out, the chat template, generation defaults
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


class HFCheckpoint:
    """A local Hugging Face checkpoint directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FormatError(f"checkpoint {str(self.path)!r} is not a directory (expected a folder "
                              "with config.json and *.safetensors, as written by save_pretrained)")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FormatError(f"checkpoint {str(self.path)!r} has no config.json")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise FormatError(f"{config_path}: invalid JSON: {exc}") from None
        if "model_type" not in self.config:
            raise FormatError(f"{config_path}: no 'model_type' key, cannot tell the architecture")
        self._files = self._find_weight_files()
        self._where: dict[str, Path] = {}
        for f in self._files:
            with safe_open(f, framework="pt") as sf:
                for key in sf.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                    self._where[key] = f

    def _find_weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({self.path / name for name in weight_map.values()})
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in self.path.glob("*.bin")]
            hint = (f" (found {pickled}: pickled weights are not loaded because that runs code from "
                    "the file; re-save with save_pretrained(..., safe_serialization=True))") if pickled else ""
            raise FormatError(f"checkpoint {str(self.path)!r} has no *.safetensors weights{hint}")
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FormatError(f"checkpoint {str(self.path)!r}: index names missing files {missing}")
        return files

    def keys(self) -> list[str]:
        return sorted(self._where)

    def has(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        try:
            f = self._where[key]
        except KeyError:
            raise FormatError(f"checkpoint {str(self.path)!r} has no tensor {key!r}") from None
        with safe_open(f, framework="pt") as sf:
            return sf.get_tensor(key)

    def prefix_for(self, candidates: tuple[str, ...], probe: str) -> str:
        """The first prefix p in `candidates` for which `p + probe` exists (checkpoints differ:
        'model.decoder.' vs 'decoder.')."""
        for p in candidates:
            if self.has(p + probe):
                return p
        raise FormatError(f"checkpoint {str(self.path)!r}: no tensor named {probe!r} under any of "
                          f"the prefixes {list(candidates)}; is it really a {self.config['model_type']} checkpoint?")

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def licence_files(self) -> list[Path]:
        """The source's LICENSE / NOTICE / USE_POLICY files (they travel with every copy)."""
        return licence_files(self.path)

    def file_paths(self) -> list[Path]:
        return [self.path / "config.json", *self._files]
