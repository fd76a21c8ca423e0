"""Telegram: the webhook route ``POST /telegram/webhook``, long polling, and the reply sender.

Both transports do the same three things, in order: check that the update is Telegram's (the webhook's
secret token header; polling is authenticated by the bot token itself), put the customer message in
kefu's durable inbox through the intake (which dedupes redelivered updates in the shared store), and
only then acknowledge: a 2xx answer for the webhook, the next ``getUpdates`` offset for polling. Answers
are produced by the worker, never by a background task of the request, so an update Telegram saw
acknowledged survives a crash.

Responses of ``POST /telegram/webhook``: 200 (accepted, duplicate or not answered), 401 no secret token,
403 wrong secret token (or none configured), 400 malformed body, 413 body over :data:`MAX_BODY_BYTES`,
404 when Telegram is not configured, 503 when the inbox cannot take the update (Telegram retries it).

Webhook and ``getUpdates`` exclude each other: in ``polling`` mode the poller deletes the webhook first;
in ``webhook`` mode with ``KEFU_PUBLIC_URL`` set, start-up registers ``{KEFU_PUBLIC_URL}/telegram/webhook``
with the secret token.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiogram import Bot
from aiogram.exceptions import (
    ClientDecodeError,
    TelegramAPIError,
    TelegramBadRequest,
    TelegramConflictError,
    TelegramRetryAfter,
    TelegramUnauthorizedError,
)
from aiogram.methods import TelegramMethod
from aiogram.utils.token import TokenValidationError
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from adapters import telegram as adapter
from adapters.telegram_update import Update
from bots.http import BodyTooLarge, read_limited_body
from core.errors import ConfigError
from core.intake import Accepted, Intake
from core.pacing import SharedRate
from core.runtime import Runtime
from core.settings import Settings
from core.stores.base import StateStore

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/telegram/webhook"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_BODY_BYTES = 256 * 1024
"""An update with a 4096-character text and its entities is a few KB; anything near this is abuse."""
ALLOWED_UPDATES = ["message"]
"""Only new messages are answered; edits, channel posts and button callbacks are not requested."""

_SECRET_FORMAT = re.compile(r"[A-Za-z0-9_-]{1,256}")


# --- plugin contract -----------------------------------------------------------------------------


IDENTIFY_TIMEOUT = 5
"""Seconds a getMe may take: webhook calls wait for it."""
IDENTIFY_RETRY = 30.0
"""After a failed getMe, webhook calls go on without the bot's username this long before it is asked
again, so an unreachable Bot API does not cost every webhook call a request and a timeout."""


@dataclass
class _Telegram:
    """One Bot (one HTTP session) per runtime, shared by the sender, the poller and the route."""

    bot: Bot
    sender: adapter.TelegramSender
    identity: adapter.BotIdentity | None = None
    retry_at: float = 0.0
    asking: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def identify(self) -> adapter.BotIdentity | None:
        """The bot's id and username (getMe, asked once); None while Telegram cannot tell."""
        if self.identity is not None:
            return self.identity
        async with self.asking:  # concurrent webhook calls share one getMe
            if self.identity is not None or time.monotonic() < self.retry_at:
                return self.identity
            try:
                me = await self.bot.get_me(request_timeout=IDENTIFY_TIMEOUT)
            except (TelegramAPIError, ClientDecodeError):
                self.retry_at = time.monotonic() + IDENTIFY_RETRY
                log.warning("getMe failed; asking again in %.0fs", IDENTIFY_RETRY, exc_info=True)
                return None
            self.identity = adapter.BotIdentity(id=me.id, username=me.username)
            return self.identity


# One bot client per running runtime. Keyed by id() with a weak reference to check identity, because a
# runtime is unhashable and a dead runtime's id may be reused by a new one.
_instances: dict[int, tuple[weakref.ref[Runtime], _Telegram]] = {}


def _telegram(settings: Settings, runtime: Runtime) -> _Telegram:
    found = _instances.get(id(runtime))
    if found is not None and found[0]() is runtime:
        return found[1]
    assert settings.telegram_token is not None  # enabled() checked it
    try:
        bot = adapter.make_bot(
            token=settings.telegram_token.get_secret_value(), api_base=settings.telegram_api_base
        )
    except TokenValidationError as exc:
        raise ConfigError("KEFU_TELEGRAM_TOKEN is not a bot token (expected 123456789:AA...)") from exc
    # Telegram's overall limit is per bot: every worker process draws on one shared rate.
    rate = SharedRate(store=runtime.store, name=f"telegram:{bot.id}", per_second=adapter.MAX_SENDS_PER_SECOND)
    instance = _Telegram(bot=bot, sender=adapter.TelegramSender(bot=bot, overall=rate.wait))
    _instances[id(runtime)] = (weakref.ref(runtime), instance)
    return instance


def enabled(settings: Settings) -> bool:
    """Telegram is on when the bot token is set."""
    return settings.telegram_enabled


def build_sender(settings: Settings, runtime: Runtime) -> adapter.TelegramSender:
    """The outbound side, for the worker."""
    return _telegram(settings, runtime).sender


def background(settings: Settings, runtime: Runtime) -> list[Coroutine[Any, Any, None]]:
    """The poller (polling mode) or the one-shot webhook registration.

    The HTTP session is closed by the sender's ``aclose`` once the worker has finished.
    """
    telegram = _telegram(settings, runtime)
    tasks: list[Coroutine[Any, Any, None]] = []
    if settings.telegram_mode == "polling":
        tasks.append(Poller(bot=telegram.bot, intake=runtime.intake, store=runtime.store).run())
        return tasks
    secret = settings.telegram_webhook_secret
    if secret is None or not _SECRET_FORMAT.fullmatch(secret.get_secret_value()):
        # Fail closed: the route refuses every call rather than accept unauthenticated updates.
        log.error(
            "Telegram webhook mode needs KEFU_TELEGRAM_WEBHOOK_SECRET (1-256 characters of A-Z, a-z, "
            "0-9, _ and -); webhook calls are refused until it is set (or use KEFU_TELEGRAM_MODE=polling)"
        )
    elif settings.public_url:
        url = settings.public_url.rstrip("/") + WEBHOOK_PATH
        tasks.append(register_webhook(telegram, url=url, secret=secret.get_secret_value()))
    else:
        log.info(
            "Telegram webhook mode without KEFU_PUBLIC_URL: register %s with setWebhook yourself",
            WEBHOOK_PATH,
        )
    return tasks


# --- webhook -------------------------------------------------------------------------------------


def _plain(text: str, status: int) -> Response:
    return Response(text, status_code=status, media_type="text/plain")


async def telegram_webhook(request: Request) -> Response:
    """``POST /telegram/webhook``: check the secret token, accept into the inbox, answer 200 at once."""
    settings: Settings = request.app.state.settings
    if not settings.telegram_enabled:
        return _plain("Not Found", 404)
    peer = request.client.host if request.client else "?"
    expected = settings.telegram_webhook_secret
    given = request.headers.get(SECRET_HEADER)
    if expected is None:
        log.error("Telegram webhook call from %s refused: KEFU_TELEGRAM_WEBHOOK_SECRET is not set", peer)
        return _plain("Forbidden", 403)
    if not given:
        log.warning("Telegram webhook call from %s without the secret token header", peer)
        return _plain("Unauthorized", 401)
    # Headers arrive as latin-1; compare bytes so any header value is safe to compare.
    if not hmac.compare_digest(given.encode("latin-1"), expected.get_secret_value().encode("utf-8")):
        log.warning("Telegram webhook call from %s with a wrong secret token", peer)
        return _plain("Forbidden", 403)
    try:
        body = await read_limited_body(request, MAX_BODY_BYTES)
    except BodyTooLarge:
        log.warning("Telegram webhook body from %s over %d bytes refused", peer, MAX_BODY_BYTES)
        return _plain("Payload Too Large", 413)
    except ClientDisconnect:
        return _plain("Bad Request", 400)
    runtime: Runtime = request.app.state.runtime
    telegram = _telegram(settings, runtime)
    try:
        update = Update.model_validate_json(body)
    except ValidationError:
        log.warning("Telegram webhook body from %s is not an update", peer)
        return _plain("Bad Request", 400)
    identity = await telegram.identify()
    if identity is None:
        message = update.message
        if message is not None and message.chat.type != "private":
            # Without the bot's username a mention cannot be recognised: let Telegram retry.
            log.warning("bot username unknown; group update %d left for Telegram to resend", update.update_id)
            return _plain("Service Unavailable", 503)
        identity = adapter.BotIdentity(id=telegram.bot.id)
    try:
        accepted = await _accept(runtime.intake, update, identity)
    except Exception:
        log.error(
            "could not accept Telegram update %d; Telegram will resend it", update.update_id, exc_info=True
        )
        return _plain("Service Unavailable", 503)
    log.debug("Telegram update %d: %s", update.update_id, accepted or "not answered")
    return Response(status_code=200)


async def _accept(intake: Intake, update: Update, identity: adapter.BotIdentity) -> Accepted | None:
    message = adapter.to_inbound(update, bot=identity)
    if message is None:
        return None
    return await intake.accept(message)


async def register_webhook(
    telegram: _Telegram, *, url: str, secret: str, retry_delay: float = 2.0, max_delay: float = 300.0
) -> None:
    """Point Telegram at ``url`` with ``secret`` (setWebhook); retries until Telegram takes it."""
    delay = retry_delay
    while True:
        try:
            await telegram.bot.set_webhook(
                url=url, secret_token=secret, allowed_updates=ALLOWED_UPDATES, drop_pending_updates=False
            )
        except TelegramRetryAfter as exc:
            await asyncio.sleep(exc.retry_after)
            continue
        except (TelegramBadRequest, TelegramUnauthorizedError) as exc:
            # A wrong URL (not HTTPS, unreachable port) or token: retrying cannot fix it.
            log.error("Telegram refused the webhook %s: %s", url, exc.message)
            return
        except (TelegramAPIError, ClientDecodeError) as exc:
            log.warning("could not register the Telegram webhook (%s); retrying in %.0fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
            continue
        log.info("Telegram webhook registered at %s", url)
        break
    await telegram.identify()  # so the first group message needs no getMe round trip


# --- long polling --------------------------------------------------------------------------------


class GetRawUpdates(TelegramMethod[list[dict[str, Any]]]):
    """``getUpdates`` returning the updates unparsed.

    aiogram's ``bot.get_updates`` parses the whole batch at once: a single update it cannot read would
    fail every call and stop the bot for good. Each update is parsed on its own instead.
    """

    __returning__ = list[dict[str, Any]]
    __api_method__ = "getUpdates"

    offset: int | None = None
    limit: int | None = None
    timeout: int | None = None
    allowed_updates: list[str] | None = None


class Poller:
    """Long polling: each update goes into the inbox BEFORE the next offset confirms it to Telegram.

    Only one process of a deployment polls (a lock in the shared store; Telegram answers 409 to a
    second consumer). Failures back off and retry; an update that cannot be read is logged and skipped;
    when the inbox refuses an update, the offset stays put so Telegram hands it out again.
    """

    def __init__(
        self,
        *,
        bot: Bot,
        intake: Intake,
        store: StateStore,
        timeout: int = 25,
        retry_delay: float = 1.0,
        max_delay: float = 60.0,
        lock_ttl: float = 30.0,
    ) -> None:
        self._bot = bot
        self._intake = intake
        self._store = store
        self._timeout = timeout
        self._retry_delay = retry_delay
        self._max_delay = max_delay
        self._lock_ttl = lock_ttl
        self._failures = 0
        self.offset: int | None = None

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            try:
                lock = self._store.lock(f"telegram:poller:{self._bot.id}", ttl=self._lock_ttl, wait=None)
                async with lock:
                    identity = await self._prepare()
                    log.info("polling Telegram for updates as @%s", identity.username)
                    while not lock.lost:
                        await self.poll_once(identity)
                log.warning("lost the Telegram polling lock; waiting to take it again")
            except Exception:
                log.error("Telegram poller failed; restarting", exc_info=True)
                await self._pause()

    async def _prepare(self) -> adapter.BotIdentity:
        # A webhook makes getUpdates fail with 409; pending updates are kept for the poller.
        await self._bot.delete_webhook(drop_pending_updates=False)
        me = await self._bot.get_me()
        self._failures = 0
        return adapter.BotIdentity(id=me.id, username=me.username)

    async def _pause(self, seconds: float | None = None) -> None:
        self._failures += 1
        if seconds is None:
            seconds = min(self._retry_delay * 2 ** (self._failures - 1), self._max_delay)
        await asyncio.sleep(seconds)

    async def poll_once(self, identity: adapter.BotIdentity) -> None:
        """One getUpdates round: fetch, hand each update to the intake, advance the offset."""
        method = GetRawUpdates(offset=self.offset, timeout=self._timeout, allowed_updates=ALLOWED_UPDATES)
        try:
            batch = await self._bot(method, request_timeout=int(self._bot.session.timeout + self._timeout))
        except TelegramRetryAfter as exc:
            await self._pause(exc.retry_after)
            return
        except TelegramConflictError as exc:
            log.warning("Telegram refused getUpdates: %s", exc.message)
            if "webhook" in exc.message.lower():
                await self._bot.delete_webhook(drop_pending_updates=False)
            await self._pause()
            return
        except (TelegramAPIError, ClientDecodeError) as exc:
            log.warning("getUpdates failed: %s", exc)
            await self._pause()
            return
        self._failures = 0
        for item in batch:
            update_id = item.get("update_id")
            if not isinstance(update_id, int):
                log.error("Telegram sent an update without update_id; skipped")
                continue
            try:
                update = Update.model_validate(item)
                message = adapter.to_inbound(update, bot=identity)
            except Exception:
                log.error("Telegram update %d could not be read; skipped", update_id, exc_info=True)
                self.offset = update_id + 1
                continue
            if message is not None:
                try:
                    await self._intake.accept(message)
                except Exception:
                    log.error(
                        "could not accept Telegram update %d; fetching it again", update_id, exc_info=True
                    )
                    await self._pause()
                    return
            self.offset = update_id + 1


routes: list[BaseRoute] = [Route(WEBHOOK_PATH, telegram_webhook, methods=["POST"])]
