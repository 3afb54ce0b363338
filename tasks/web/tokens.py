"""Bearer tokens of ``pacsflow serve``: stored as SHA-256 hashes with a name and scopes.

A token is shown once, when it is made (``pacsflow token add``); the file keeps only its hash,
so reading the file does not give access. Tokens are long random strings, so one unsalted hash
is enough to check them in constant time per request.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from pacsflow.tasks.core.files import write_atomic

TOKEN_BYTES = 32


class Scope(str, enum.Enum):
    READ = "read"  # QIDO-RS, WADO-RS, the study API, the dashboard
    WRITE = "write"  # STOW-RS


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's name (in the access log) and what it may do."""

    name: str
    scopes: frozenset[Scope]

    def may(self, scope: Scope) -> bool:
        return scope in self.scopes


class TokenError(ValueError):
    pass


class TokenStore:
    """The tokens file (JSON: name → {sha256, scopes}); re-read when it changes on disk, so a
    token added or revoked by the command line applies to a running service."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._by_hash: dict[str, Principal] = {}

    def add(self, name: str, scopes: set[Scope]) -> str:
        """A new token for ``name`` (replacing an older one of that name); returns it, once."""
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise TokenError("a token name is letters, digits, - and _")
        if not scopes:
            raise TokenError("a token needs at least one scope (read, write)")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        entries = self._entries()
        entries[name] = {"sha256": _digest(token), "scopes": sorted(s.value for s in scopes)}
        self._write(entries)
        return token

    def revoke(self, name: str) -> bool:
        entries = self._entries()
        if entries.pop(name, None) is None:
            return False
        self._write(entries)
        return True

    def names(self) -> dict[str, list[str]]:
        """Token names and their scopes (never hashes)."""
        return {name: list(e["scopes"]) for name, e in sorted(self._entries().items())}

    def check(self, token: str) -> Principal | None:
        """The principal of ``token``, or None when no stored token matches."""
        digest = _digest(token)
        with self._lock:
            self._reload()
            for known, principal in self._by_hash.items():
                if hmac.compare_digest(known, digest):
                    return principal
        return None

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._by_hash = None, {}
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._by_hash = {e["sha256"]: Principal(name, frozenset(Scope(s) for s in e["scopes"]))
                             for name, e in self._entries().items()}
            self._stamp = stamp

    def _entries(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise TokenError(f"serve.tokens_file: cannot read {self.path} ({type(exc).__name__})") from None
        return dict(data.get("tokens", {}))

    def _write(self, entries: dict[str, dict]) -> None:
        write_atomic(self.path, json.dumps({"tokens": entries}, indent=2).encode(), private=True)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
