"""Prometheus metrics: the values move when messages flow, and GET /metrics serves them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from bots.gateway import create_app
from core import metrics
from core.breaker import CircuitBreaker
from core.db.models import utcnow
from core.errors import ModelTimeout
from core.llm.base import ChatMessage, ChatRequest, ChatResponse, Usage
from core.llm.testing import FunctionModel
from core.metrics import MeteredModel
from core.settings import Settings, load_settings
from tests.bots.conftest import SwitchableModel, free_port


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_message_path_metrics_move() -> None:
    received = value("kefu_messages_received_total", channel="telegram", outcome="new")
    duplicates = value("kefu_messages_received_total", channel="telegram", outcome="duplicate")
    sent = value("kefu_messages_sent_total", channel="telegram", source="model")
    latency_count = value("kefu_reply_latency_seconds_count", channel="telegram")
    slow_bucket = value("kefu_reply_latency_seconds_bucket", channel="telegram", le="2.0")

    metrics.message_received("telegram")
    metrics.message_received("telegram", "duplicate")
    metrics.reply_sent("telegram", "model", received_at=utcnow() - timedelta(seconds=3))

    assert value("kefu_messages_received_total", channel="telegram", outcome="new") == received + 1
    assert value("kefu_messages_received_total", channel="telegram", outcome="duplicate") == duplicates + 1
    assert value("kefu_messages_sent_total", channel="telegram", source="model") == sent + 1
    assert value("kefu_reply_latency_seconds_count", channel="telegram") == latency_count + 1
    # three seconds is above the 2 s bucket
    assert value("kefu_reply_latency_seconds_bucket", channel="telegram", le="2.0") == slow_bucket


def test_model_tool_faq_guard_and_inbox_metrics_move() -> None:
    names = [
        ("kefu_model_call_seconds_count", {"outcome": "ok"}),
        ("kefu_model_tokens_total", {"kind": "prompt"}),
        ("kefu_model_tokens_total", {"kind": "completion"}),
        ("kefu_model_tokens_total", {"kind": "cached"}),
        ("kefu_model_errors_total", {"error": "ModelTimeout"}),
        ("kefu_tool_calls_total", {"tool": "lookup_order"}),
        ("kefu_tool_errors_total", {"tool": "lookup_order"}),
        ("kefu_faq_cache_lookups_total", {"result": "hit"}),
        ("kefu_faq_cache_lookups_total", {"result": "miss"}),
        ("kefu_fallbacks_total", {"reason": "model_circuit_open", "answer": "faq"}),
        ("kefu_guard_blocks_total", {"category": "prompt_injection"}),
        ("kefu_inbox_reclaimed_total", {}),
        ("kefu_inbox_dead_lettered_total", {}),
    ]
    before = {(name, tuple(labels.items())): value(name, **labels) for name, labels in names}

    metrics.model_call(1.5, Usage(prompt_tokens=900, completion_tokens=120, cached_tokens=640))
    metrics.model_error("ModelTimeout")
    metrics.tool_called("lookup_order", ok=True)
    metrics.tool_called("lookup_order", ok=False)
    metrics.faq_cache_lookup(hit=True)
    metrics.faq_cache_lookup(hit=False)
    metrics.faq_cache_lookup(hit=False)
    metrics.fallback_used("model_circuit_open", "faq")
    metrics.guard_blocked("prompt_injection")
    metrics.inbox_reclaimed(3)
    metrics.dead_lettered()

    moved = {
        name + str(dict(labels)): value(name, **dict(labels)) - start
        for (name, labels), start in before.items()
    }
    assert moved == {
        "kefu_model_call_seconds_count{'outcome': 'ok'}": 1,
        "kefu_model_tokens_total{'kind': 'prompt'}": 900,
        "kefu_model_tokens_total{'kind': 'completion'}": 120,
        "kefu_model_tokens_total{'kind': 'cached'}": 640,
        "kefu_model_errors_total{'error': 'ModelTimeout'}": 1,
        "kefu_tool_calls_total{'tool': 'lookup_order'}": 2,
        "kefu_tool_errors_total{'tool': 'lookup_order'}": 1,
        "kefu_faq_cache_lookups_total{'result': 'hit'}": 1,
        "kefu_faq_cache_lookups_total{'result': 'miss'}": 2,
        "kefu_fallbacks_total{'reason': 'model_circuit_open', 'answer': 'faq'}": 1,
        "kefu_guard_blocks_total{'category': 'prompt_injection'}": 1,
        "kefu_inbox_reclaimed_total{}": 3,
        "kefu_inbox_dead_lettered_total{}": 1,
    }


def test_circuit_breaker_state_is_read_at_scrape_time() -> None:
    now = [0.0]
    breaker = CircuitBreaker(name="ops-test-model", failure_threshold=2, cooldown=30.0, clock=lambda: now[0])
    metrics.track_breaker(breaker)
    assert value("kefu_circuit_breaker_state", breaker="ops-test-model", state="closed") == 1

    breaker.record_failure()
    breaker.record_failure()
    assert value("kefu_circuit_breaker_state", breaker="ops-test-model", state="open") == 1
    assert value("kefu_circuit_breaker_state", breaker="ops-test-model", state="closed") == 0
    assert value("kefu_circuit_breaker_opened_total", breaker="ops-test-model") == 1

    now[0] = 31.0  # cool-down over: the next request is the probe
    assert value("kefu_circuit_breaker_state", breaker="ops-test-model", state="half_open") == 1


async def test_a_metered_model_records_duration_tokens_and_errors() -> None:
    calls = value("kefu_model_call_seconds_count", outcome="ok")
    failed = value("kefu_model_call_seconds_count", outcome="error")
    prompt = value("kefu_model_tokens_total", kind="prompt")
    timeouts = value("kefu_model_errors_total", error="ModelTimeout")

    def answer(request: ChatRequest) -> ChatResponse:
        return ChatResponse(content="您的订单已发货。", usage=Usage(prompt_tokens=321, completion_tokens=9))

    def too_slow(request: ChatRequest) -> str:
        raise ModelTimeout("no answer within 60s")

    request = ChatRequest(messages=(ChatMessage.user("我的订单到哪了"),))
    response = await MeteredModel(FunctionModel(answer)).complete(request)
    assert response.content == "您的订单已发货。"
    with pytest.raises(ModelTimeout):
        await MeteredModel(FunctionModel(too_slow)).complete(request)

    assert value("kefu_model_call_seconds_count", outcome="ok") == calls + 1
    assert value("kefu_model_call_seconds_count", outcome="error") == failed + 1
    assert value("kefu_model_tokens_total", kind="prompt") == prompt + 321
    assert value("kefu_model_errors_total", error="ModelTimeout") == timeouts + 1


def test_a_process_without_the_gateway_serves_its_metrics() -> None:
    port = free_port()
    stop = metrics.serve_metrics(port=port)
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0)
    finally:
        stop()
    assert response.status_code == 200
    assert "# TYPE kefu_messages_sent_total counter" in response.text


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        _env_file=None, database_url=f"sqlite+aiosqlite:///{tmp_path / 'kefu.db'}", redis_url=None
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, model=SwitchableModel())) as test_client:
        yield test_client


def scrape(client: TestClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    """GET /metrics, parsed with prometheus-client's own parser: sample name -> (labels, value)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_gateway_serves_metrics_with_scheduler_and_inbox_values(client: TestClient) -> None:
    deadline = time.monotonic() + 10.0
    while True:
        samples = scrape(client)
        jobs = {labels["job"] for labels, _ in samples.get("kefu_job_last_run_timestamp_seconds", [])}
        if {"inbox_stats", "prune_sessions", "purge_audit", "release_handoffs"} <= jobs:
            break
        assert time.monotonic() < deadline, f"jobs never reported a run: {sorted(jobs)}"
        time.sleep(0.1)

    # the only process with an in-process store is its own leader
    assert samples["kefu_scheduler_leader"] == [({}, 1.0)]
    assert samples["kefu_inbox_depth"] == [({}, 0.0)]
    assert samples["kefu_inbox_dead_letters"] == [({}, 0.0)]
    ok = dict((labels["job"], v) for labels, v in samples["kefu_job_last_run_ok"])
    assert ok["inbox_stats"] == 1.0 and ok["purge_audit"] == 1.0
    for name in (
        "kefu_messages_received_total",
        "kefu_reply_latency_seconds",
        "kefu_model_tokens_total",
        "kefu_faq_cache_lookups_total",
        "kefu_circuit_breaker_state",
        "kefu_job_runs_total",
        "process_resident_memory_bytes",
    ):
        assert f"# TYPE {name} " in client.get("/metrics").text, name


def test_metrics_token_is_required_when_configured(tmp_path: Path) -> None:
    settings = load_settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'kefu.db'}",
        redis_url=None,
        metrics_token="scrape-secret",
        scheduler_enabled=False,
    )
    with TestClient(create_app(settings, model=SwitchableModel())) as client:
        assert client.get("/metrics").status_code == 401
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert right.status_code == 200 and "kefu_inbox_depth" in right.text
        assert "kefu_scheduler_leader 0.0" in right.text  # scheduler switched off in this process
