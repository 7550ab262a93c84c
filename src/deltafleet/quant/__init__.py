"""Low-bit bases: quantizers (RTN, GPTQ, LoftQ, ApiQ, OneBit; one registration each), the quantized-base format
(codec `affine` for the group-wise methods, `sign` for OneBit), and the `QuantLinear` / `SignLinear` swapped in at
load.

Importing this package registers the quantizers and the `deltafleet-quantized-base` format with
`models.loading.BASE_FORMATS`, so `load_model` (and every `--base`) accepts a quantized base directory.
"""

from deltafleet.models.loading import BASE_FORMATS
from deltafleet.quant import apiq, loftq, methods, onebit  # noqa: F401  (register their quantizers)
from deltafleet.quant.base import FORMAT, load_base

BASE_FORMATS.register(FORMAT, load_base)
