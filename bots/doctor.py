"""``kefu check``: what this configuration turns on and whether its dependencies answer.

Each check gives one line. A ``fail`` (database unreachable, Redis configured but down, model server
unreachable or model not loadable) makes ``kefu check`` exit 1; ``warn`` lines are worth reading but do
not stop a start. The doctor reads and never writes: it neither creates nor migrates the database.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from core.db.database import Database, sqlite_path
from core.db.migrate import current_revision, head_revision
from core.errors import KefuError
from core.llm.base import ChatModel
from core.llm.factory import build_model
from core.settings import Settings
from core.stores.factory import build_store

Status = Literal["ok", "on", "off", "info", "warn", "fail"]

CHECK_TIMEOUT = 10.0
MODEL_TIMEOUT = 60.0
"""Loading an embedded model from disk can take a while on a cold cache."""


@dataclass(frozen=True)
class Finding:
    """One line of the report."""

    status: Status
    name: str
    summary: str

    def render(self) -> str:
        status = self.status.upper() if self.status == "fail" else self.status
        return f"  {status:<5} {self.name:<9} {self.summary}"


def platform_findings(settings: Settings) -> list[Finding]:
    """Which platforms the credentials switch on, and half-done configurations."""
    found: list[Finding] = []
    if settings.telegram_enabled:
        mode = settings.telegram_mode
        if mode == "webhook" and settings.telegram_webhook_secret is None:
            found.append(
                Finding(
                    "warn",
                    "telegram",
                    "on (webhook) without KEFU_TELEGRAM_WEBHOOK_SECRET: webhook calls cannot be verified",
                )
            )
        else:
            found.append(Finding("on", "telegram", f"on ({mode})"))
    else:
        found.append(Finding("off", "telegram", "off (set KEFU_TELEGRAM_TOKEN)"))

    if settings.slack_enabled:
        transport = "Socket Mode" if settings.slack_app_token is not None else "Events API"
        found.append(Finding("on", "slack", f"on ({transport})"))
    elif settings.slack_bot_token is not None:
        found.append(
            Finding(
                "warn",
                "slack",
                "off: KEFU_SLACK_BOT_TOKEN is set but neither KEFU_SLACK_SIGNING_SECRET "
                "nor KEFU_SLACK_APP_TOKEN",
            )
        )
    else:
        found.append(
            Finding(
                "off", "slack", "off (set KEFU_SLACK_BOT_TOKEN and KEFU_SLACK_SIGNING_SECRET or _APP_TOKEN)"
            )
        )

    if settings.wechat_enabled:
        safe = "safe mode" if settings.wechat_aes_key is not None else "plaintext mode"
        found.append(Finding("on", "wechat", f"on ({safe})"))
    elif settings.wechat_appid or settings.wechat_secret or settings.wechat_token:
        missing = [
            name
            for name, value in (
                ("KEFU_WECHAT_APPID", settings.wechat_appid),
                ("KEFU_WECHAT_SECRET", settings.wechat_secret),
                ("KEFU_WECHAT_TOKEN", settings.wechat_token),
            )
            if not value
        ]
        found.append(Finding("warn", "wechat", "off: missing " + ", ".join(missing)))
    else:
        found.append(
            Finding("off", "wechat", "off (set KEFU_WECHAT_APPID, KEFU_WECHAT_SECRET, KEFU_WECHAT_TOKEN)")
        )
    found.append(Finding("on", "web chat", "on (GET / on the gateway)"))
    return found


async def database_finding(settings: Settings) -> Finding:
    """Whether the database answers and its schema is current."""
    path = sqlite_path(settings.database_url)
    if path is not None and not path.exists():
        return Finding("ok", "database", f"SQLite file {path} does not exist yet; created on first start")
    db = Database(url=settings.database_url)
    try:
        await asyncio.wait_for(db.check(), timeout=CHECK_TIMEOUT)
    except TimeoutError:
        return Finding("fail", "database", f"{db.safe_url} did not answer within {CHECK_TIMEOUT:g}s")
    except KefuError as exc:
        return Finding("fail", "database", str(exc))
    finally:
        await db.aclose()
    head = head_revision()
    try:
        current = await current_revision(settings.database_url)
    except KefuError as exc:
        return Finding("warn", "database", f"{db.safe_url} answers, but {exc}")
    if current == head:
        return Finding("ok", "database", f"{db.safe_url} (schema at {head})")
    hint = "applied at start" if settings.auto_migrate else "run `kefu db upgrade`"
    return Finding(
        "warn",
        "database",
        f"{db.safe_url} answers; schema at {current or 'nothing'}, code needs {head} ({hint})",
    )


async def redis_finding(settings: Settings) -> Finding:
    """Whether the shared store answers (or that there is none)."""
    if not settings.redis_url:
        return Finding("info", "redis", "in-process (KEFU_REDIS_URL unset): run one kefu process only")
    try:
        async with build_store(redis_url=settings.redis_url) as store:
            reachable = await asyncio.wait_for(store.ping(), timeout=CHECK_TIMEOUT)
    except (KefuError, OSError, TimeoutError) as exc:
        return Finding("fail", "redis", f"unreachable: {exc}")
    if not reachable:
        return Finding("fail", "redis", "unreachable (KEFU_REDIS_URL)")
    return Finding("ok", "redis", "reachable")


async def model_findings(settings: Settings, *, model: ChatModel | None = None) -> list[Finding]:
    """The backend, what it reports about the model, and its context length against KEFU_NUM_CTX."""
    try:
        chat_model = model or build_model(settings)
        async with chat_model:
            info = await asyncio.wait_for(chat_model.info(), timeout=MODEL_TIMEOUT)
    except (KefuError, TimeoutError) as exc:
        return [Finding("fail", "model", f"{settings.llm_backend}: {exc or 'timed out'}")]
    state = "loaded" if info.loaded else "not loaded"
    summary = f"{info.backend} · {info.model} · {state}"
    found = [
        Finding(
            "ok" if info.reachable else "fail",
            "model",
            summary if info.reachable else f"{summary} · unreachable",
        )
    ]
    if info.detail:
        found.append(Finding("info", "model", info.detail))
    if info.context_length is None:
        found.append(Finding("warn", "context", f"unknown; KEFU_NUM_CTX={settings.num_ctx}"))
    elif info.context_length != settings.num_ctx:
        found.append(
            Finding(
                "warn",
                "context",
                f"model context {info.context_length} differs from KEFU_NUM_CTX={settings.num_ctx}: "
                + (
                    "prompts budgeted for KEFU_NUM_CTX will be cut"
                    if info.context_length < settings.num_ctx
                    else "prompts use less than the model holds"
                ),
            )
        )
    else:
        found.append(Finding("ok", "context", f"{info.context_length} tokens = KEFU_NUM_CTX"))
    return found


async def run_checks(settings: Settings, *, model: ChatModel | None = None) -> list[Finding]:
    """Every finding, platforms first."""
    findings = platform_findings(settings)
    findings.append(await database_finding(settings))
    findings.append(await redis_finding(settings))
    findings.extend(await model_findings(settings, model=model))
    return findings
