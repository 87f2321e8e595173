"""The one table of dtypes flashio stores and computes in: names as the manifest writes them,
torch dtypes, byte sizes and safetensors codes.

    from flashio.dtypes import TORCH_DTYPES, ITEMSIZE, SAFETENSORS_CODES, torch_dtype
"""

from __future__ import annotations

import torch

from flashio.errors import FlashError

# manifest name -> torch dtype (the dtypes an artifact's weights may be stored or computed in)
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
ITEMSIZE: dict[str, int] = {name: dt.itemsize for name, dt in TORCH_DTYPES.items()}
SAFETENSORS_CODES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# safetensors header dtype code -> bytes per element (every code a header may carry)
SAFETENSORS_ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
# safetensors header dtype code -> torch dtype (the codes a resident tensor may carry)
SAFETENSORS_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """`name` ('float16', 'torch.float16' or a torch dtype) as a torch dtype; FlashError if flashio
    does not store or compute in it."""
    if isinstance(name, torch.dtype):
        if name not in TORCH_DTYPES.values():
            raise FlashError(f"dtype {name} is not one of {', '.join(TORCH_DTYPES)}")
        return name
    key = str(name).removeprefix("torch.")
    if key not in TORCH_DTYPES:
        raise FlashError(f"dtype {name!r} is not one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest's name of a torch dtype ('float16')."""
    return str(torch_dtype(dtype)).removeprefix("torch.")
