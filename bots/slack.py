"""Slack: the Events API route ``POST /slack/events``, Socket Mode, and the reply sender.

Both transports do the same three things, in order: check that the event is Slack's (the request
signature; Socket Mode's connection is authenticated by the ``xapp-`` token), put the customer message
in kefu's durable inbox through the intake (which dedupes retries and the message/app_mention pair in
the shared store), and only then acknowledge. Answers are produced by the worker, never by a
fire-and-forget task in the request, so an event Slack saw acknowledged survives a crash.

Responses of ``POST /slack/events``: 200 (accepted, duplicate or not answered), 401 forged or stale
signature, 400 malformed body, 413 body over :data:`MAX_BODY_BYTES`, 404 when Slack's HTTP mode is not
configured, 503 when the inbox cannot take the event (Slack retries it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Collection, Coroutine
from typing import Any

from slack_sdk.signature import SignatureVerifier
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.async_client import AsyncBaseSocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from adapters import slack as adapter
from bots.http import BodyTooLarge, read_limited_body
from core.intake import Accepted, Intake
from core.runtime import Runtime
from core.settings import Settings

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 512 * 1024
"""Event payloads are a few KB; a 40,000-character message with blocks stays well below this."""
MAX_CLOCK_SKEW = 300
"""Seconds a request timestamp may be off (Slack's rule; older requests may be replays)."""

_NO_RETRY = {"X-Slack-No-Retry": "1"}
"""On answers a retry cannot change (malformed, oversized), so Slack does not resend."""


def enabled(settings: Settings) -> bool:
    """Slack is on when the bot token and a signing secret or app token are set."""
    return settings.slack_enabled


def build_sender(settings: Settings, runtime: Runtime) -> adapter.SlackSender:
    """The outbound side, for the worker."""
    assert settings.slack_bot_token is not None  # enabled() checked it
    client = adapter.build_client(
        token=settings.slack_bot_token.get_secret_value(), base_url=settings.slack_api_base
    )
    return adapter.SlackSender(client=client, store=runtime.store)


def background(settings: Settings, runtime: Runtime) -> list[Coroutine[Any, Any, None]]:
    """Socket Mode, when the ``xapp-`` app token is set."""
    if settings.slack_app_token is None:
        return []
    return [
        run_socket_mode(
            app_token=settings.slack_app_token.get_secret_value(),
            api_base=settings.slack_api_base,
            intake=runtime.intake,
            support_channels=frozenset(settings.slack_support_channels),
        )
    ]


# --- Events API over HTTP -------------------------------------------------------------------------------


def signature_problem(secret: str, body: bytes, timestamp: str | None, signature: str | None) -> str | None:
    """Why a request is not Slack's (None when its signature is valid and fresh)."""
    if not timestamp or not signature:
        return "missing signature headers"
    try:
        sent_at = int(timestamp)
    except ValueError:
        return "malformed timestamp"
    if abs(time.time() - sent_at) > MAX_CLOCK_SKEW:
        return "stale timestamp"
    try:
        valid = SignatureVerifier(secret).is_valid(body=body, timestamp=timestamp, signature=signature)
    except UnicodeDecodeError:  # Slack always sends UTF-8; the verifier decodes the body
        valid = False
    return None if valid else "bad signature"


async def slack_events(request: Request) -> Response:
    """``POST /slack/events``: verify, accept into the inbox, acknowledge at once."""
    settings: Settings = request.app.state.settings
    if not settings.slack_enabled or settings.slack_signing_secret is None:
        return Response("Not Found", status_code=404, media_type="text/plain")
    peer = request.client.host if request.client else "?"
    try:
        body = await read_limited_body(request, MAX_BODY_BYTES)
    except BodyTooLarge:
        log.warning("refused a Slack request: body over %d bytes", MAX_BODY_BYTES, extra={"peer": peer})
        return Response("payload too large", status_code=413, headers=_NO_RETRY, media_type="text/plain")
    except ClientDisconnect:
        return Response(status_code=400)
    problem = signature_problem(
        settings.slack_signing_secret.get_secret_value(),
        body,
        request.headers.get("x-slack-request-timestamp"),
        request.headers.get("x-slack-signature"),
    )
    if problem is not None:
        log.warning("refused a Slack request: %s", problem, extra={"peer": peer})
        return Response("invalid signature", status_code=401, media_type="text/plain")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        payload = None
    if not isinstance(payload, dict):
        log.warning("refused a signed Slack request: body is not a JSON object", extra={"peer": peer})
        return Response("malformed body", status_code=400, headers=_NO_RETRY, media_type="text/plain")

    kind = payload.get("type")
    if kind == "url_verification":
        challenge = payload.get("challenge")
        if not isinstance(challenge, str):
            return Response("malformed body", status_code=400, headers=_NO_RETRY, media_type="text/plain")
        return JSONResponse({"challenge": challenge})
    if kind == "app_rate_limited":
        log.warning("Slack is dropping events: the app exceeded its event rate limit")
        return Response(status_code=200)
    retry = request.headers.get("x-slack-retry-num")
    if retry is not None:
        log.info(
            "Slack retry %s (%s) of event %s",
            retry,
            request.headers.get("x-slack-retry-reason", "?"),
            payload.get("event_id"),
        )
    runtime: Runtime = request.app.state.runtime
    if not await _accept(runtime.intake, payload, support_channels=settings.slack_support_channels):
        return Response("try again", status_code=503, media_type="text/plain")
    return Response(status_code=200)


async def _accept(intake: Intake, payload: dict[str, Any], *, support_channels: Collection[str]) -> bool:
    """Put the event's customer message (if any) in the inbox; False when the inbox failed."""
    try:
        message = adapter.to_inbound(payload, support_channels=support_channels)
    except (ValueError, TypeError):  # TypeError: a field of an unexpected JSON type (a list "subtype")
        # A payload that passed the signature but does not fit the message model (pydantic).
        log.warning("Slack event %s could not be read", payload.get("event_id"), exc_info=True)
        return True
    if message is None:
        event = payload.get("event")
        log.debug(
            "Slack event %s not answered (%s)",
            payload.get("event_id"),
            event.get("type") if isinstance(event, dict) else payload.get("type"),
        )
        return True
    try:
        accepted = await intake.accept(message)
    except Exception:
        log.error(
            "could not queue a Slack message; Slack will retry",
            exc_info=True,
            extra={"conversation": str(message.key), "message_id": message.message_id},
        )
        return False
    if accepted is Accepted.NEW:
        log.info(
            "Slack message accepted",
            extra={"conversation": str(message.key), "message_id": message.message_id},
        )
    return True


# --- Socket Mode --------------------------------------------------------------------------------------------


async def handle_envelope(
    request: SocketModeRequest, *, intake: Intake, support_channels: Collection[str]
) -> SocketModeResponse | None:
    """The acknowledgement for one Socket Mode envelope, or None to leave it for Slack to resend.

    ``events_api`` envelopes are acknowledged only once the intake holds the message; other envelope
    types (slash commands, interactivity) are not used by kefu and are acknowledged so Slack does
    not resend them.
    """
    if request.type == "events_api":
        if request.retry_attempt:
            log.info(
                "Slack retry %s (%s) of event %s",
                request.retry_attempt,
                request.retry_reason or "?",
                request.payload.get("event_id"),
            )
        if not await _accept(intake, request.payload, support_channels=support_channels):
            return None
    else:
        log.debug("Socket Mode envelope of type %s ignored", request.type)
    return SocketModeResponse(envelope_id=request.envelope_id)


async def run_socket_mode(
    *,
    app_token: str,
    api_base: str,
    intake: Intake,
    support_channels: Collection[str],
    ping_interval: float = 5.0,
) -> None:
    """Receive events over Socket Mode until cancelled (slack_sdk reconnects by itself)."""
    # apps.connections.open is called with the app token; the base URL makes it testable.
    client = SocketModeClient(
        app_token=app_token,
        web_client=AsyncWebClient(base_url=api_base),
        ping_interval=ping_interval,
        logger=logging.getLogger("slack_sdk.socket_mode"),
    )

    async def listener(client: AsyncBaseSocketModeClient, request: SocketModeRequest) -> None:
        try:
            response = await handle_envelope(request, intake=intake, support_channels=support_channels)
            if response is not None:
                await client.send_socket_mode_response(response)
        except Exception:
            # Not acknowledged: Slack sends the envelope again.
            log.error("Socket Mode envelope %s failed", request.envelope_id, exc_info=True)

    client.socket_mode_request_listeners.append(listener)
    try:
        await client.connect()  # type: ignore[no-untyped-call]  # slack_sdk leaves it unannotated
        log.info("Slack Socket Mode connected")
        await asyncio.Event().wait()  # until cancelled at shutdown
    finally:
        await client.close()  # type: ignore[no-untyped-call]


routes: list[BaseRoute] = [Route("/slack/events", slack_events, methods=["POST"])]
