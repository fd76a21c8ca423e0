"""WeChat official account: signatures, safe mode, XML <-> InboundMessage, and the customer-service API.

Inbound (used by :mod:`bots.wechat`): :func:`signature_ok` checks the ``signature`` query parameter
(sha1 over the sorted token, timestamp and nonce, compared in constant time) before anything is parsed;
:class:`SafeMode` checks ``msg_signature`` and decrypts with the current EncodingAESKey, then with the
previous one (key rotation); :func:`parse_xml` reads the XML with xmltodict (entities refused);
:func:`to_inbound` turns text, recognised voice and menu clicks into an :class:`InboundMessage`, and
:func:`canned_reply` names the fixed answer for pictures, unrecognised voice and new followers.

Outbound: WeChat gives a request 5 seconds. An answer ready in time goes back in the HTTP response (a
"passive" reply); a slower one is acknowledged with ``success`` and sent later through
``POST /cgi-bin/message/custom/send``. :class:`Handoff` makes the webhook handler (waiting for the
answer) and :class:`WeChatSender` (the worker's side) agree through the shared store on exactly one of
the two ways per message. The customer-service API allows 5 sends in the 48 hours after a customer's
message: :class:`WeChatSender` counts them per openid in the store and splits/merges long answers into
parts of at most :data:`TEXT_LIMIT_BYTES` UTF-8 bytes within what is left. :class:`WeChatApi` is an async
httpx client (wechatpy's client is synchronous) sharing one access_token between all processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import ssl
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from xml.parsers.expat import ExpatError

import certifi
import httpx
import xmltodict
from wechatpy.crypto import WeChatCrypto
from wechatpy.exceptions import InvalidAppIdException, InvalidSignatureException

from core.delivery import ReplySender
from core.errors import DeliveryError
from core.language import detect_language
from core.messages import ConversationKey, InboundMessage, Language, Reply, ReplyDone, ReplyEvent
from core.stores.base import StateStore
from core.texts import text as fixed_text

log = logging.getLogger(__name__)

CHANNEL = "wechat"
MAX_BODY_BYTES = 64 * 1024
"""WeChat's own messages are a few KB; anything bigger is refused with 413 before parsing."""
TIMESTAMP_SKEW = 300
"""Requests whose ``timestamp`` is further than this from our clock are refused (replay protection)."""
TEXT_LIMIT_BYTES = 2048
WINDOW_SENDS = 5
WINDOW_SECONDS = 48 * 3600
TOKEN_REFRESH_EARLY = 300.0
TOKEN_ERRORS = frozenset({40001, 40014, 42001})
"""invalid credential, invalid access_token, access_token expired: refresh and retry once."""
WINDOW_EXPIRED = 45015
WINDOW_EXHAUSTED = 45047

Fields = dict[str, Any]


# --- request checks ---------------------------------------------------------------------------------


class RequestRejected(ValueError):
    """A /wechat request kefu will not process; ``status`` is the HTTP answer."""

    status = 400


class Forbidden(RequestRejected):
    """Not from WeChat: bad or missing signature, stale timestamp."""

    status = 403


class BadRequest(RequestRejected):
    """Signed, but unusable: malformed XML, missing fields, undecryptable payload."""

    status = 400


def sign(*parts: str) -> str:
    """WeChat's signature: sha1 over the parts sorted and joined."""
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()


def signature_ok(*, token: str, signature: str, timestamp: str, nonce: str) -> bool:
    """Whether ``signature`` signs (token, timestamp, nonce); constant-time comparison."""
    return hmac.compare_digest(sign(token, timestamp, nonce).encode(), signature.encode())


def check_request(
    *, token: str, signature: str | None, timestamp: str | None, nonce: str | None, now: float | None = None
) -> None:
    """Raise :class:`Forbidden` unless the query parameters prove the request comes from WeChat now."""
    if not (signature and timestamp and nonce):
        raise Forbidden("signature, timestamp or nonce missing")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise Forbidden("timestamp is not a number") from None
    skew = (time.time() if now is None else now) - sent_at
    if abs(skew) > TIMESTAMP_SKEW:
        raise Forbidden(f"timestamp is {skew:+.0f} s off (more than {TIMESTAMP_SKEW} s; check the clock)")
    if not signature_ok(token=token, signature=signature, timestamp=timestamp, nonce=nonce):
        raise Forbidden("signature does not match KEFU_WECHAT_TOKEN")


def parse_xml(body: bytes | str) -> Fields:
    """The children of the ``<xml>`` root; :class:`BadRequest` for anything else.

    xmltodict >= 1.0.1 refuses entity declarations (no billion laughs, no external entities).
    """
    try:
        document = xmltodict.parse(body)
    except (ExpatError, ValueError) as exc:
        raise BadRequest(f"malformed XML: {exc}") from exc
    root = document.get("xml") if isinstance(document, dict) else None
    if not isinstance(root, dict):
        raise BadRequest("XML has no <xml> root with children")
    return root


def check_fields(fields: Fields) -> None:
    """Every message and event names its sender and type."""
    for name in ("FromUserName", "ToUserName", "MsgType"):
        if not isinstance(fields.get(name), str) or not fields[name]:
            raise BadRequest(f"<{name}> missing")


class SafeMode:
    """Safe-mode crypto with the current EncodingAESKey and, during a rotation, the previous one."""

    def __init__(self, *, token: str, appid: str, aes_key: str, previous_aes_key: str | None = None) -> None:
        self._token = token
        self._cryptos = [_crypto(token, aes_key, appid, "KEFU_WECHAT_AES_KEY")]
        if previous_aes_key:
            self._cryptos.append(_crypto(token, previous_aes_key, appid, "KEFU_WECHAT_AES_KEY_PREVIOUS"))

    def decrypt(
        self, envelope: Fields, *, msg_signature: str | None, timestamp: str, nonce: str
    ) -> DecryptedXml:
        """The inner XML of a safe-mode POST body, and which key opened it."""
        encrypted = envelope.get("Encrypt")
        if not isinstance(encrypted, str) or not encrypted:
            raise BadRequest("<Encrypt> missing")
        expected = sign(self._token, timestamp, nonce, encrypted)
        if not msg_signature or not hmac.compare_digest(expected.encode(), msg_signature.encode()):
            raise Forbidden("msg_signature does not match")
        for index, crypto in enumerate(self._cryptos):
            try:
                xml = crypto.decrypt_message({"Encrypt": encrypted}, msg_signature, timestamp, nonce)
            except (InvalidAppIdException, InvalidSignatureException, ValueError, struct.error, IndexError):
                # A wrong key yields garbage: bad padding, bad length or a foreign AppID at the end.
                continue
            if index > 0:
                log.info("message decrypted with the previous EncodingAESKey (rotation in progress)")
            return DecryptedXml(xml=xml, key_index=index)
        raise BadRequest("cannot decrypt with KEFU_WECHAT_AES_KEY or KEFU_WECHAT_AES_KEY_PREVIOUS")

    def encrypt(self, xml: str, *, nonce: str, timestamp: str, key_index: int = 0) -> str:
        """The encrypted reply envelope, with the key that opened the request (WeChat used that one)."""
        return str(self._cryptos[key_index].encrypt_message(xml, nonce, timestamp))


@dataclass(frozen=True)
class DecryptedXml:
    xml: str
    key_index: int


def _crypto(token: str, aes_key: str, appid: str, variable: str) -> WeChatCrypto:
    if len(aes_key) != 43:
        raise ValueError(f"{variable} must be the 43-character EncodingAESKey")
    try:
        return WeChatCrypto(token, aes_key, appid)
    except (ValueError, AssertionError) as exc:  # wechatpy asserts the decoded key is 32 bytes
        raise ValueError(f"{variable} is not a valid EncodingAESKey") from exc


# --- translation --------------------------------------------------------------------------------------


def _text(fields: Fields, name: str) -> str:
    value = fields.get(name)
    return value if isinstance(value, str) else ""


def event_id(fields: Fields) -> str:
    """Dedupe id of an event (events carry no MsgId): sender + CreateTime + event (+ key)."""
    parts = [_text(fields, "FromUserName"), _text(fields, "CreateTime"), _text(fields, "Event").lower()]
    if key := _text(fields, "EventKey"):
        parts.append(key)
    return "ev:" + ":".join(parts)


def to_inbound(fields: Fields, *, passive_until: float | None = None) -> InboundMessage | None:
    """The customer message the engine should answer, or None (handled by a fixed reply, or ignored).

    Text, voice with WeChat's ``Recognition`` text, and custom-menu CLICK events (the ``EventKey`` as
    text). ``passive_until`` (epoch seconds) is when the webhook stops waiting for the answer; it rides
    in ``extras`` to the sender.
    """
    openid = _text(fields, "FromUserName")
    msg_type = _text(fields, "MsgType").lower()
    extras: dict[str, Any] = {"openid": openid, "account": _text(fields, "ToUserName"), "msg_type": msg_type}
    if passive_until is not None:
        extras["passive_until"] = passive_until
    language: Language = "zh"
    if msg_type == "text":
        text = _text(fields, "Content")
        language = detect_language(text) if text.strip() else "zh"
    elif msg_type == "voice":
        text = _text(fields, "Recognition").strip()
        if not text:
            return None
        language = detect_language(text)
        extras["voice"] = True
    elif msg_type == "event" and _text(fields, "Event").upper() == "CLICK":
        text = _text(fields, "EventKey")
        extras["event"] = "CLICK"
        extras["event_key"] = text
    else:
        return None
    message_id = _text(fields, "MsgId") or event_id(fields)
    return InboundMessage(
        key=ConversationKey(channel=CHANNEL, chat_id=openid),
        user_id=openid,
        message_id=message_id,
        text=text,
        language=language,
        extras=extras,
    )


_UNSUPPORTED = frozenset({"video", "shortvideo", "location", "link", "file", "music"})


def canned_reply(fields: Fields) -> str | None:
    """Name of the fixed text (core.texts) answering this message at once, or None."""
    msg_type = _text(fields, "MsgType").lower()
    if msg_type == "image":
        return "wechat_image_received"
    if msg_type == "voice" and not _text(fields, "Recognition").strip():
        return "wechat_voice_unrecognized"
    if msg_type in _UNSUPPORTED:
        return "wechat_unsupported"
    if msg_type == "event" and _text(fields, "Event").lower() == "subscribe":
        return "greeting"
    return None


def opens_window(fields: Fields) -> bool:
    """Whether WeChat opens a fresh customer-service window for this user action (not unsubscribe)."""
    msg_type = _text(fields, "MsgType").lower()
    if msg_type != "event":
        return True
    return _text(fields, "Event").lower() in {
        "subscribe",
        "click",
        "scan",
        "scancode_push",
        "scancode_waitmsg",
    }


# --- rendering and splitting ------------------------------------------------------------------------

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_MD_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\*\*(.+?)\*\*|__(.+?)__", re.S), r"\1\2"),
    (re.compile(r"`([^`\n]+)`"), r"\1"),
    (re.compile(r"^#{1,6}\s+", re.M), ""),
    (re.compile(r"\[([^\]\n]+)\]\((\S+?)\)"), r"\1 \2"),
    (re.compile(r"^[ \t]*[-*]\s+", re.M), "• "),
)
_SENTENCE_END = re.compile(r"(?<=[。！？!?；;…\n])|(?<=[.])(?=\s)")
_CLAUSE_END = re.compile(r"(?<=[，、：:])|(?<=[,])(?=\s)")


def render_text(reply: Reply) -> str:
    """Plain text for WeChat (it shows Markdown literally); buttons become a list of options."""
    text = reply.text
    for pattern, replacement in _MD_RULES:
        text = pattern.sub(replacement, text)
    if reply.buttons:
        text = text.rstrip() + "\n\n" + "\n".join(f"• {button.label}" for button in reply.buttons)
    return _XML_INVALID.sub("", text).strip()


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _cut(text: str, limit: int) -> tuple[str, str]:
    """The longest prefix of ``text`` within ``limit`` UTF-8 bytes (never splitting a character), rest."""
    head = text.encode("utf-8")[:limit].decode("utf-8", "ignore")
    return head, text[len(head) :]


def split_text(text: str, *, limit: int = TEXT_LIMIT_BYTES) -> list[str]:
    """``text`` in as few parts of at most ``limit`` UTF-8 bytes as possible.

    Parts end at sentence ends; a sentence longer than a message is cut at clause ends (commas), and a
    clause longer than that by bytes, never inside a character.
    """
    parts = [part.strip() for part in _pack(text, limit, (_SENTENCE_END, _CLAUSE_END))]
    return [part for part in parts if part]


def _pack(text: str, limit: int, boundaries: tuple[re.Pattern[str], ...]) -> list[str]:
    """Greedily merge the pieces of ``text`` (cut at ``boundaries[0]``) into parts within ``limit``."""
    if utf8_len(text) <= limit:
        return [text]
    if not boundaries:
        parts = []
        while text:
            head, text = _cut(text, limit)
            parts.append(head)
        return parts
    parts = []
    current = ""
    for piece in boundaries[0].split(text):
        if utf8_len(current + piece) <= limit:
            current += piece
            continue
        if current:
            parts.append(current)
        if utf8_len(piece) <= limit:
            current = piece
        else:
            *full, current = _pack(piece, limit, boundaries[1:])
            parts.extend(full)
    if current:
        parts.append(current)
    return parts


def fit_parts(text: str, *, max_parts: int, language: Language, limit: int = TEXT_LIMIT_BYTES) -> list[str]:
    """Split ``text`` into at most ``max_parts`` messages; what does not fit is cut with a notice."""
    parts = split_text(text, limit=limit)
    if len(parts) <= max_parts:
        return parts
    notice = fixed_text("wechat_truncated", language)
    kept = parts[: max(max_parts, 1)]
    last, _ = _cut(kept[-1], limit - utf8_len(notice))
    kept[-1] = last.rstrip() + notice
    return kept


def _cdata(value: str) -> str:
    return "<![CDATA[" + _XML_INVALID.sub("", value).replace("]]>", "]]]]><![CDATA[>") + "]]>"


def passive_text_xml(*, openid: str, account: str, content: str, create_time: int | None = None) -> str:
    """A passive text reply (the HTTP response to WeChat's POST)."""
    created = int(time.time()) if create_time is None else create_time
    return (
        f"<xml><ToUserName>{_cdata(openid)}</ToUserName><FromUserName>{_cdata(account)}</FromUserName>"
        f"<CreateTime>{created}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        f"<Content>{_cdata(content)}</Content></xml>"
    )


# --- passive reply or customer-service API: one of them, once ------------------------------------------


class Handoff:
    """Who delivers a message's answer: the webhook response (``passive``) or the API (``api``).

    The worker's sender publishes the finished answer under ``wechat:reply:{id}``. A webhook handler
    waiting for it (the first request, or a WeChat retry of it) that sees it before its deadline claims
    ``wechat:delivered:{id}`` = ``passive`` and returns it; a handler whose deadline passes claims
    ``api``. The sender waits for that decision (at most until the deadline plus a margin, in case the
    handler died) and sends through the API unless the answer went passively. ``set_if_absent`` makes the
    decision unique across processes. The store has no notifications, so both sides poll it.
    """

    PASSIVE = "passive"
    API = "api"

    def __init__(self, store: StateStore, *, poll: float = 0.05, ttl: float = 24 * 3600.0) -> None:
        self._store = store
        self._poll = poll
        self._ttl = ttl

    async def publish(self, message_id: str, text: str) -> None:
        await self._store.set(f"wechat:reply:{message_id}", text, ttl=self._ttl)

    async def decision(self, message_id: str) -> str | None:
        return await self._store.get(f"wechat:delivered:{message_id}")

    async def decide(self, message_id: str, how: str) -> bool:
        """Record ``how``; False when the decision was already taken."""
        return await self._store.set_if_absent(f"wechat:delivered:{message_id}", how, ttl=self._ttl)

    async def wait_passive(self, message_id: str, *, deadline: float) -> str | None:
        """For the webhook: the answer to return passively, or None (answer ``success``).

        ``deadline`` is on the event loop's clock.
        """
        loop = asyncio.get_running_loop()
        while True:
            if await self.decision(message_id) is not None:
                return None  # another request of the same message, or the sender, has it
            text = await self._store.get(f"wechat:reply:{message_id}")
            if text is not None:
                # A passive reply is one message: longer answers go through the API in parts.
                how = self.PASSIVE if utf8_len(text) <= TEXT_LIMIT_BYTES else self.API
                return text if await self.decide(message_id, how) and how == self.PASSIVE else None
            remaining = deadline - loop.time()
            if remaining <= 0:
                await self.decide(message_id, self.API)
                return None
            await asyncio.sleep(min(self._poll, remaining))

    async def settle(self, message_id: str, *, not_after: float | None) -> str:
        """For the sender: the decision, waiting for the webhook until ``not_after`` (epoch seconds)."""
        while True:
            decided = await self.decision(message_id)
            if decided is not None:
                return decided
            if not_after is None or time.time() >= not_after:
                if await self.decide(message_id, self.API):
                    return self.API
                continue
            await asyncio.sleep(min(self._poll, max(not_after - time.time(), 0.0)))


# --- the customer-service API ------------------------------------------------------------------------


class WeChatApiError(DeliveryError):
    """WeChat answered with a non-zero ``errcode`` (or could not be reached: errcode None)."""

    def __init__(self, message: str, *, errcode: int | None = None, errmsg: str = "") -> None:
        super().__init__(message)
        self.errcode = errcode
        self.errmsg = errmsg
        self.parts_sent = 0
        """How many parts of a split answer WeChat took before refusing the rest."""


_ERROR_HINTS = {
    40164: "this server's IP is not in the official account's IP whitelist",
    40013: "KEFU_WECHAT_APPID is wrong",
    40125: "KEFU_WECHAT_SECRET is wrong",
    WINDOW_EXPIRED: "customer-service window expired: the customer last wrote more than 48 h ago",
    WINDOW_EXHAUSTED: "customer-service window used up: 5 messages were already sent since the last "
    "customer message",
}


class WeChatApi:
    """The WeChat HTTP API with one access_token shared by every process through the store.

    The token is kept under ``wechat:access_token:{appid}`` with an expiry 5 minutes before WeChat's, so
    it is renewed early (the old one stays valid 5 minutes after a renewal, for calls in flight); renewal
    happens under a store lock and re-reads the store first, so concurrent callers (in any process) fetch
    once. A call refused with an invalid/expired token renews it (unless another caller already did) and
    is retried once. Each call uses a short-lived httpx client (with a
    shared TLS context), so nothing is left open when the gateway stops.
    """

    def __init__(
        self,
        *,
        appid: str,
        secret: str,
        store: StateStore,
        api_base: str = "https://api.weixin.qq.com/",
        timeout: float = 10.0,
        refresh_early: float = TOKEN_REFRESH_EARLY,
    ) -> None:
        self._appid = appid
        self._secret = secret
        self._store = store
        self._base = api_base if api_base.endswith("/") else api_base + "/"
        self._timeout = timeout
        self._refresh_early = refresh_early
        self._tls: ssl.SSLContext | None = None
        self.token_key = f"wechat:access_token:{appid}"

    def _client(self) -> httpx.AsyncClient:
        if self._tls is None:
            # Loading the CA bundle is the expensive part of a client: do it once.
            self._tls = ssl.create_default_context(cafile=certifi.where())
        return httpx.AsyncClient(
            base_url=self._base, timeout=self._timeout, verify=self._tls, trust_env=False
        )

    async def access_token(self, *, stale: str | None = None) -> str:
        """The shared token; ``stale`` is one WeChat just refused, to be replaced if still stored."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 30.0
        while True:
            token = await self._store.get(self.token_key)
            if token and token != stale:
                return token
            # Try the lock without queueing: callers that lose simply watch the store for the new token,
            # so a crowd of them is served as soon as the winner stores it.
            lock = self._store.lock(f"wechat:token-refresh:{self._appid}", ttl=30.0, wait=0)
            if await lock.acquire():
                try:
                    token = await self._store.get(self.token_key)
                    if token and token != stale:
                        return token  # renewed between our read and the lock
                    token, expires_in = await self._fetch_token()
                    ttl = max(expires_in - self._refresh_early, min(expires_in, 60.0))
                    await self._store.set(self.token_key, token, ttl=ttl)
                    return token
                finally:
                    await lock.release()
            if loop.time() >= give_up:
                raise WeChatApiError("no access_token: the process renewing it did not finish in 30 s")
            await asyncio.sleep(0.02)

    async def _fetch_token(self) -> tuple[str, float]:
        params = {"grant_type": "client_credential", "appid": self._appid, "secret": self._secret}
        data = await self._request("GET", "cgi-bin/token", params=params)
        token = data.get("access_token")
        if not isinstance(token, str) or not token:
            raise self._error("access_token request refused", data)
        log.info("fetched a new WeChat access_token")
        return token, float(data.get("expires_in") or 7200)

    async def call(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST ``payload`` to ``path`` with the access_token; WeChatApiError when it is refused."""
        token = await self.access_token()
        retried_token = False
        busy_retries = 2
        while True:
            data = await self._request("POST", path, params={"access_token": token}, payload=payload)
            errcode = data.get("errcode") or 0
            if errcode == 0:
                return data
            if errcode in TOKEN_ERRORS and not retried_token:
                retried_token = True
                log.info("WeChat refused the access_token (%s); renewing it", errcode)
                token = await self.access_token(stale=token)
                continue
            if errcode == -1 and busy_retries:  # "system busy": nothing was sent
                busy_retries -= 1
                await asyncio.sleep(0.5)
                continue
            raise self._error(f"{path} refused", data)

    async def send_text(self, openid: str, content: str) -> None:
        """One customer-service text message."""
        await self.call(
            "cgi-bin/message/custom/send",
            {"touser": openid, "msgtype": "text", "text": {"content": content}},
        )

    async def typing(self, openid: str, *, on: bool = True) -> None:
        """Show (or stop showing) "typing..." to the customer."""
        command = "Typing" if on else "CancelTyping"
        await self.call("cgi-bin/message/custom/typing", {"touser": openid, "command": command})

    async def _request(
        self, method: str, path: str, *, params: dict[str, str], payload: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        # Explicit UTF-8 JSON: WeChat shows \uXXXX escapes literally instead of the characters.
        body = None if payload is None else json.dumps(payload, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json; charset=utf-8"} if body is not None else None
        try:
            async with self._client() as http:
                response = await http.request(method, path, params=params, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise WeChatApiError(f"WeChat API unreachable ({path}): {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise WeChatApiError(f"WeChat API {path} answered HTTP {response.status_code}")
        try:
            data = response.json()
        except ValueError as exc:
            raise WeChatApiError(f"WeChat API {path} answered something that is not JSON") from exc
        if not isinstance(data, dict):
            raise WeChatApiError(f"WeChat API {path} answered something that is not a JSON object")
        return data

    @staticmethod
    def _error(what: str, data: dict[str, Any]) -> WeChatApiError:
        errcode = data.get("errcode")
        errmsg = str(data.get("errmsg", ""))
        hint = _ERROR_HINTS.get(errcode) if isinstance(errcode, int) else None
        text = f"{what}: errcode {errcode} {errmsg}" + (f" ({hint})" if hint else "")
        return WeChatApiError(text, errcode=errcode if isinstance(errcode, int) else None, errmsg=errmsg)


def window_key(openid: str) -> str:
    return f"wechat:window:{openid}"


async def open_window(store: StateStore, openid: str) -> None:
    """A customer message opens a fresh 48-hour window of 5 customer-service sends."""
    await store.set(window_key(openid), "0", ttl=WINDOW_SECONDS)


class WeChatSender(ReplySender):
    """Delivers answers on WeChat: passively through the webhook when in time, else through the API."""

    channel = CHANNEL

    def __init__(
        self,
        *,
        api: WeChatApi,
        store: StateStore,
        handoff: Handoff | None = None,
        handoff_margin: float = 1.0,
        typing_every: float = 10.0,
    ) -> None:
        self._api = api
        self._store = store
        self._handoff = handoff or Handoff(store)
        self._margin = handoff_margin
        self._typing_every = typing_every

    async def deliver(self, message: InboundMessage, events: AsyncIterator[ReplyEvent]) -> Reply:
        """Answer ``message``; the webhook may still be waiting to return the answer itself.

        A customer-service window that is closed or used up (45015, 45047) is logged as an error and
        not raised: retrying cannot succeed before the customer writes again, and a failing entry would
        hold back the conversation's next message, which opens a new window.
        """
        typing = asyncio.create_task(self._typing(message), name=f"wechat-typing:{message.message_id}")
        final: Reply | None = None
        try:
            async for event in events:
                if isinstance(event, ReplyDone):
                    final = event.reply
        finally:
            typing.cancel()
        if final is None:
            raise RuntimeError("engine stream ended without a reply")
        try:
            await self._answer(final, message_id=message.message_id, extras=message.extras)
        except WeChatApiError as exc:
            if exc.errcode not in (WINDOW_EXPIRED, WINDOW_EXHAUSTED):
                raise
            log.error("WeChat answer not delivered: %s", exc, exc_info=True, extra=_log_extra(message))
        return final

    async def send(self, reply: Reply) -> None:
        """Send ``reply``: an answer to a message (a notice, an apology) may still go back passively.

        Raises :class:`WeChatApiError` (a DeliveryError) when WeChat refuses it.
        """
        if reply.in_reply_to is None:
            await self._send_text(
                reply.key.chat_id, render_text(reply), reply.language, extra={"conversation": str(reply.key)}
            )
            return
        await self._answer(reply, message_id=reply.in_reply_to, extras=reply.extras)

    async def _answer(self, reply: Reply, *, message_id: str, extras: dict[str, Any]) -> None:
        """The answer to message ``message_id``: passively if the webhook takes it, else once via the API."""
        extra = {"conversation": str(reply.key), "message_id": message_id}
        text = render_text(reply)
        await self._handoff.publish(message_id, text)
        passive_until = extras.get("passive_until")
        not_after = float(passive_until) + self._margin if isinstance(passive_until, int | float) else None
        if await self._handoff.settle(message_id, not_after=not_after) == Handoff.PASSIVE:
            log.info("answer returned in the webhook response", extra=extra)
            return
        # At most once through the API, even if the worker processes the message again.
        claim = f"wechat:api:{message_id}"
        if not await self._store.set_if_absent(claim, "1", ttl=7 * 24 * 3600):
            log.info("answer already sent through the customer-service API", extra=extra)
            return
        try:
            await self._send_text(reply.key.chat_id, text, reply.language, extra=extra)
        except WeChatApiError as exc:
            if exc.parts_sent == 0 and exc.errcode not in (WINDOW_EXPIRED, WINDOW_EXHAUSTED):
                # Nothing reached the customer: a later retry may send it without repeating anything.
                await self._store.delete(claim)
            raise

    async def _send_text(self, openid: str, text: str, language: Language, *, extra: dict[str, str]) -> None:
        key = window_key(openid)
        used = int(await self._store.get(key) or 0)
        parts = fit_parts(text, max_parts=max(WINDOW_SENDS - used, 1), language=language)
        # Reserve the sends atomically: another answer to the same customer may be going out now.
        reserved = await self._store.incr(key, len(parts), ttl=WINDOW_SECONDS)
        allowed = len(parts) - max(reserved - WINDOW_SENDS, 0)
        if allowed < len(parts):
            await self._store.incr(key, -(len(parts) - max(allowed, 0)))
            if allowed <= 0:
                log.warning(
                    "WeChat answer not sent: %s",
                    _ERROR_HINTS[WINDOW_EXHAUSTED],
                    extra={**extra, "openid": openid},
                )
                raise WeChatApiError(
                    f"not sent: {_ERROR_HINTS[WINDOW_EXHAUSTED]}",
                    errcode=WINDOW_EXHAUSTED,
                    errmsg="local count",
                )
            parts = fit_parts(text, max_parts=allowed, language=language)
        if len(parts) > 1:
            log.info("long answer sent in %d messages", len(parts), extra=extra)
        sent = 0
        try:
            for part in parts:
                await self._api.send_text(openid, part)
                sent += 1
        except WeChatApiError as exc:
            exc.parts_sent = sent
            if exc.errcode == WINDOW_EXPIRED:
                await self._store.delete(key)
            elif exc.errcode == WINDOW_EXHAUSTED:
                await self._store.set(
                    key, str(WINDOW_SENDS), ttl=await self._store.ttl(key) or WINDOW_SECONDS
                )
            else:
                await self._store.incr(key, sent - len(parts))
            log.warning(
                "WeChat refused the answer after %d of %d messages: %s",
                sent,
                len(parts),
                exc,
                extra={**extra, "openid": openid, "errcode": str(exc.errcode)},
            )
            raise

    async def _typing(self, message: InboundMessage) -> None:
        """Best effort "typing..." once the webhook has stopped waiting, repeated while the model works."""
        passive_until = message.extras.get("passive_until")
        if isinstance(passive_until, int | float):
            await asyncio.sleep(max(float(passive_until) - time.time(), 0.0))
        while True:
            try:
                await self._api.typing(message.key.chat_id)
            except DeliveryError as exc:
                log.debug("typing indicator not shown: %s", exc, extra=_log_extra(message))
                return
            await asyncio.sleep(self._typing_every)


def _log_extra(message: InboundMessage) -> dict[str, str]:
    return {"conversation": str(message.key), "message_id": message.message_id}
