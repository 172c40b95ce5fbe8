"""API keys: `Authorization: Bearer <key>`, checked against SHA-256 digests in a file.

The keys file (YAML; a mounted Kubernetes Secret in production) holds no key itself:

    keys:
      - name: search-backend          # shown in logs, metrics and traces with the tenant
        tenant: search
        sha256: 9f86d081884c7d65…     # hashlib.sha256(key.encode()).hexdigest()
        revoked: false
        quota: {requests_per_s: 20, tokens_per_min: 200000, max_concurrent_streams: 32}

The file is re-read when its modification time changes (checked at most every `reload_s`), so
adding, revoking or re-quoting a key needs no restart; a file that fails to parse keeps the last
good key set and is reported in the log. Digests are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.errors import Unauthorized
from services.settings import QuotaSettings, Strict

log = logging.getLogger("small4.auth")


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    tenant: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    revoked: bool = False
    quota: QuotaSettings | None = None


class KeysFile(Strict):
    # required: an empty or half-written file (a rewrite read midway) is not "no keys";
    # revoking every key is `keys: []`
    keys: list[KeyEntry]

    @model_validator(mode="after")
    def _one_entry_per_key(self):
        """A digest listed twice is refused (the last good key set is kept): with the last
        entry winning, a copy of a revoked key's entry below it would silently un-revoke it."""
        first: dict[str, int] = {}
        for i, entry in enumerate(self.keys):
            if first.setdefault(entry.sha256, i) != i:
                raise ValueError(f"keys.{i}.sha256: the digest of keys.{first[entry.sha256]} "
                                 "again; list each key once")
        return self


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name, its tenant, its quota (None: the default quota), and
    the key's digest, which identifies it (names are labels: two keys may share one)."""

    key: str
    tenant: str
    quota: QuotaSettings | None = None
    key_id: str = ""

    @property
    def ident(self) -> str:
        """What per-key state (quotas, upload slots) is keyed by."""
        return self.key_id or self.key


ANONYMOUS = Principal("none", "anonymous")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The current key set of one keys file, reloaded when the file changes."""

    def __init__(self, path: Path, reload_s: float = 5.0, clock=time.monotonic):
        self.path, self.reload_s, self.clock = Path(path), reload_s, clock
        self.entries: dict[str, KeyEntry] = {}
        self.version: tuple | None = None  # the file's inode, mtime (ns) and size when read
        self.checked = float("-inf")
        self._load(strict=True)

    def _load(self, strict: bool) -> None:
        try:
            # mtime alone misses a rewrite within one tick of a coarse clock, or one copied
            # with its mtime kept (cp -p, rsync -t); the inode catches a renamed-in file
            st = self.path.stat()
            version = (st.st_ino, st.st_mtime_ns, st.st_size)
            if version == self.version:
                return
            data = KeysFile.model_validate(yaml.safe_load(self.path.read_bytes().decode()))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValidationError) as exc:
            why = _without_values(exc)
            if strict:
                raise ValueError(f"auth.keys_file {self.path}: {why}") from None
            log.error("keys file %s not reloaded, keeping %d keys: %s", self.path,
                      len(self.entries), why)
            return
        self.entries = {e.sha256: e for e in data.keys}
        self.version = version
        log.info("loaded %d API keys from %s", len(self.entries), self.path)

    def refresh(self) -> None:
        now = self.clock()
        if now - self.checked >= self.reload_s:
            self.checked = now
            self._load(strict=False)

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of a request with this `Authorization` header, or `Unauthorized`."""
        self.refresh()
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        wanted = digest(key.strip())
        entry = next((e for d, e in self.entries.items() if hmac.compare_digest(d, wanted)),
                     None)
        if entry is None or entry.revoked:
            raise Unauthorized("invalid API key")  # the same answer for unknown and revoked
        return Principal(entry.name, entry.tenant, entry.quota, key_id=entry.sha256)


def _without_values(exc: BaseException) -> str:
    """What is wrong with a keys file, never the values in it: a raw key pasted where its
    digest goes would otherwise be printed (pydantic quotes a bad value, YAML a bad line)."""
    if isinstance(exc, ValidationError):
        if any(e["loc"] in ((), ("keys",)) and e["type"] in ("missing", "model_type")
               for e in exc.errors()):
            return "no top-level `keys:` list (empty, or written only in part; to revoke " \
                   "every key write `keys: []`)"
        # our own checks' messages name positions only; pydantic's would quote the value
        return "; ".join(str(e["ctx"]["error"]) if e["type"] == "value_error"
                         else f"{'.'.join(map(str, e['loc']))}: {e['type']}"
                         for e in exc.errors())
    if isinstance(exc, UnicodeDecodeError):  # its repr holds the whole file
        return f"not UTF-8 (byte {exc.start})"
    if isinstance(exc, yaml.YAMLError):
        mark = getattr(exc, "problem_mark", None)
        return f"not valid YAML{f' (line {mark.line + 1})' if mark else ''}"
    return f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or 'cannot be read'}"
