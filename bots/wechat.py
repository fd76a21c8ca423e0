"""The WeChat official account webhook: ``GET /wechat`` (URL check) and ``POST /wechat`` (messages).

Every request is checked before its body is read or parsed: the ``signature`` query parameter must sign
(KEFU_WECHAT_TOKEN, timestamp, nonce) and the timestamp must be within 300 s of our clock (WeChat does
not require the latter; it stops replays of a captured request). Answers:

- 404 while WeChat is not configured, 403 for a forged or stale request, 413 for a body over 64 KB,
  400 for a signed body that is not usable (malformed XML, missing fields, undecryptable): a signed but
  broken body is a configuration error (wrong EncodingAESKey) or a proxy mangling it, and a 400 makes it
  visible in WeChat's console instead of pretending success. Never a 500.
- Text, recognised voice and menu clicks go to the intake (deduped on MsgId, or on
  FromUserName + CreateTime + event for events) and the handler waits up to KEFU_WECHAT_PASSIVE_TIMEOUT
  (4.5 s) for the answer: in time, it is the HTTP response (encrypted in safe mode); otherwise the
  response is ``success`` and the worker sends the answer through the customer-service API.
- Pictures, unrecognised voice and other media get a fixed acknowledgement, new followers a greeting,
  at once. Unfollows and other events get ``success``.
- 503 only when the intake cannot take the message, so WeChat tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from adapters import wechat
from bots.http import BodyTooLarge, read_limited_body
from core.errors import ConfigError, KefuError
from core.intake import Accepted
from core.runtime import Runtime
from core.settings import Settings
from core.texts import text as fixed_text

log = logging.getLogger(__name__)

SUCCESS = "success"


@dataclass(frozen=True)
class Endpoint:
    """What the handler needs from the settings, built once per app."""

    token: str
    safe_mode: wechat.SafeMode | None
    passive_timeout: float


def enabled(settings: Settings) -> bool:
    """WeChat is on when the AppID, AppSecret and Token are all set."""
    return settings.wechat_enabled


def safe_mode(settings: Settings) -> wechat.SafeMode | None:
    """Safe-mode crypto when KEFU_WECHAT_AES_KEY is set; ConfigError for a malformed key."""
    if settings.wechat_aes_key is None:
        return None
    assert settings.wechat_token is not None and settings.wechat_appid is not None
    previous = settings.wechat_aes_key_previous
    try:
        return wechat.SafeMode(
            token=settings.wechat_token.get_secret_value(),
            appid=settings.wechat_appid,
            aes_key=settings.wechat_aes_key.get_secret_value(),
            previous_aes_key=previous.get_secret_value() if previous else None,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def build_sender(settings: Settings, runtime: Runtime) -> wechat.WeChatSender:
    """The worker's side: the customer-service API with the shared access_token."""
    assert settings.wechat_appid is not None and settings.wechat_secret is not None
    safe_mode(settings)  # a malformed EncodingAESKey stops the start-up, not the first message
    api = wechat.WeChatApi(
        appid=settings.wechat_appid,
        secret=settings.wechat_secret.get_secret_value(),
        store=runtime.store,
        api_base=settings.wechat_api_base,
    )
    return wechat.WeChatSender(api=api, store=runtime.store)


def _endpoint(request: Request) -> Endpoint | None:
    settings: Settings = request.app.state.settings
    if not enabled(settings):
        return None
    endpoint: Endpoint | None = getattr(request.app.state, "wechat_endpoint", None)
    if endpoint is None:
        assert settings.wechat_token is not None
        endpoint = Endpoint(
            token=settings.wechat_token.get_secret_value(),
            safe_mode=safe_mode(settings),
            passive_timeout=settings.wechat_passive_timeout,
        )
        request.app.state.wechat_endpoint = endpoint
    return endpoint


def _check(request: Request, endpoint: Endpoint) -> None:
    query = request.query_params
    wechat.check_request(
        token=endpoint.token,
        signature=query.get("signature"),
        timestamp=query.get("timestamp"),
        nonce=query.get("nonce"),
    )


def _refuse(request: Request, error: wechat.RequestRejected) -> Response:
    client = request.client.host if request.client else "?"
    log.warning("refused a /wechat request from %s: %s", client, error)
    return PlainTextResponse("forbidden" if error.status == 403 else "bad request", status_code=error.status)


async def verify_url(request: Request) -> Response:
    """The URL check WeChat runs when the server address is saved: echo ``echostr``."""
    endpoint = _endpoint(request)
    if endpoint is None:
        return PlainTextResponse("not found", status_code=404)
    try:
        _check(request, endpoint)
    except wechat.RequestRejected as error:
        return _refuse(request, error)
    echostr = request.query_params.get("echostr")
    if echostr is None:
        return PlainTextResponse("bad request", status_code=400)
    log.info("WeChat server URL verified")
    return PlainTextResponse(echostr)


async def receive(request: Request) -> Response:
    """A message or event pushed by WeChat."""
    endpoint = _endpoint(request)
    if endpoint is None:
        return PlainTextResponse("not found", status_code=404)
    # Both deadlines start now: WeChat's 5 seconds are counted from its request.
    deadline = asyncio.get_running_loop().time() + endpoint.passive_timeout
    passive_until = time.time() + endpoint.passive_timeout
    try:
        _check(request, endpoint)
        try:
            body = await read_limited_body(request, wechat.MAX_BODY_BYTES)
        except BodyTooLarge:
            log.warning("refused a /wechat request: body over %d bytes", wechat.MAX_BODY_BYTES)
            return PlainTextResponse("payload too large", status_code=413)
        except ClientDisconnect:
            return PlainTextResponse("bad request", status_code=400)
        fields, key_index = _open(request, endpoint, body)
        wechat.check_fields(fields)
    except wechat.RequestRejected as error:
        return _refuse(request, error)
    except Exception:
        # Signed but unreadable in a way the checks above did not foresee: still the sender's problem.
        log.error("could not read a signed /wechat request", exc_info=True)
        return PlainTextResponse("bad request", status_code=400)
    runtime: Runtime = request.app.state.runtime
    try:
        text = await _answer(runtime, endpoint, fields, deadline=deadline, passive_until=passive_until)
    except _IntakeFailed:
        return PlainTextResponse("unavailable", status_code=503)
    except Exception:
        # Accepted messages are answered by the worker through the API, whatever happened here.
        log.error("WeChat webhook failed after accepting the message", exc_info=True)
        return PlainTextResponse(SUCCESS)
    if text is None:
        return PlainTextResponse(SUCCESS)
    xml = wechat.passive_text_xml(
        openid=str(fields["FromUserName"]), account=str(fields["ToUserName"]), content=text
    )
    if endpoint.safe_mode is not None and request.query_params.get("encrypt_type") == "aes":
        nonce = request.query_params.get("nonce", "")
        xml = endpoint.safe_mode.encrypt(
            xml, nonce=nonce, timestamp=str(int(time.time())), key_index=key_index
        )
    return Response(xml, media_type="application/xml")


def _open(request: Request, endpoint: Endpoint, body: bytes) -> tuple[wechat.Fields, int]:
    """The message fields, decrypted in safe mode, and the index of the key that opened them."""
    query = request.query_params
    if query.get("encrypt_type", "raw") != "aes":
        return wechat.parse_xml(body), 0
    if endpoint.safe_mode is None:
        log.error("WeChat sent a safe-mode message but KEFU_WECHAT_AES_KEY is not set")
        raise wechat.BadRequest("safe mode without KEFU_WECHAT_AES_KEY")
    envelope = wechat.parse_xml(body)
    opened = endpoint.safe_mode.decrypt(
        envelope,
        msg_signature=query.get("msg_signature"),
        timestamp=query.get("timestamp", ""),
        nonce=query.get("nonce", ""),
    )
    return wechat.parse_xml(opened.xml), opened.key_index


class _IntakeFailed(Exception):
    pass


async def _answer(
    runtime: Runtime, endpoint: Endpoint, fields: wechat.Fields, *, deadline: float, passive_until: float
) -> str | None:
    """The passive reply text, or None for ``success``."""
    openid = str(fields["FromUserName"])
    canned = wechat.canned_reply(fields)
    if canned is not None:
        await wechat.open_window(runtime.store, openid)
        return fixed_text(canned, "zh")
    message = wechat.to_inbound(fields, passive_until=passive_until)
    if message is None:
        log.debug("WeChat %s ignored", fields.get("Event") or fields.get("MsgType"))
        return None
    try:
        accepted = await runtime.intake.accept(message)
    except (KefuError, OSError) as exc:
        log.error("could not accept a WeChat message; WeChat will retry", exc_info=True)
        raise _IntakeFailed from exc
    if accepted is Accepted.LIMITED:
        return None  # over the rate limit: neither queued nor answered
    if accepted is Accepted.NEW and wechat.opens_window(fields):
        await wechat.open_window(runtime.store, openid)
    # A retry of a message still being answered waits too: it may return the answer if it is first.
    return await wechat.Handoff(runtime.store).wait_passive(message.message_id, deadline=deadline)


async def wechat_route(request: Request) -> Response:
    """``GET|POST /wechat``."""
    if request.method == "GET":
        return await verify_url(request)
    return await receive(request)


routes: list[BaseRoute] = [Route("/wechat", wechat_route, methods=["GET", "POST"])]
