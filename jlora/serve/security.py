"""Who may call what: API keys (HTTP `Authorization: Bearer`, gRPC `authorization` metadata), an admin key for
adapter loading and unloading, allowed `Host` names (against DNS rebinding) and browser cross-origin checks.

Health endpoints stay open (orchestrators probe them without keys; they tell only ok/draining/unhealthy).
"""

from __future__ import annotations

import dataclasses
import hmac
from urllib.parse import urlsplit

from jlora.errors import JloraError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("", "0.0.0.0", "::")


class AuthError(JloraError):
    """The request carries no valid API key for what it asks."""


class ForbiddenError(JloraError):
    """The request is refused whatever its key: a foreign Host name, or a cross-origin browser request."""


@dataclasses.dataclass(frozen=True)
class SecurityConfig:
    """Args:
      api_key: required on every endpoint but health (None: open).
      admin_api_key: required for adapter load/unload instead of `api_key` (None: `api_key` guards them); it
        also works wherever `api_key` does.
      allowed_hosts: `Host` header names HTTP requests may carry; "*" allows any.
    """

    api_key: str | None = None
    admin_api_key: str | None = None
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS

    def __post_init__(self):
        for name in ("api_key", "admin_api_key"):
            key = getattr(self, name)
            if key is not None and (not isinstance(key, str) or not key.strip() or not key.isprintable()):
                raise ValueError(f"SecurityConfig.{name} must be a non-empty printable string")
        object.__setattr__(self, "allowed_hosts", tuple(h.lower().strip("[]") for h in self.allowed_hosts))

    @classmethod
    def for_bind(cls, host: str, api_key=None, admin_api_key=None, allowed_hosts=None) -> "SecurityConfig":
        """The defaults for a server listening on `host`: loopback names, and `host` itself unless it is a
        wildcard address."""
        if allowed_hosts is None:
            allowed_hosts = LOOPBACK_HOSTS + (() if host in WILDCARD_BINDS else (host,))
        return cls(api_key, admin_api_key, tuple(allowed_hosts))

    def check_key(self, presented: str | None, admin: bool) -> bool:
        """Raises `AuthError` unless `presented` is a key valid for this (admin or not) call. Returns whether
        a key was needed."""
        if admin and self.admin_api_key is not None:
            keys = [self.admin_api_key]
        elif self.api_key is not None:
            keys = [k for k in (self.api_key, self.admin_api_key) if k is not None]
        else:
            return False
        ok = presented is not None and any(hmac.compare_digest(presented.encode(), k.encode()) for k in keys)
        if not ok:
            what = "the admin API key" if admin and self.admin_api_key else "an API key"
            raise AuthError(f"this endpoint needs {what}: send it as 'Authorization: Bearer <key>'"
                            if presented is None else "invalid API key")
        return True

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether an HTTP `Host` header names this server (ports are ignored)."""
        if "*" in self.allowed_hosts:
            return True
        if not host_header:
            return False
        host = host_header.strip().lower()
        if host.startswith("["):
            host = host[1:host.find("]")] if "]" in host else ""
        elif host.count(":") == 1:
            host = host.split(":")[0]
        return host in self.allowed_hosts

    def check_browser(self, method: str, headers) -> None:
        """Refuses a cross-origin, state-changing browser request that carries no key (a page on another site
        posting to a server on this machine): `Sec-Fetch-Site` says so, or `Origin` names a foreign host."""
        if method in ("GET", "HEAD", "OPTIONS"):
            return
        site = headers.get("sec-fetch-site")
        if site in ("cross-site", "same-site"):
            raise ForbiddenError("cross-origin requests are refused")
        origin = headers.get("origin")
        if origin is not None and (origin == "null" or not self.host_allowed(urlsplit(origin).netloc)):
            raise ForbiddenError("cross-origin requests are refused")


def bearer(value: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` value (None if absent or another scheme)."""
    if not value:
        return None
    scheme, _, key = value.strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None
