"""KEFU_* settings: defaults, parsing, .env, and start-up errors that name the variable at fault."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def empty_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No KEFU_* variable set and no .env in the working directory."""
    for name in list(os.environ):
        if name.startswith("KEFU_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_fresh_checkout_defaults_are_the_embedded_setup() -> None:
    settings = load_settings()
    assert settings.llm_backend == "llamacpp"
    assert settings.database_url.startswith("sqlite+aiosqlite://")
    assert settings.redis_url is None
    assert settings.history_turns == 6
    assert settings.num_ctx == 8192
    assert settings.audit_retention_days == 30
    assert settings.telegram_mode == "webhook"
    assert settings.slack_support_channels == []
    assert not (settings.telegram_enabled or settings.slack_enabled or settings.wechat_enabled)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgres://u:p@h:5432/db", "postgresql+asyncpg://u:p@h:5432/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("sqlite:///data/kefu.db", "sqlite+aiosqlite:///data/kefu.db"),
    ],
)
def test_database_url_gets_the_async_driver(
    monkeypatch: pytest.MonkeyPatch, given: str, expected: str
) -> None:
    monkeypatch.setenv("KEFU_DATABASE_URL", given)
    assert load_settings().database_url == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("C1, C2", ["C1", "C2"]), ("C1", ["C1"]), (" C1 ,, C2 ,", ["C1", "C2"]), ('["C1", "C2"]', ["C1", "C2"])],
)
def test_slack_support_channels_is_a_comma_separated_list(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("KEFU_SLACK_SUPPORT_CHANNELS", value)
    assert load_settings().slack_support_channels == expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KEFU_NUM_CTX", "abc"),
        ("KEFU_NUM_CTX", "256"),
        ("KEFU_LLM_BACKEND", "gpt"),
        ("KEFU_TELEGRAM_MODE", "push"),
        ("KEFU_DATABASE_URL", "mysql://u@h/db"),
        ("KEFU_HISTORY_TURNS", "0"),
        ("KEFU_TEMPERATURE", "hot"),
        ("KEFU_SLACK_SUPPORT_CHANNELS", "[C1"),
    ],
)
def test_invalid_value_fails_at_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert variable in str(caught.value)


def test_every_bad_variable_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEFU_NUM_CTX", "abc")
    monkeypatch.setenv("KEFU_LLM_BACKEND", "gpt")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "KEFU_NUM_CTX" in str(caught.value) and "KEFU_LLM_BACKEND" in str(caught.value)


def test_values_are_read_from_dotenv_in_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, empty_environment: Path
) -> None:
    (empty_environment / ".env").write_text(
        "# local configuration\n"
        "KEFU_HISTORY_TURNS=9\n"
        "KEFU_REDIS_URL=redis://127.0.0.1:6379/3\n"
        "KEFU_LLM_BACKEND=ollama\n",
        encoding="utf-8",
    )
    settings = load_settings()
    assert settings.history_turns == 9
    assert settings.redis_url == "redis://127.0.0.1:6379/3"
    assert settings.llm_backend == "ollama"

    # A real environment variable wins over the file.
    monkeypatch.setenv("KEFU_HISTORY_TURNS", "4")
    assert load_settings().history_turns == 4


def test_bad_value_in_dotenv_names_the_variable(empty_environment: Path) -> None:
    (empty_environment / ".env").write_text("KEFU_AUDIT_RETENTION_DAYS=forever\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="KEFU_AUDIT_RETENTION_DAYS"):
        load_settings()


def test_blank_value_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """`KEFU_ADMIN_TOKEN=` left blank must not become an empty (guessable) secret."""
    monkeypatch.setenv("KEFU_ADMIN_TOKEN", "")
    monkeypatch.setenv("KEFU_TELEGRAM_TOKEN", "")
    monkeypatch.setenv("KEFU_REDIS_URL", "")
    settings = load_settings()
    assert settings.admin_token is None
    assert settings.redis_url is None
    assert not settings.telegram_enabled


@pytest.mark.parametrize(
    ("credentials", "telegram", "slack", "wechat"),
    [
        ({"KEFU_TELEGRAM_TOKEN": "123:abc"}, True, False, False),
        ({"KEFU_TELEGRAM_WEBHOOK_SECRET": "s"}, False, False, False),
        ({"KEFU_SLACK_BOT_TOKEN": "xoxb-1"}, False, False, False),
        ({"KEFU_SLACK_BOT_TOKEN": "xoxb-1", "KEFU_SLACK_SIGNING_SECRET": "s"}, False, True, False),
        ({"KEFU_SLACK_BOT_TOKEN": "xoxb-1", "KEFU_SLACK_APP_TOKEN": "xapp-1"}, False, True, False),
        ({"KEFU_SLACK_SIGNING_SECRET": "s", "KEFU_SLACK_APP_TOKEN": "xapp-1"}, False, False, False),
        (
            {"KEFU_WECHAT_APPID": "wx1", "KEFU_WECHAT_SECRET": "s", "KEFU_WECHAT_TOKEN": "t"},
            False,
            False,
            True,
        ),
        ({"KEFU_WECHAT_APPID": "wx1", "KEFU_WECHAT_SECRET": "s"}, False, False, False),
        ({"KEFU_WECHAT_SECRET": "s", "KEFU_WECHAT_TOKEN": "t"}, False, False, False),
    ],
)
def test_a_platform_is_enabled_exactly_when_its_credentials_are_set(
    monkeypatch: pytest.MonkeyPatch, credentials: dict[str, str], telegram: bool, slack: bool, wechat: bool
) -> None:
    for variable, value in credentials.items():
        monkeypatch.setenv(variable, value)
    settings = load_settings()
    assert (settings.telegram_enabled, settings.slack_enabled, settings.wechat_enabled) == (
        telegram,
        slack,
        wechat,
    )


def test_secrets_do_not_leak_into_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEFU_TELEGRAM_TOKEN", "123456:very-secret-token")
    monkeypatch.setenv("KEFU_ADMIN_TOKEN", "admin-secret")
    settings = load_settings()
    shown = repr(settings) + str(settings.model_dump())
    assert "very-secret-token" not in shown and "admin-secret" not in shown
    assert settings.telegram_token is not None
    assert settings.telegram_token.get_secret_value() == "123456:very-secret-token"


def test_keyword_overrides_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEFU_HISTORY_TURNS", "3")
    assert load_settings(history_turns=8).history_turns == 8
    assert isinstance(load_settings(), Settings)
