"""The one registry helper: a named table that plugins fill at import and that checks each registration.

    KINDS = Registry[AdapterKind]("adapter kind")
    KINDS.register("lora", LoraKind())      # a second "lora" raises ValueError naming the table and the name
    KINDS.lookup("lorra")                   # DeltafleetError: unknown adapter kind 'lorra'; registered: [...]

A `Registry` is a read-only `Mapping` (`name in R`, `R[name]`, `sorted(R)`, `R.values()`), so lookups read like
a dict; only `register` adds. A bottom module: it imports nothing of deltafleet but `errors`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from deltafleet.errors import DeltafleetError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    def __init__(self, what: str, check: Callable[[str, T], None] | None = None):
        """what: the kind of entry, for messages ("adapter kind"); check(name, item): raises if item is unfit."""
        self.what = what
        self._check = check
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.what} name {name!r}: must be a non-empty string")
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} registered twice")
        if self._check is not None:
            self._check(name, item)
        self._items[name] = item
        return item

    def unregister(self, name: str) -> T:
        """Remove an entry (tests that register a temporary plugin)."""
        return self._items.pop(name)

    def lookup(self, name: str) -> T:
        """The entry, or a DeltafleetError naming the unknown name and what is registered (`get` is Mapping's:
        None when absent)."""
        if name in self._items:
            return self._items[name]
        raise DeltafleetError(f"unknown {self.what} {name!r}; registered: {sorted(self._items)}")

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {sorted(self._items)})"
