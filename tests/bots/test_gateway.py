"""The gateway's HTTP side: health probes and the chat page."""

from __future__ import annotations

from starlette.testclient import TestClient

from tests.bots.conftest import SwitchableModel


def test_healthz_answers_while_the_process_is_alive(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_200_when_every_dependency_answers(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"] == {"database": True, "store": True, "model": True}


def test_readyz_is_503_naming_the_dependency_that_is_down(client: TestClient, model: SwitchableModel) -> None:
    model.reachable = False
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["model"] is False
    assert body["checks"]["database"] is True
    # liveness is unaffected: the process itself is fine, it must not be restarted for this
    assert client.get("/healthz").status_code == 200

    model.reachable = True
    assert client.get("/readyz").status_code == 200


def test_the_chat_page_is_served_with_its_websocket_script(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<script>" in page and "new WebSocket(" in page
    assert "ws?session=" in page
    assert "localStorage" in page
    assert "发送" in page and "Send" in page
    # no external resources: the page works offline and behind strict proxies
    assert "http://" not in page and "https://" not in page
    assert "connect-src 'self'" in response.headers["content-security-policy"]


def test_unknown_paths_are_404(client: TestClient) -> None:
    assert client.get("/nope").status_code == 404
