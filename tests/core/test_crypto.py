"""Key ring: encryption round trip, rotation, tamper and swap detection, key specs and the key file."""

from __future__ import annotations

import base64
import logging
import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from core.crypto import KeyRing, is_token, key_id_of, load_keyring
from core.errors import ConfigError, CryptoError

K1 = KeyRing.generate_key()
K2 = KeyRing.generate_key()
SECRET = "我的银行卡号6222020200112233445"
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_round_trip_gives_back_the_plaintext_and_hides_it() -> None:
    ring = KeyRing.from_spec(f"k1:{K1}")

    token = ring.encrypt_text(SECRET, "messages:1")

    assert SECRET not in token and "6222020200112233445" not in token
    assert token.startswith("v1.k1.") and is_token(token)
    assert ring.decrypt_text(token, "messages:1") == SECRET
    # A fresh nonce each time: equal messages do not give equal ciphertexts.
    assert ring.encrypt_text(SECRET, "messages:1") != token


def test_rotation_new_key_encrypts_old_key_still_decrypts() -> None:
    old = KeyRing.from_spec(f"k1:{K1}")
    token_k1 = old.encrypt_text("written under k1", "a")

    rotated = KeyRing.from_spec(f"k2:{K2},k1:{K1}")
    token_k2 = rotated.encrypt_text("written under k2", "a")

    assert key_id_of(token_k2) == "k2" and rotated.active_key_id == "k2"
    assert rotated.key_ids == ("k2", "k1")
    assert rotated.decrypt_text(token_k1, "a") == "written under k1"
    assert rotated.decrypt_text(token_k2, "a") == "written under k2"
    with pytest.raises(CryptoError, match="unknown key id 'k2'"):
        old.decrypt_text(token_k2, "a")


def test_tampered_ciphertext_or_other_aad_is_refused() -> None:
    ring = KeyRing.from_spec(f"k1:{K1}")
    token = ring.encrypt_text(SECRET, "conversation:1")
    head, body = token.rsplit(".", 1)
    flipped = head + "." + ("A" if body[0] != "A" else "B") + body[1:]

    with pytest.raises(CryptoError, match="altered or moved"):
        ring.decrypt_text(flipped, "conversation:1")
    with pytest.raises(CryptoError, match="altered or moved"):
        ring.decrypt_text(token, "conversation:2")  # copied into another conversation
    with pytest.raises(CryptoError, match="malformed"):
        ring.decrypt_text("just some text", "conversation:1")


def test_every_single_character_edit_of_a_token_is_refused() -> None:
    # Including edits that only touch the unused low bits of the last base64 character.
    ring = KeyRing.from_spec(f"k1:{K1}")
    token = ring.encrypt_text("短消息", "a")
    start = len("v1.k1.")
    for i in range(start, len(token)):
        if token[i] == ".":
            continue
        for replacement in ALPHABET:
            edited = token[:i] + replacement + token[i + 1 :]
            if edited != token:
                with pytest.raises(CryptoError):
                    ring.decrypt_text(edited, "a")


def test_same_key_bytes_under_another_id_cannot_read_it() -> None:
    # The key id is part of the token: a renamed key is a different key as far as tokens go.
    token = KeyRing.from_spec(f"k1:{K1}").encrypt_text("x", "a")
    with pytest.raises(CryptoError, match="unknown key id"):
        KeyRing.from_spec(f"other:{K1}").decrypt_text(token, "a")


def test_bare_standard_base64_key_gets_id_k1() -> None:
    raw = os.urandom(32)
    ring = KeyRing.from_spec(base64.b64encode(raw).decode())  # padded, + and /

    assert ring.key_ids == ("k1",)
    assert (
        KeyRing.from_spec(f"k1:{base64.urlsafe_b64encode(raw).decode()}").decrypt_text(
            ring.encrypt_text("hi", "a"), "a"
        )
        == "hi"
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "no key"),
        ("k1:" + base64.urlsafe_b64encode(b"short").decode(), "must be 32 bytes"),
        ("k1:not*base64!", "not valid base64"),
        (f"k1:{K1},k1:{K2}", "appears twice"),
        (f"bad.id:{K1}", "invalid key id"),
    ],
)
def test_bad_specs_are_config_errors_that_never_echo_the_key(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        KeyRing.from_spec(spec)
    assert K1 not in str(caught.value) and K2 not in str(caught.value)
    assert K1 not in repr(KeyRing.from_spec(f"k1:{K1}"))


def test_no_key_configured_generates_one_key_file_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "data" / "kefu.key"

    with caplog.at_level(logging.WARNING, logger="core.crypto"):
        first = load_keyring(None, key_file=key_file)
    token = first.encrypt_text(SECRET, "a")
    second = load_keyring("", key_file=key_file)  # a blank variable means "not set"

    assert key_file.exists()
    assert second.decrypt_text(token, "a") == SECRET  # same key on the next start
    assert "Production must set KEFU_AUDIT_KEY" in caplog.text
    if sys.platform != "win32":
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert [p.name for p in key_file.parent.iterdir()] == ["kefu.key"]  # no temp files left


def test_processes_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    key_file = tmp_path / "kefu.key"
    with ThreadPoolExecutor(max_workers=8) as pool:
        rings = list(pool.map(lambda _: load_keyring(None, key_file=key_file), range(16)))

    token = rings[0].encrypt_text("x", "a")
    assert all(ring.decrypt_text(token, "a") == "x" for ring in rings)


def test_configured_key_wins_and_warns_when_it_cannot_read_the_generated_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "kefu.key"
    local = load_keyring(None, key_file=key_file)
    old_token = local.encrypt_text("from the laptop days", "a")

    with caplog.at_level(logging.WARNING, logger="core.crypto"):
        configured = load_keyring(f"prod:{K1}", key_file=key_file)
    assert configured.active_key_id == "prod"
    assert "does not include" in caplog.text

    # The documented migration: append the key file's contents to KEFU_AUDIT_KEY.
    both = load_keyring(f"prod:{K1},{key_file.read_text().strip()}", key_file=key_file)
    assert both.decrypt_text(old_token, "a") == "from the laptop days"


def test_missing_key_without_create_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KEFU_AUDIT_KEY"):
        load_keyring(None, key_file=tmp_path / "kefu.key", create=False)
    assert not (tmp_path / "kefu.key").exists()
    with pytest.raises(ConfigError, match="KEFU_AUDIT_KEY"):
        load_keyring("k1:nope", key_file=tmp_path / "kefu.key")
