"""Quantization: group-wise primitives (RTN, GPTQ, bit packing) shared by delta compression and low-bit bases."""
