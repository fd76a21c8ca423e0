"""The ``kefu`` command in-process (typer's CliRunner) against a temporary SQLite database."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from bots.cli import app
from tests.bots.conftest import free_port

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    # A .env in the current folder would be read: run where there is none.
    monkeypatch.chdir(tmp_path)
    return {"KEFU_DATABASE_URL": f"sqlite:///{tmp_path / 'data' / 'kefu.db'}", "KEFU_LOG_FORMAT": "console"}


def kefu(*args: str, env: dict[str, str]) -> Result:
    return runner.invoke(app, list(args), env=env)


def test_db_upgrade_creates_the_database(env: dict[str, str], tmp_path: Path) -> None:
    result = kefu("db", "upgrade", env=env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "kefu.db").exists()
    assert "is at schema" in result.output
    # running it again is harmless
    assert kefu("db", "upgrade", env=env).exit_code == 0


def test_seed_demo_twice_adds_the_data_once(env: dict[str, str]) -> None:
    first = kefu("seed-demo", env=env)
    assert first.exit_code == 0, first.output
    added = {
        line.split(":")[0]: int(line.split(":")[1].split()[0])
        for line in first.output.splitlines()
        if line.endswith(" added")
    }
    assert added["orders"] > 0 and added["customers"] > 0 and added["faq_entries"] > 0

    second = kefu("seed-demo", env=env)
    assert second.exit_code == 0, second.output
    assert "orders: 0 added" in second.output
    assert "demo data already present" in second.output


def test_an_invalid_setting_is_named_and_exits_2(env: dict[str, str]) -> None:
    result = kefu("check", env={**env, "KEFU_NUM_CTX": "abc"})
    assert result.exit_code == 2
    assert "KEFU_NUM_CTX" in result.output
    assert "Traceback" not in result.output


def test_check_reports_platforms_and_a_ready_embedded_setup(env: dict[str, str]) -> None:
    kefu("db", "upgrade", env=env)
    result = kefu(
        "check",
        env={
            **env,
            "KEFU_REDIS_URL": "redis://127.0.0.1:6379/15",
            "KEFU_SLACK_BOT_TOKEN": "xoxb-test",
            "KEFU_SLACK_APP_TOKEN": "xapp-test",
        },
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("slack" in line and "on (Socket Mode)" in line for line in lines)
    assert any("telegram" in line and "off" in line for line in lines)
    assert any("wechat" in line and "off" in line for line in lines)
    assert any(line.split()[:2] == ["ok", "database"] and "schema at" in line for line in lines)
    assert any(line.split()[:2] == ["ok", "redis"] for line in lines)
    assert any(line.split()[:2] == ["ok", "model"] and "llamacpp" in line for line in lines)
    assert any(line.split()[:2] == ["ok", "context"] for line in lines)
    assert lines[-1] == "ready"


def test_check_exits_1_and_names_what_is_down(env: dict[str, str], tmp_path: Path) -> None:
    dead = free_port()  # nothing listens here
    result = kefu(
        "check",
        env={
            **env,
            "KEFU_LLM_BACKEND": "ollama",
            "KEFU_OLLAMA_HOST": f"http://127.0.0.1:{dead}",
            "KEFU_REDIS_URL": f"redis://127.0.0.1:{dead}/0",
            "KEFU_TELEGRAM_TOKEN": "123:abc",
            "KEFU_TELEGRAM_WEBHOOK_SECRET": "s3cret",
        },
    )
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert any("telegram" in line and "on (webhook)" in line for line in lines)
    assert any(line.split()[:2] == ["FAIL", "redis"] for line in lines)
    assert any(line.split()[:2] == ["FAIL", "model"] and "ollama" in line for line in lines)
    assert "not ready: redis, model" in result.output
    # the database file did not exist: the doctor says so and does not create it
    assert any("database" in line and "does not exist yet" in line for line in lines)
    assert not (tmp_path / "data" / "kefu.db").exists()


def test_chat_rejects_a_session_name_that_would_break_the_conversation_key(env: dict[str, str]) -> None:
    result = kefu("chat", "--session", "a:b", env=env)
    assert result.exit_code == 2
    assert "--session" in result.output
