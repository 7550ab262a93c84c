"""Tenants: API keys, the adapters each key may use, and admin keys, from a TOML file.

```toml
[[tenants]]
name = "acme"                      # shown in logs and metrics instead of the key
api_key = "sk-acme-0123456789"     # or api_key_env = "ACME_KEY" (read from the environment at start-up)
adapters = ["acme-*", "shared"]    # fnmatch patterns over adapter names; the base model is always allowed

[[tenants]]
name = "ops"
api_key_env = "DELTAFLEET_ADMIN_KEY"
adapters = ["*"]
admin = true                       # may load, unload and list adapters and read /metrics
```

Keys are compared in constant time (SHA-256 digests through `hmac.compare_digest`, against every tenant so the
time does not depend on which one matches) and never logged or echoed. Without a config the server is open:
one anonymous principal that may use everything.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from deltafleet.errors import ArtifactError

MIN_KEY_LENGTH = 8
_FIELDS = {"name", "api_key", "api_key_env", "adapters", "admin"}


@dataclass(frozen=True)
class Principal:
    name: str
    adapters: tuple[str, ...]  # fnmatch patterns
    admin: bool = False

    def may_use(self, adapter: str) -> bool:
        return any(fnmatchcase(adapter, p) for p in self.adapters)


OPEN = Principal("anonymous", ("*",), admin=True)


@dataclass(frozen=True)
class Tenancy:
    """`open` means no config: every request is the anonymous principal."""

    entries: tuple[tuple[bytes, Principal], ...] = ()  # (SHA-256 of the key, principal)

    @property
    def open(self) -> bool:
        return not self.entries

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal of an `Authorization: Bearer KEY` header, or None for no or wrong key."""
        if self.open:
            return OPEN
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        digest = hashlib.sha256(key.strip().encode()).digest()
        found = None
        for stored, principal in self.entries:  # no early exit
            if hmac.compare_digest(digest, stored):
                found = principal
        return found

    @classmethod
    def from_file(cls, path: str | Path) -> Tenancy:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise ArtifactError(p, f"cannot read the tenancy config ({e.strerror})") from None
        except ValueError as e:  # TOMLDecodeError, UnicodeDecodeError, or an integer past Python's digit limit
            raise ArtifactError(p, f"not valid TOML ({str(e)[:200]})") from None
        except RecursionError:
            raise ArtifactError(p, "not valid TOML (nested too deeply)") from None
        return cls.from_dict(data, p)

    @classmethod
    def from_dict(cls, data: dict, source: str | Path = "<config>") -> Tenancy:
        extra = set(data) - {"tenants"}
        if extra:
            raise ArtifactError(source, f"unknown top-level key {sorted(extra)[0]!r}; expected [[tenants]]")
        tenants = data.get("tenants")
        if not isinstance(tenants, list) or not tenants:
            raise ArtifactError(source, "needs at least one [[tenants]] table")
        entries, names, digests = [], set(), set()
        for i, t in enumerate(tenants):
            where = f"tenants[{i}]"
            if not isinstance(t, dict):
                raise ArtifactError(source, f"{where}: must be a table")
            unknown = set(t) - _FIELDS
            if unknown:
                raise ArtifactError(source, f"{where}: unknown field {sorted(unknown)[0]!r}; allowed {sorted(_FIELDS)}")
            name = t.get("name")
            if not isinstance(name, str) or not name:
                raise ArtifactError(source, f"{where}.name: must be a non-empty string")
            if name in names:
                raise ArtifactError(source, f"{where}.name: {name!r} is used twice")
            names.add(name)
            key = _key_of(t, f"{where} ({name})", source)
            patterns = t.get("adapters", [])
            if not isinstance(patterns, list) or not all(isinstance(x, str) and x for x in patterns):
                raise ArtifactError(source, f"{where}.adapters: must be a list of non-empty strings (fnmatch patterns)")
            admin = t.get("admin", False)
            if not isinstance(admin, bool):
                raise ArtifactError(source, f"{where}.admin: must be true or false")
            digest = hashlib.sha256(key.encode()).digest()
            if digest in digests:
                raise ArtifactError(source, f"{where}: its API key is the same as an earlier tenant's")
            digests.add(digest)
            entries.append((digest, Principal(name, tuple(patterns), admin)))
        return cls(tuple(entries))


def _key_of(t: dict, where: str, source) -> str:
    if ("api_key" in t) == ("api_key_env" in t):
        raise ArtifactError(source, f"{where}: give exactly one of api_key and api_key_env")
    if "api_key_env" in t:
        var = t["api_key_env"]
        if not isinstance(var, str) or not var:
            raise ArtifactError(source, f"{where}.api_key_env: must name an environment variable")
        key = os.environ.get(var)
        if key is None:
            raise ArtifactError(source, f"{where}.api_key_env: environment variable {var!r} is not set")
        field = f"environment variable {var!r}"
    else:
        key = t["api_key"]
        field = "api_key"
        if not isinstance(key, str):
            raise ArtifactError(source, f"{where}.api_key: must be a string")
    if len(key.strip()) < MIN_KEY_LENGTH or key != key.strip():
        raise ArtifactError(source, f"{where}: the key in {field} must be at least {MIN_KEY_LENGTH} characters "
                                    f"without surrounding spaces")
    return key
