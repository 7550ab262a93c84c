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


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (`/proc/cpuinfo`'s first `flags` line; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware: avx512_bf16 (AMD Zen 4+, Intel Cooper Lake+) or AMX, and
    oneDNN computes bf16 here. `--dtype auto` and training's `precision auto` pick bf16 exactly then.

    oneDNN's own test (`_is_mkldnn_bf16_supported`) also says yes on AVX-512 CPUs without bf16 instructions, where
    it emulates bf16 by widening: that is slower than fp32, so the CPU flags decide. Measured with
    `deltafleet bench peer` (README): on a 2-core AMD EPYC with avx512_bf16, bf16 served both base and mixed-LoRA
    traffic faster than fp32. Without /proc/cpuinfo (not Linux), oneDNN's test alone decides."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    flags = cpu_flags()
    return not flags or any(f in flags for f in BF16_FLAGS)
