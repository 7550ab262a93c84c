"""Where deltafleet caches what it builds once: converted embedded models, compiled kernels, demo adapters, the zoo.

`$DELTAFLEET_CACHE_DIR`, else `$XDG_CACHE_HOME/deltafleet`, else `~/.cache/deltafleet`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if env := os.environ.get("DELTAFLEET_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "deltafleet"
