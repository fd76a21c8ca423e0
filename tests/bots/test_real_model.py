"""End to end with the real embedded model (SmolLM2-135M GGUF via llama.cpp), as a user runs kefu.

Slow-ish (real inference on CPU): marked ``model``. Answers are capped short to keep them quick.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.bots.conftest import free_port

pytestmark = pytest.mark.model

KEFU = str(Path(sys.executable).with_name("kefu"))


def kefu_env(tmp_path: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("KEFU_")}
    env.update(
        KEFU_DATABASE_URL=f"sqlite:///{tmp_path / 'kefu.db'}",
        KEFU_MAX_ANSWER_TOKENS="48",
        KEFU_MAX_TOOL_ROUNDS="1",
        KEFU_NUM_CTX="2048",
        KEFU_LOG_FORMAT="json",
    )
    return env


def test_piped_chat_answers_each_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [KEFU, "chat"],
        input="你好\nhello\n",
        capture_output=True,
        text=True,
        env=kefu_env(tmp_path),
        cwd=tmp_path,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert all(line.strip() for line in lines)
    assert "Traceback" not in result.stderr


def test_serve_answers_over_a_websocket_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [KEFU, "serve", "--port", str(port)],
        env=kefu_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            while True:
                assert server.poll() is None, server.communicate()[1]
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "kefu serve did not come up"
                time.sleep(0.2)
            assert http.get("/readyz").json()["checks"] == {"database": True, "store": True, "model": True}
        with connect(f"ws://127.0.0.1:{port}/ws?session=e2e-session-01", open_timeout=30) as ws:
            ws.send(json.dumps({"type": "message", "id": "e2e-1", "text": "hello"}))
            while True:
                frame = json.loads(ws.recv(timeout=240))
                if frame["type"] == "reply":
                    break
                assert frame["type"] == "delta", frame
        assert frame["id"] == "e2e-1"
        assert frame["text"].strip()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, stderr = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.returncode == 0, stderr
    assert "Traceback" not in stderr
    messages = [json.loads(line)["message"] for line in stderr.splitlines() if line.startswith("{")]
    assert "gateway stopped" in messages
