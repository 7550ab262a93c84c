"""Compression methods, one module each, registered in `METHODS` on import."""

from deltafleet.compress.methods import bitdelta, dare, svd  # noqa: F401  (registers the methods)
from deltafleet.compress.methods.base import METHODS, CompressSettings, Context, Method, get_method, register_method

__all__ = ["METHODS", "CompressSettings", "Context", "Method", "get_method", "register_method"]
