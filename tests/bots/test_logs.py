"""Log lines: JSON for collectors, readable text for people, both carrying the conversation."""

from __future__ import annotations

import io
import json
import logging

from bots.logs import setup_logging


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_carry_conversation_and_message_id_when_not_on_a_terminal() -> None:
    out = io.StringIO()
    setup_logging(level="INFO", fmt="auto", stream=out)
    logging.getLogger("kefu.test").info(
        "answered in %d ms", 12, extra={"conversation": "web:abc12345", "message_id": "m1"}
    )
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("kefu.test").error("failed", exc_info=True)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "answered in 12 ms"
    assert first["level"] == "info"
    assert first["conversation"] == "web:abc12345"
    assert first["message_id"] == "m1"
    assert "ValueError: boom" in second["exception"]


def test_a_terminal_gets_readable_lines_with_the_context() -> None:
    out = _FakeTTY()
    setup_logging(level="INFO", fmt="auto", stream=out)
    logging.getLogger("kefu.test").warning("slow answer", extra={"conversation": "terminal:li"})
    line = out.getvalue().strip()
    assert "WARNING" in line and "slow answer" in line and "[conversation=terminal:li]" in line
    assert not line.startswith("{")


def test_the_format_can_be_forced_and_the_level_filters() -> None:
    out = _FakeTTY()
    setup_logging(level="WARNING", fmt="json", stream=out)
    logging.getLogger("kefu.test").info("hidden")
    logging.getLogger("kefu.test").warning("shown")
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["shown"]
