"""The one dtype table: names users and manifests write, the torch dtypes they mean, safetensors' codes, and what
this CPU computes natively. A bottom module (only `errors` below it)."""

from __future__ import annotations

import torch

from deltafleet.errors import DeltafleetError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def parse_dtype(name: str, field: str = "dtype") -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' -> the torch dtype; anything else is an error naming `field`."""
    if name not in DTYPES:
        raise DeltafleetError(f"{field}={name!r}: must be one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (oneDNN's own test, as torch's test-suite uses)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
