"""Named caller keys: who is calling, and what that caller may spend and use.

Two modes, usable together. `KLEIN_GATEWAY_KEYS` (comma-separated secrets)
admits anonymous callers with no limits; `KLEIN_KEYS_FILE` names a YAML file
with a top-level `keys:` list, one entry per caller:

    keys:
      - name: team-a
        key_sha256: 9f86d081...          # sha256 of the secret; the secret never sits here
        budget_usd: {day: 5, month: 100}
        rate_limit: {requests_per_minute: 60, images_per_minute: 120}
        max_price_usd: 0.01              # default provider.max_price, and its ceiling
        backends: {only: [fal, local]}   # or {ignore: [...]}; enforced, not advisory
        admin: false                     # true: may read everyone's usage

`klein-gateway keys new NAME` prints a fresh secret and the entry to paste.
The file is re-read on SIGHUP and when its modification time changes (checked
at most once a second, on the request path); a file that no longer validates
is logged and the previous keys stay in force, so a typo never locks
everyone out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.domain.callers import Caller as LabelledKey
from gateway.domain.callers import caller_label
from gateway.settings import Settings

log = logging.getLogger("klein.keys")

KEY_PREFIX = "sk-klein-"
RECHECK_S = 1.0  # how often the request path may stat the keys file
Money = Annotated[Decimal, Field(gt=0, allow_inf_nan=False)]


class KeysFileError(ValueError):
    """A keys file that cannot be used; phrased as `file: field: problem`."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budgets(_Strict):
    """USD a key may spend per UTC day and per UTC calendar month."""

    day: Money | None = None
    month: Money | None = None

    def windows(self) -> list[tuple[str, Decimal]]:
        return [(w, limit) for w, limit in (("day", self.day), ("month", self.month)) if limit is not None]


class RateLimits(_Strict):
    requests_per_minute: Annotated[int, Field(gt=0)] | None = None
    images_per_minute: Annotated[int, Field(gt=0)] | None = None


class BackendRules(_Strict):
    only: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def allows(self, backend: str) -> bool:
        name = backend.casefold()
        if self.only and name not in {b.casefold() for b in self.only}:
            return False
        return name not in {b.casefold() for b in self.ignore}


class KeySpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    key_sha256: str
    budget_usd: Budgets = Field(default_factory=Budgets)
    rate_limit: RateLimits = Field(default_factory=RateLimits)
    max_price_usd: Money | None = None
    backends: BackendRules = Field(default_factory=BackendRules)
    admin: bool = False

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        value = value.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be the 64 hex digits of the key's SHA-256 (klein-gateway keys new NAME prints it)")
        return value


class KeysFile(_Strict):
    keys: list[KeySpec]

    @model_validator(mode="after")
    def _unique(self) -> KeysFile:
        names: set[str] = set()
        hashes: set[str] = set()
        for spec in self.keys:
            if spec.name in names:
                raise ValueError(f"key name {spec.name!r} appears twice")
            if spec.key_sha256 in hashes:
                raise ValueError(f"key {spec.name!r} has the same key_sha256 as another key")
            names.add(spec.name)
            hashes.add(spec.key_sha256)
        return self


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller. `spec` is None for a `KLEIN_GATEWAY_KEYS` key."""

    name: str
    spec: KeySpec | None = None

    @property
    def admin(self) -> bool:
        return self.spec is not None and self.spec.admin


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def anonymous_name(secret: str) -> str:
    """The label of a `KLEIN_GATEWAY_KEYS` key: a keyed hash (gateway.domain.callers), so
    a guessed key cannot be confirmed from /metrics, logs or the ledger."""
    return caller_label(LabelledKey(secret))


def new_key(name: str) -> tuple[str, str]:
    """A fresh secret and the keys-file entry that admits it."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise ValueError("a key name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = f"  - name: {name}\n    key_sha256: {hash_key(secret)}\n"
    return secret, entry


def load_keys_file(path: str | Path, known_backends: set[str] | None = None) -> KeysFile:
    """Read and validate a keys file; `known_backends` also checks backend names."""
    path = Path(path)
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeysFileError(f"{path}: file not found") from None
    except OSError as exc:
        raise KeysFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise KeysFileError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or "keys" not in raw:
        raise KeysFileError(f"{path}: (top level): expected a mapping with a 'keys' list")
    if raw["keys"] is None:
        raw["keys"] = []
    try:
        parsed = KeysFile.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"{path}: {loc}: {err['msg'].removeprefix('Value error, ')}")
        raise KeysFileError("\n".join(lines)) from None
    if known_backends is not None:
        known = {b.casefold() for b in known_backends}
        problems = []
        for i, spec in enumerate(parsed.keys):
            for field in ("only", "ignore"):
                for backend in getattr(spec.backends, field):
                    if backend.casefold() not in known:
                        problems.append(f"{path}: keys.{i}.backends.{field}: {backend!r} is not a configured backend")
        if problems:
            raise KeysFileError("\n".join(problems))
    return parsed


class KeyRing:
    """The keys in force, looked up by the bearer token's SHA-256."""

    def __init__(self, simple: frozenset[str] = frozenset(), path: str | Path | None = None, known_backends: set[str] | None = None) -> None:
        self._simple = {hash_key(k): Caller(anonymous_name(k)) for k in simple}
        self.path = Path(path) if path else None
        self._known = known_backends
        self._named: dict[str, Caller] = {}
        self._by_name: dict[str, KeySpec] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if self.path is not None:
            self._install(load_keys_file(self.path, known_backends))  # at start-up a bad file is fatal

    @classmethod
    def from_env(cls, env: dict[str, str] | Any, known_backends: set[str] | None = None) -> KeyRing:
        settings = Settings.from_env(env)
        simple = frozenset(k.strip() for k in (settings.gateway_keys or "").split(",") if k.strip())
        return cls(simple, settings.keys_file or None, known_backends)

    @property
    def open(self) -> bool:
        """No key of either kind: the gateway admits anyone."""
        return not self._simple and self.path is None

    def spec(self, name: str) -> KeySpec | None:
        return self._by_name.get(name)

    def lookup(self, token: str) -> Caller | None:
        self._maybe_reload()
        digest = hash_key(token)
        return self._named.get(digest) or self._simple.get(digest)

    def named(self, name: str | None) -> Caller | None:
        """The caller a label names (an async job's owner), with its rules; None if no key has it now."""
        if name is None:
            return None
        self._maybe_reload()
        return next((c for c in (*self._named.values(), *self._simple.values()) if c.name == name), None)

    def reload(self) -> bool:
        """Re-read the file now; on a bad file keep the keys in force and say why."""
        if self.path is None:
            return False
        try:
            parsed = load_keys_file(self.path, self._known)
        except KeysFileError as exc:
            log.error("keys file not reloaded, the previous keys stay in force: %s", exc)
            self._mtime = self._stat()
            return False
        self._install(parsed)
        log.info("keys file reloaded: %d keys", len(parsed.keys))
        return True

    def _install(self, parsed: KeysFile) -> None:
        with self._lock:
            self._named = {s.key_sha256: Caller(s.name, s) for s in parsed.keys}
            self._by_name = {s.name: s for s in parsed.keys}
            self._mtime = self._stat()

    def _stat(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime_ns if self.path else None
        except OSError:
            return None

    def _maybe_reload(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._checked < RECHECK_S:
            return
        self._checked = now
        if self._stat() != self._mtime:
            self.reload()
