"""Confinement of artifact files to a root directory, by real path (symlinks followed).

A server that loads adapters only from under its adapters root must check every file a load opens, not only the
directory: a weights file inside the root may be a symlink to anywhere. `confined_files` lists the files an
adapter load reads (its manifest, `adapter_config.json`, every `*.safetensors`), resolves each one, and refuses
the directory when any of them lies outside the root or is not a regular file. Errors name the offending file
relative to the root, so they can be shown to clients without revealing the server's directory layout.

The check is made before the load, so it does not stop someone who can write under the root from swapping a file
for a symlink between the check and the read; the root itself is trusted to be writable only by the operator.
"""

from __future__ import annotations

import stat
from pathlib import Path

from deltafleet.errors import ArtifactError

ADAPTER_FILES = ("deltafleet.json", "adapter_config.json", "*.safetensors")
"""Glob patterns of the files an adapter load opens (the manifest, peft's config, the weights)."""


def confined_files(directory: str | Path, root: str | Path, patterns: tuple[str, ...] = ADAPTER_FILES) -> list[Path]:
    """The real paths of `directory`'s files matching `patterns`, each checked to lie under `root`.

    Raises ArtifactError (its path relative to `root`) when the directory or one of those files resolves outside
    `root` (e.g. through a symlink), or when a file is not a regular file (a FIFO or a device would block or never
    end a read). Files that do not exist are left out; the loader reports them."""
    real_root = Path(root).resolve()
    try:
        real_dir = Path(directory).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loop (RuntimeError before 3.13), NUL byte
        raise ArtifactError(Path(directory).name, f"cannot resolve the directory ({type(e).__name__})") from None
    if not real_dir.is_relative_to(real_root):
        raise ArtifactError(Path(directory).name, "resolves outside the adapters root")
    shown_dir = real_dir.relative_to(real_root)
    try:
        names = sorted({f.name for pattern in patterns for f in real_dir.glob(pattern)})
    except OSError as e:
        raise ArtifactError(shown_dir, f"cannot list the directory ({type(e).__name__})") from None
    out = []
    for name in names:
        shown = shown_dir / name
        try:
            real = (real_dir / name).resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise ArtifactError(shown, f"cannot resolve the file ({type(e).__name__})") from None
        if not real.is_relative_to(real_root):
            raise ArtifactError(shown, "resolves outside the adapters root (a symlink out of it)")
        try:
            mode = real.stat().st_mode
        except FileNotFoundError:
            continue  # a dangling link to inside the root: the loader says the file is missing
        except OSError as e:
            raise ArtifactError(shown, f"cannot read the file's status ({type(e).__name__})") from None
        if not stat.S_ISREG(mode):
            raise ArtifactError(shown, "is not a regular file")
        out.append(real)
    return out
