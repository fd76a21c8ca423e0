"""Slack: Events API payloads -> InboundMessage, Reply -> ``chat.postMessage`` / ``chat.update``.

Which events are answered:

- ``message`` in a direct message (``channel_type == "im"``);
- ``message`` in a support channel (``support_channels``): a top-level message starts a conversation
  answered in its thread, and replies in that thread continue it without a mention;
- ``app_mention`` anywhere else (``app_mention`` never fires in DMs).

Messages from bots (``bot_id``, subtype ``bot_message``; our own and others', or bots would talk to each
other forever), edits, deletions and other subtypes are never answered.

One conversation is one thread: ``ConversationKey("slack", channel id, thread root ts)``; a DM outside a
thread has no thread id. The message id is ``"{channel}:{ts}"``: a message in a support channel that
mentions the bot arrives twice (``message`` and ``app_mention``, different ``event_id``), and Slack's
retries repeat the same message, so the intake's shared dedupe answers each message once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

import aiohttp
from slack_sdk.errors import SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from core.delivery import ReplySender
from core.errors import DeliveryError
from core.language import detect_language
from core.messages import (
    ConversationKey,
    InboundMessage,
    Reply,
    ReplyDelta,
    ReplyDone,
    ReplyEvent,
)
from core.stores.base import StateStore

log = logging.getLogger(__name__)

CHANNEL = "slack"

SLACK_TEXT_LIMIT = 40_000
"""Slack truncates a message's ``text`` beyond this."""
MESSAGE_LIMIT = 3_900
"""Characters per posted message: Slack advises keeping ``text`` under 4,000 for readability."""
UPDATE_INTERVAL = 1.0
"""Seconds between ``chat.update`` calls while an answer streams (Slack allows ~1 write/s per channel)."""
POSTED_TTL = 24 * 3600.0

# Subtypes that are still a person writing: a file with a caption, a thread reply also sent to the channel.
_USER_SUBTYPES = frozenset({"file_share", "thread_broadcast"})
_DM_CHANNEL_TYPES = frozenset({"im"})

Payload = Mapping[str, Any]


# --- inbound -------------------------------------------------------------------------------------------

_MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|([^>]*))?>")
_LEADING_MENTION = re.compile(r"^\s*<@[UW][A-Z0-9]+(?:\|[^>]*)?>[\s,:]*")
_CONTROL = re.compile(r"<([^<>]+)>")


def bot_user_ids(payload: Payload) -> set[str]:
    """The bot users this event was delivered for (``authorizations``), i.e. kefu's own user ids."""
    ids: set[str] = set()
    for auth in payload.get("authorizations") or ():
        if isinstance(auth, Mapping) and auth.get("is_bot") and isinstance(auth.get("user_id"), str):
            ids.add(auth["user_id"])
    return ids


def plain_text(text: str, *, bot_ids: Collection[str] = (), strip_leading_mention: bool = False) -> str:
    """Slack's wire text as a customer wrote it: bot mentions removed, links and names readable.

    ``strip_leading_mention`` drops an opening mention whoever it names: for an ``app_mention``
    whose payload does not say which user the bot is.
    """
    if strip_leading_mention:
        text = _LEADING_MENTION.sub("", text, count=1)

    def user(match: re.Match[str]) -> str:
        if match.group(1) in bot_ids:
            return ""
        return f"@{match.group(2) or match.group(1)}"

    text = _MENTION.sub(user, text)

    def control(match: re.Match[str]) -> str:
        body = match.group(1)
        target, _, label = body.partition("|")
        if target.startswith("#"):
            return f"#{label or target[1:]}"
        if target.startswith("!"):
            if label:
                return label
            return "@" + target[1:].split("^")[0]
        if target.startswith("mailto:"):
            return label or target[len("mailto:") :]
        if label and label != target:
            return f"{label} ({target})"
        return target

    text = _CONTROL.sub(control, text)
    # Slack escapes exactly these three; &amp; last so "&amp;lt;" stays "&lt;".
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def to_inbound(
    payload: Payload,
    *,
    support_channels: Collection[str] = (),
    bot_user_id: str | None = None,
) -> InboundMessage | None:
    """The customer message in an ``event_callback`` payload, or None when it is not answered.

    ``payload`` is the whole Events API body (HTTP) or a Socket Mode ``events_api`` envelope's
    ``payload``; both carry ``event``, ``event_id`` and ``authorizations``.
    """
    if payload.get("type") != "event_callback":
        return None
    event = payload.get("event")
    if not isinstance(event, Mapping):
        return None
    kind = event.get("type")
    if kind not in ("message", "app_mention"):
        return None
    subtype = event.get("subtype")
    if event.get("bot_id") or event.get("bot_profile") or subtype == "bot_message":
        return None
    if subtype is not None and subtype not in _USER_SUBTYPES:
        return None  # edits, deletions, joins, topic changes...
    if event.get("hidden"):
        return None
    channel, ts, user = event.get("channel"), event.get("ts"), event.get("user")
    if not (isinstance(channel, str) and channel and isinstance(ts, str) and ts):
        return None
    if not isinstance(user, str) or not user:
        return None
    bots = bot_user_ids(payload)
    if bot_user_id:
        bots.add(bot_user_id)
    if user in bots:
        return None
    text = event.get("text")
    if not isinstance(text, str):
        text = ""
    thread_ts = event.get("thread_ts") if isinstance(event.get("thread_ts"), str) else None
    is_dm = event.get("channel_type") in _DM_CHANNEL_TYPES or (kind == "message" and channel.startswith("D"))

    if kind == "message" and not is_dm and channel not in support_channels:
        return None  # elsewhere only mentions are answered
    # A DM is one conversation unless the customer opens a thread; in channels, the message's thread.
    thread_id = thread_ts if is_dm else thread_ts or ts
    customer_text = plain_text(text, bot_ids=bots, strip_leading_mention=kind == "app_mention" and not bots)
    return InboundMessage(
        key=ConversationKey(channel=CHANNEL, chat_id=channel, thread_id=thread_id),
        user_id=user,
        message_id=f"{channel}:{ts}",
        text=customer_text,
        language=detect_language(customer_text),
        extras={
            "channel": channel,
            "ts": ts,
            "thread_ts": thread_id,
            "event_id": payload.get("event_id"),
            "team": event.get("team") or payload.get("team_id"),
        },
    )


# --- outbound rendering ----------------------------------------------------------------------------

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")
_BULLET = re.compile(r"^(\s*)[*+-]\s+")
_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^\s)]+)\)")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__")
_ITALIC = re.compile(r"(?<![*\w])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![*\w])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_BOLD_MARK = "\x00"


def escape(text: str) -> str:
    """Escape the three characters Slack treats as control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _render_inline(segment: str) -> str:
    segment = _LINK.sub(lambda m: f"<{m.group(2)}|{m.group(1)}>", segment)
    segment = _BOLD.sub(lambda m: f"{_BOLD_MARK}{m.group(1) or m.group(2)}{_BOLD_MARK}", segment)
    segment = _ITALIC.sub(r"_\1_", segment)
    segment = _STRIKE.sub(r"~\1~", segment)
    return segment.replace(_BOLD_MARK, "*")


def _render_line(line: str) -> str:
    line = escape(line)
    heading = _HEADING.match(line)
    if heading:
        return f"*{heading.group(1).strip('*')}*"
    line = _BULLET.sub(lambda m: f"{m.group(1)}• ", line)
    # Inline code stays literal: only the parts outside backticks are converted.
    parts = line.split("`")
    for index in range(0, len(parts), 2):
        parts[index] = _render_inline(parts[index])
    return "`".join(parts)


def render_mrkdwn(text: str) -> str:
    """The model's Markdown as Slack mrkdwn: escaped, ``**bold**`` -> ``*bold*``, links, headings."""
    lines: list[str] = []
    in_code = False
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            lines.append(escape(line.strip()))
        elif in_code:
            lines.append(escape(line))
        else:
            lines.append(_render_line(line))
    return "\n".join(lines).strip()


def reply_text(reply: Reply) -> str:
    """The reply's text with its buttons degraded to a list (Slack buttons need interactivity)."""
    text = reply.text
    if reply.buttons:
        text += "\n\n" + "\n".join(f"• {button.label}" for button in reply.buttons)
    return text


_SENTENCE_END = re.compile(r"[。！？；.!?;](?=\s|$)|[。！？；]")


def _cut_point(text: str, limit: int) -> int:
    window = text[:limit]
    floor = limit // 3  # never leave a tiny first piece just to hit a boundary
    for separator in ("\n\n", "\n"):
        at = window.rfind(separator)
        if at >= floor:
            return at + len(separator)
    ends = [m.end() for m in _SENTENCE_END.finditer(window) if m.end() >= floor]
    if ends:
        return ends[-1]
    at = window.rfind(" ")
    if at >= floor:
        return at + 1
    cut = limit
    amp = window.rfind("&", max(0, limit - 5))
    if amp != -1 and ";" not in window[amp:]:
        cut = amp  # do not split an &amp; / &lt; / &gt; entity
    return cut


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Split rendered text into messages of at most ``limit`` characters.

    Cuts at paragraph breaks first, then line breaks, sentence ends, spaces; a code block cut in two
    is closed and reopened so both halves render as code.
    """
    limit = min(limit, SLACK_TEXT_LIMIT)
    text = text.strip()
    chunks: list[str] = []
    reopen = False
    while text:
        if reopen:
            text = "```\n" + text
        if len(text) <= limit:
            chunks.append(text)
            break
        # Room for a closing fence in case this piece ends inside a code block.
        cut = _cut_point(text, limit - 4)
        piece, text = text[:cut].rstrip(), text[cut:].lstrip("\n ")
        reopen = piece.count("```") % 2 == 1
        if reopen:
            piece += "\n```"
        chunks.append(piece)
    return chunks


# --- sender ------------------------------------------------------------------------------------------


def build_client(*, token: str, base_url: str, max_rate_limit_retries: int = 3) -> AsyncWebClient:
    """An AsyncWebClient that retries 429 responses after ``Retry-After`` (it does not by default)."""
    return AsyncWebClient(
        token=token,
        base_url=base_url,
        retry_handlers=[
            AsyncConnectionErrorRetryHandler(max_retry_count=1),
            AsyncRateLimitErrorRetryHandler(max_retry_count=max_rate_limit_retries),
        ],
    )


class SlackSender(ReplySender):
    """Posts replies into the conversation's thread and streams answers by editing the first message.

    When a ``store`` is given, the ts of every message posted for an inbound message is recorded in
    it; a re-processed message (worker crash, retry after a failed part) edits those messages instead
    of posting the answer a second time.
    """

    channel = CHANNEL

    def __init__(
        self,
        *,
        client: AsyncWebClient,
        store: StateStore | None = None,
        message_limit: int = MESSAGE_LIMIT,
        update_interval: float = UPDATE_INTERVAL,
    ) -> None:
        self._client = client
        self._store = store
        self._limit = min(message_limit, SLACK_TEXT_LIMIT)
        self._interval = update_interval

    @property
    def client(self) -> AsyncWebClient:
        return self._client

    async def send(self, reply: Reply) -> None:
        """Post ``reply`` (split if long) into its thread."""
        await self._publish(reply, posted=[], record=None)

    async def deliver(self, message: InboundMessage, events: AsyncIterator[ReplyEvent]) -> Reply:
        """Show the answer while it is written (one message, updated ~1/s), then the final text."""
        record = f"slack:posted:{message.key.chat_id}:{message.message_id}"
        posted = await self._load(record)
        loop = asyncio.get_running_loop()
        written: list[str] = []
        last_write: float | None = None
        previews = True
        final: Reply | None = None
        async for event in events:
            if isinstance(event, ReplyDone):
                final = event.reply
            elif isinstance(event, ReplyDelta) and previews:
                written.append(event.text)
                now = loop.time()
                if last_write is not None and now - last_write < self._interval:
                    continue
                preview = split_message(render_mrkdwn("".join(written)), self._limit - 2)
                if not preview:
                    continue
                try:
                    await self._write(message.key, 0, preview[0] + " …", posted, record)
                except DeliveryError:
                    # The final text is sent (and retried) below; a failed preview only costs the preview.
                    log.warning("could not show a partial answer", exc_info=True, extra=_extra(message))
                    previews = False
                last_write = loop.time()
        if final is None:
            raise RuntimeError("engine stream ended without a reply")
        await self._publish(final, posted=posted, record=record)
        return final

    async def _publish(self, reply: Reply, *, posted: list[str], record: str | None) -> None:
        chunks = split_message(render_mrkdwn(reply_text(reply)), self._limit) or ["…"]
        for index, chunk in enumerate(chunks):
            await self._write(reply.key, index, chunk, posted, record)

    async def _write(
        self, key: ConversationKey, index: int, text: str, posted: list[str], record: str | None
    ) -> None:
        """Message ``index`` of an answer: edited when already posted, posted otherwise."""
        try:
            if index < len(posted):
                await self._client.chat_update(channel=key.chat_id, ts=posted[index], text=text)
                return
            response = await self._client.chat_postMessage(
                channel=key.chat_id, text=text, thread_ts=key.thread_id
            )
        except SlackClientError as exc:
            raise DeliveryError(f"Slack refused the message: {_slack_error(exc)}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"Slack unreachable: {exc!r}") from exc
        ts = response.get("ts")
        if not isinstance(ts, str):
            raise DeliveryError("Slack answered chat.postMessage without a ts")
        posted.append(ts)
        if record is not None and self._store is not None:
            await self._store.set(record, json.dumps(posted), ttl=POSTED_TTL)

    async def _load(self, record: str) -> list[str]:
        if self._store is None:
            return []
        raw = await self._store.get(record)
        if raw is None:
            return []
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return []
        return [ts for ts in value if isinstance(ts, str)] if isinstance(value, list) else []


def _slack_error(exc: SlackClientError) -> str:
    response = getattr(exc, "response", None)
    if response is not None:
        try:
            return f"{response.status_code} {response.get('error')}"
        except (AttributeError, TypeError):
            pass
    return str(exc)


def _extra(message: InboundMessage) -> dict[str, str]:
    return {"conversation": str(message.key), "message_id": message.message_id}
