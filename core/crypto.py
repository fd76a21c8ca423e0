"""Authenticated encryption (AES-256-GCM) for what kefu keeps at rest: message history and audit records.

A :class:`KeyRing` holds one or more 32-byte keys, each with a short id. The first key is *active*: it
encrypts everything new. The others only decrypt, so a key can be rotated without rewriting old data::

    KEFU_AUDIT_KEY="k2:<base64url key>,k1:<base64url key>"   # k2 encrypts; k1 still reads old data

A bare base64 key (no ``id:``) is accepted too and gets the id ``k1``.

Every ciphertext is a self-describing text token ``v1.<key id>.<nonce>.<ciphertext+tag>`` (base64url,
unpadded). Callers pass *associated data* (AAD) naming where the value belongs (which table, row kind,
conversation); the same AAD must be given to decrypt, so a ciphertext copied to another row fails to
decrypt instead of showing the wrong customer's words.

:func:`load_keyring` is what an entry point calls: it uses ``KEFU_AUDIT_KEY`` when set and otherwise a
key file generated once next to the SQLite database, with a warning that production must set the key.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.db.database import sqlite_path
from core.errors import ConfigError, CryptoError
from core.settings import Settings

log = logging.getLogger(__name__)

TOKEN_VERSION = "v1"
KEY_BYTES = 32
NONCE_BYTES = 12
DEFAULT_KEY_ID = "k1"
"""Id given to a bare key (a spec without ``id:``)."""
LOCAL_KEY_ID = "local"
"""Id of the key :func:`load_keyring` generates when no key is configured."""
KEY_FILE_NAME = "kefu.key"

_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
# v1.<id>.<16 chars = 12-byte nonce>.<at least the 16-byte tag>
_TOKEN = re.compile(r"v1\.([A-Za-z0-9_-]{1,32})\.([A-Za-z0-9_-]{16})\.([A-Za-z0-9_-]{22,})")


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Decode base64url or standard base64, padded or not."""
    cleaned = text.strip().replace("+", "-").replace("/", "_").rstrip("=")
    return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), altchars=b"-_", validate=True)


def _b64decode_canonical(text: str) -> bytes:
    """Decode unpadded base64url, refusing encodings with stray bits in the last character: otherwise
    several token strings would decrypt to the same value and an edited token could go unnoticed."""
    data = _b64decode(text)
    if _b64encode(data) != text:
        raise ValueError("non-canonical base64")
    return data


def is_token(value: str) -> bool:
    """Whether ``value`` has the shape of a ciphertext token (rows written before encryption do not)."""
    return _TOKEN.fullmatch(value) is not None


class KeyRing:
    """Named AES-256-GCM keys: the active one encrypts, every one decrypts."""

    def __init__(self, keys: Mapping[str, bytes], *, active: str) -> None:
        if active not in keys:
            raise ConfigError(f"active key id {active!r} is not among the keys")
        ciphers: dict[str, AESGCM] = {}
        for key_id, key in keys.items():
            if not _KEY_ID.fullmatch(key_id):
                raise ConfigError(f"invalid key id {key_id!r}: use 1-32 characters of A-Z a-z 0-9 _ -")
            if len(key) != KEY_BYTES:
                raise ConfigError(f"key {key_id!r} must be {KEY_BYTES} bytes, not {len(key)}")
            ciphers[key_id] = AESGCM(key)
        self._ciphers = ciphers
        self._active = active

    @classmethod
    def from_spec(cls, spec: str) -> KeyRing:
        """Parse ``id:base64url,id:base64url,...`` (first = active) or one bare base64 key (id ``k1``).

        A malformed spec raises :class:`~core.errors.ConfigError`; the message never contains key bytes.
        """
        keys: dict[str, bytes] = {}
        order: list[str] = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            key_id, sep, encoded = part.partition(":")
            if not sep:
                key_id, encoded = DEFAULT_KEY_ID, part
            key_id = key_id.strip()
            if key_id in keys:
                raise ConfigError(f"key id {key_id!r} appears twice")
            try:
                keys[key_id] = _b64decode(encoded)
            except (binascii.Error, ValueError) as exc:
                raise ConfigError(f"key {key_id!r} is not valid base64") from exc
            order.append(key_id)
        if not order:
            raise ConfigError("no key given")
        return cls(keys, active=order[0])

    @staticmethod
    def generate_key() -> str:
        """A new random 32-byte key, base64url-encoded (prefix it with ``<id>:`` in a spec)."""
        return _b64encode(secrets.token_bytes(KEY_BYTES))

    @property
    def active_key_id(self) -> str:
        """Id of the key that encrypts new data."""
        return self._active

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id, the active one first."""
        return (self._active, *(k for k in self._ciphers if k != self._active))

    def encrypt(self, plaintext: bytes, aad: bytes) -> str:
        """Encrypt under the active key; returns ``v1.<key id>.<nonce>.<ciphertext>``."""
        # A fresh random 96-bit nonce per value; NIST SP 800-38D allows 2^32 of them per key, far
        # more than a key encrypts between rotations.
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._ciphers[self._active].encrypt(nonce, plaintext, aad)
        return f"{TOKEN_VERSION}.{self._active}.{_b64encode(nonce)}.{_b64encode(sealed)}"

    def decrypt(self, token: str, aad: bytes) -> bytes:
        """Decrypt a token made by :meth:`encrypt` with the same ``aad``.

        Raises :class:`~core.errors.CryptoError` for a malformed token, an unknown key id, or a
        ciphertext that was altered or belongs elsewhere (different AAD).
        """
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise CryptoError("not an encrypted value (malformed token)")
        key_id, nonce, sealed = match.groups()
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise CryptoError(f"unknown key id {key_id!r}: add that key to the key ring to read this data")
        try:
            return cipher.decrypt(_b64decode_canonical(nonce), _b64decode_canonical(sealed), aad)
        except (InvalidTag, binascii.Error, ValueError) as exc:
            raise CryptoError("ciphertext does not authenticate: it was altered or moved") from exc

    def encrypt_text(self, text: str, aad: str) -> str:
        """:meth:`encrypt` for text (UTF-8) and a text AAD."""
        return self.encrypt(text.encode("utf-8"), aad.encode("utf-8"))

    def decrypt_text(self, token: str, aad: str) -> str:
        """:meth:`decrypt` for text (UTF-8) and a text AAD."""
        return self.decrypt(token, aad.encode("utf-8")).decode("utf-8")

    def __repr__(self) -> str:  # never show key bytes
        return f"KeyRing(active={self._active!r}, keys={list(self.key_ids)!r})"


def key_id_of(token: str) -> str:
    """The key id a token was encrypted under (raises CryptoError when ``token`` is not one)."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise CryptoError("not an encrypted value (malformed token)")
    return match.group(1)


def default_key_file(database_path: Path | None) -> Path:
    """Where the generated key lives: next to the SQLite file, else in the working directory."""
    return (database_path.parent if database_path is not None else Path.cwd()) / KEY_FILE_NAME


def load_keyring(spec: str | None, *, key_file: Path, create: bool = True) -> KeyRing:
    """The key ring an entry point uses: from ``spec`` (``KEFU_AUDIT_KEY``) when set, else from ``key_file``.

    Without a spec the key file is read, or generated once (mode 0600, created atomically so two
    processes starting together agree on one key) when ``create`` is true; a warning says production
    must set ``KEFU_AUDIT_KEY``, since whoever copies the data folder also gets this key. The file holds
    a spec (``local:<key>``), so moving to a configured key keeps old data readable with
    ``KEFU_AUDIT_KEY="prod1:<new key>,<contents of the key file>"``.

    Raises :class:`~core.errors.ConfigError` for a malformed spec or key file, or when there is no key
    and ``create`` is false.
    """
    if spec is not None and spec.strip():
        try:
            ring = KeyRing.from_spec(spec)
        except ConfigError as exc:
            raise ConfigError(f"KEFU_AUDIT_KEY: {exc}") from exc
        _warn_if_file_key_missing(ring, key_file)
        return ring
    if not key_file.exists():
        if not create:
            raise ConfigError(f"no encryption key: set KEFU_AUDIT_KEY (no key file at {key_file})")
        _create_key_file(key_file)
    ring = _read_key_file(key_file)
    log.warning(
        "KEFU_AUDIT_KEY is not set: conversations and audit records are encrypted with the key in %s. "
        "Production must set KEFU_AUDIT_KEY (kefu audit keygen) and keep the key away from the data.",
        key_file,
    )
    return ring


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".kefu-key-", dir=path.parent)  # mkstemp: mode 0600
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(f"{LOCAL_KEY_ID}:{KeyRing.generate_key()}\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            # link() fails when the file exists: a process that lost the race uses the winner's key,
            # and nobody ever reads a half-written file.
            os.link(tmp, path)
        except FileExistsError:
            return
        except OSError:
            # A filesystem without hard links: exclusive create is still atomic about who wins.
            try:
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return
            with os.fdopen(out, "wb") as handle:
                handle.write(tmp.read_bytes())
        log.warning("generated an encryption key in %s (keep it: without it the data cannot be read)", path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_key_file(path: Path) -> KeyRing:
    mode = path.stat().st_mode
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("key file %s can be read by other users: chmod 600 it", path)
    try:
        spec = path.read_text(encoding="ascii")
        return KeyRing.from_spec(spec.strip())
    except (OSError, UnicodeDecodeError, ConfigError) as exc:
        raise ConfigError(f"key file {path} is unreadable or malformed: {exc}") from exc


def _warn_if_file_key_missing(ring: KeyRing, key_file: Path) -> None:
    # Data written while no key was configured is encrypted under the generated key: say so if the
    # configured ring cannot read it, instead of failing later on an old conversation.
    if not key_file.exists():
        return
    try:
        file_ring = _read_key_file(key_file)
    except ConfigError:
        return
    if file_ring.active_key_id not in ring.key_ids:
        log.warning(
            "%s holds key %r which KEFU_AUDIT_KEY does not include: data written before the key was "
            "configured cannot be read (append the file's contents to KEFU_AUDIT_KEY)",
            key_file,
            file_ring.active_key_id,
        )


def keyring_from_settings(settings: Settings, *, create: bool = True) -> KeyRing:
    """:func:`load_keyring` for an entry point: ``KEFU_AUDIT_KEY``, else the key file next to the
    SQLite database (in the working directory for PostgreSQL). Reads a file: call it in a thread
    from async code."""
    spec = settings.audit_key.get_secret_value() if settings.audit_key is not None else None
    return load_keyring(spec, key_file=default_key_file(sqlite_path(settings.database_url)), create=create)
