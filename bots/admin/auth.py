"""Who may use the console: the admin token as a Bearer header, or a signed session cookie.

``KEFU_ADMIN_TOKEN`` unset means the console is switched off: every ``/admin`` path answers 404. The
token is compared in constant time. A browser logs in once with the token and gets a session cookie
signed with a key derived from the token (HMAC), so changing the token logs every browser out; the
cookie is HttpOnly, SameSite=Lax and scoped to ``/admin``, and carries only the agent's display name.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer
from pydantic import SecretStr
from starlette.requests import HTTPConnection

COOKIE = "kefu_admin"
COOKIE_PATH = "/admin"
SESSION_SECONDS = 12 * 3600
_SALT = "kefu-admin-session"


@dataclass(frozen=True)
class Agent:
    """The person (or script) using the console; ``actor`` is what the audit log records."""

    name: str
    via: str  # "session" | "token"

    @property
    def actor(self) -> str:
        return f"admin:{self.name}"


def _serializer(token: SecretStr) -> URLSafeTimedSerializer:
    # The signing key is derived, never the token itself: a leaked cookie key would not be the token.
    key = hmac.new(token.get_secret_value().encode(), b"kefu admin session v1", hashlib.sha256).hexdigest()
    return URLSafeTimedSerializer(key, salt=_SALT)


def token_matches(token: SecretStr, offered: str) -> bool:
    """Constant-time comparison of ``offered`` with the admin token."""
    return hmac.compare_digest(token.get_secret_value().encode(), offered.encode())


def session_cookie(token: SecretStr, name: str) -> str:
    """A signed session value for an agent who logged in with the token."""
    return _serializer(token).dumps({"name": name})


def clean_name(raw: str) -> str:
    """A display name fit for the audit log (printable, short); "console" when blank."""
    name = "".join(ch for ch in raw.strip() if ch.isprintable())[:40]
    return name or "console"


def authenticate(connection: HTTPConnection, token: SecretStr) -> Agent | None:
    """The agent behind this request, from the Bearer header or the session cookie; None if neither."""
    header = connection.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        if token_matches(token, value.strip()):
            agent = connection.headers.get("x-kefu-agent", "")
            return Agent(name=clean_name(agent) if agent else "api", via="token")
        return None
    cookie = connection.cookies.get(COOKIE)
    if not cookie:
        return None
    try:
        data = _serializer(token).loads(cookie, max_age=SESSION_SECONDS)
    except BadSignature:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    return Agent(name=clean_name(data["name"]), via="session")


def safe_next(value: str | None) -> str:
    """Where to go after logging in: only paths inside the console (no open redirect)."""
    if value and value.startswith("/admin") and not value.startswith("//") and "\\" not in value:
        return value
    return "/admin/conversations"
