"""The training-method registry: one `Method` per fine-tuning method (how to make a model trainable and how to
export it). The built-in methods register in `train.methods`; methods in their own modules (`train.pafi`,
`train.hiwi`, `train.meft`) register on import, which `train.methods` does at its end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deltafleet.registry import Registry


@dataclass(frozen=True)
class Method:
    """prepare(model, cfg) -> trainable model (only the method's parameters require grad);
    export(model, tokenizer, out_dir) -> the format name written to the manifest."""

    name: str
    kind: str
    default_lr: float
    default_targets: tuple[str, ...]
    options: tuple[str, ...]  # TrainConfig fields that only this method reads (full fine-tuning has no targets)
    prepare: Callable
    export: Callable


METHODS: Registry[Method] = Registry("training method")


def register_method(method: Method) -> None:
    METHODS.register(method.name, method)
