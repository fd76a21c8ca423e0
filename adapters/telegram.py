"""Telegram (Bot API through aiogram 3): updates in, replies out.

Inbound, pure: :func:`to_inbound` turns an :class:`~adapters.telegram_update.Update` into an
:class:`InboundMessage`, or ``None`` for updates the bot does not answer (edits, channel posts, other
bots, service messages, group chatter that does not mention or reply to the bot).

Outbound: :class:`TelegramSender` renders the answer as Telegram HTML (``<``, ``>``, ``&`` escaped,
``**bold**`` in bold), splits it at 4096 characters of *visible* text (the limit applies after entity
parsing) on paragraph or sentence boundaries, spaces messages out per chat, waits out flood control
(``TelegramRetryAfter``), shows "typing..." while the model works, and streams long answers by sending a
first message and editing it as the text grows.

Conversation key: ``telegram:<chat id>[:<forum topic id>]``. The dedupe id is ``<bot id>:<update_id>``:
update ids are per bot, so two bots sharing one store never collide.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    ClientDecodeError,
    TelegramAPIError,
    TelegramBadRequest,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
)
from aiogram.methods import (
    DeleteMessage,
    DeleteWebhook,
    EditMessageText,
    GetMe,
    GetUpdates,
    SendChatAction,
    SendMessage,
    SetWebhook,
    TelegramMethod,
)
from aiogram.methods.base import Response
from aiogram.types import ReplyParameters

from adapters.telegram_update import MessageEntity, Update
from core.delivery import ReplySender
from core.errors import DeliveryError
from core.language import detect_language
from core.messages import (
    ConversationKey,
    InboundMessage,
    Language,
    Reply,
    ReplyDelta,
    ReplyDone,
    ReplyEvent,
    ReplySource,
)
from core.texts import text as fixed_text

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL = "telegram"

# aiogram parametrises its generic ``Response[T]`` on every API call and pydantic keeps parametrised
# models only while something references them, so each call used to rebuild the model class (a tenth
# of a worker's CPU in bench/load.py). Holding the classes of the methods kefu calls keeps them cached.
_RESPONSE_MODELS = tuple(
    Response[method.__returning__]  # type: ignore[name-defined]
    for method in (SendMessage, EditMessageText, SendChatAction, GetMe, GetUpdates, SetWebhook, DeleteWebhook)
)
TEXT_LIMIT = 4096
"""Characters of a message's text after entity parsing (counted here in UTF-16 units, as Telegram does)."""

COMMANDS = frozenset({"start", "help", "human"})
FIXED_ANSWERS = {"start": "greeting", "help": "telegram_help"}
"""Commands answered with a fixed text instead of the model."""

_CHAT_TYPES = frozenset({"private", "group", "supergroup"})
_COMMAND = re.compile(r"^/([A-Za-z0-9_]{1,32})(?:@([A-Za-z0-9_]{1,64}))?(?=\s|$)")


@dataclass(frozen=True)
class BotIdentity:
    """Who the bot is (from getMe): needed to tell whether a group message is meant for it."""

    id: int
    username: str | None = None


# --- inbound -----------------------------------------------------------------------------------


def language_of(text: str, language_code: str | None) -> Language:
    """Chinese when the text has CJK ideographs or the client is set to Chinese, else English."""
    # detect_language answers "zh" for a non-Chinese hint only when the text has CJK ideographs.
    if detect_language(text, hint="en") == "zh":
        return "zh"
    if language_code and language_code.lower().startswith("zh"):
        return "zh"
    return "en"


def dedupe_id(bot_id: int, update_id: int) -> str:
    """The InboundMessage.message_id of an update: the intake dedupes on it for a week."""
    return f"{bot_id}:{update_id}"


def _mentions(text: str, entities: list[MessageEntity], bot: BotIdentity) -> bool:
    handle = f"@{bot.username}".lower() if bot.username else None
    for entity in entities:
        if entity.type == "text_mention" and entity.user is not None and entity.user.id == bot.id:
            return True
        if entity.type == "mention" and handle and entity.extract_from(text).lower() == handle:
            return True
    # Entities are always present on real updates; the text search covers hand-made ones.
    return handle is not None and re.search(rf"{re.escape(handle)}\b", text, re.IGNORECASE) is not None


def _strip_handle(text: str, bot: BotIdentity) -> str:
    if not bot.username:
        return text.strip()
    stripped = re.sub(rf"@{re.escape(bot.username)}\b", "", text, flags=re.IGNORECASE)
    return re.sub(r"[ \t]{2,}", " ", stripped).strip()


def to_inbound(update: Update, *, bot: BotIdentity) -> InboundMessage | None:
    """The customer message in ``update``, or None when the bot should not answer it.

    Answered: new messages from people in private chats, and in groups those that mention the bot,
    reply to it or are one of its commands. Media become a message whose ``extras["media"]`` names the
    kind (answered with a fixed "text only" notice). Edits, channel posts, other bots' messages and
    service messages (joins, pins...) are not answered.
    """
    message = update.message
    if message is None:
        return None
    user = message.from_user
    if user is None or user.is_bot or message.is_automatic_forward:
        return None
    chat = message.chat
    if chat.type not in _CHAT_TYPES:
        return None
    private = chat.type == "private"
    media: str | None = None
    if message.text is not None:
        text, entities = message.text, list(message.entities or [])
    else:
        media = message.media_kind()
        if media is None:
            return None
        text, entities = message.caption or "", list(message.caption_entities or [])

    command: str | None = None
    match = _COMMAND.match(text)
    if match:
        name, target = match.group(1).lower(), match.group(2)
        for_other_bot = target is not None and (
            bot.username is None or target.lower() != bot.username.lower()
        )
        if for_other_bot and not private:
            return None
        if not for_other_bot and name in COMMANDS:
            command = name
    if not private and command is None:
        replied = message.reply_to_message
        to_bot = replied is not None and replied.from_user is not None and replied.from_user.id == bot.id
        if not to_bot and not _mentions(text, entities, bot):
            return None

    extras: dict[str, Any] = {"chat_type": chat.type, "message_id": message.message_id}
    if not private:
        # In a group the answer quotes the question, so it is clear whom it answers.
        extras["reply_to"] = message.message_id
    if command:
        extras["command"] = command
    if media:
        extras["media"] = media
    thread_id = (
        str(message.message_thread_id) if message.is_topic_message and message.message_thread_id else None
    )
    clean = _strip_handle(text, bot)
    return InboundMessage(
        key=ConversationKey(channel=CHANNEL, chat_id=str(chat.id), thread_id=thread_id),
        user_id=str(user.id),
        message_id=dedupe_id(bot.id, update.update_id),
        text=clean,
        language=language_of(clean, user.language_code),
        user_name=user.full_name or user.username,
        extras=extras,
    )


def fixed_answer(message: InboundMessage) -> str | None:
    """The name of the fixed text that answers ``message`` without the model, if any."""
    if message.extras.get("media"):
        return "telegram_text_only"
    command = message.extras.get("command")
    return FIXED_ANSWERS.get(command) if isinstance(command, str) else None


# --- rendering and splitting -------------------------------------------------------------------

_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_SENTENCE_END = re.compile(r"[。！？；…]|[.!?;:](?=\s)")


@dataclass(frozen=True)
class _Run:
    text: str
    bold: bool = False


def _runs(text: str) -> list[_Run]:
    """The answer as plain and bold runs (``**bold**`` markers removed)."""
    runs: list[_Run] = []
    pos = 0
    for match in _BOLD.finditer(text):
        if match.start() > pos:
            runs.append(_Run(text[pos : match.start()]))
        runs.append(_Run(match.group(1), bold=True))
        pos = match.end()
    if pos < len(text):
        runs.append(_Run(text[pos:]))
    return runs


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units, the unit of Telegram's limits and entity offsets."""
    return len(text.encode("utf-16-le")) // 2


def _fit(text: str, start: int, limit: int) -> int:
    """The largest ``end`` with ``text[start:end]`` at most ``limit`` UTF-16 units long."""
    used = 0
    for index in range(start, len(text)):
        used += 2 if ord(text[index]) > 0xFFFF else 1
        if used > limit:
            return index
    return len(text)


def _cut(text: str, start: int, end: int) -> int:
    """Where to end a chunk that must stop at or before ``end``: the last paragraph break, line
    break, sentence end or space in the second half of the window, else ``end`` itself."""
    window = text[start:end]
    floor = len(window) // 2
    for separator in ("\n\n", "\n"):
        found = window.rfind(separator)
        if found >= floor:
            return start + found + len(separator)
    ends = [m.end() for m in _SENTENCE_END.finditer(window) if m.end() >= floor]
    if ends:
        return start + ends[-1]
    spaces = [i for i in (window.rfind(" "), window.rfind("\t")) if i >= floor]
    if spaces:
        return start + max(spaces) + 1
    return end


def split_spans(text: str, limit: int = TEXT_LIMIT) -> list[tuple[int, int]]:
    """(start, end) of each chunk of ``text``, trimmed of surrounding whitespace, each ≤ ``limit``."""
    spans: list[tuple[int, int]] = []
    start, size = 0, len(text)
    while start < size:
        while start < size and text[start].isspace():
            start += 1
        if start >= size:
            break
        end = _fit(text, start, limit)
        if end < size:
            end = _cut(text, start, end)
        stop = end
        while stop > start and text[stop - 1].isspace():
            stop -= 1
        spans.append((start, stop))
        start = end
    return spans


def _render(runs: list[_Run], start: int, end: int) -> str:
    parts: list[str] = []
    pos = 0
    for run in runs:
        run_end = pos + len(run.text)
        lo, hi = max(start, pos), min(end, run_end)
        if lo < hi:
            piece = html.escape(run.text[lo - pos : hi - pos], quote=False)
            parts.append(f"<b>{piece}</b>" if run.bold else piece)
        pos = run_end
    return "".join(parts)


def render_chunks(text: str, limit: int = TEXT_LIMIT) -> list[str]:
    """``text`` as Telegram HTML messages, each at most ``limit`` visible characters.

    The split is made on the visible text and each chunk is rendered on its own, so no chunk ends
    inside an entity (``&amp;``) or a tag, and bold text cut by the split stays bold on both sides.
    """
    runs = _runs(text)
    visible = "".join(run.text for run in runs)
    return [_render(runs, start, end) for start, end in split_spans(visible, limit)]


def reply_text(reply: Reply) -> str:
    """The text to show; buttons degrade to a list of their labels (no callback handling yet)."""
    if not reply.buttons:
        return reply.text
    return reply.text + "\n\n" + "\n".join(f"• {button.label}" for button in reply.buttons)


# --- outbound ----------------------------------------------------------------------------------


def make_bot(*, token: str, api_base: str, timeout: float = 60.0) -> Bot:
    """An aiogram Bot talking to ``api_base`` (api.telegram.org, a local Bot API server, a fake).

    Raises aiogram's TokenValidationError for a malformed token.
    """
    session = AiohttpSession(api=TelegramAPIServer.from_base(api_base), timeout=timeout)
    return Bot(token=token, session=session)


@dataclass(frozen=True)
class _Target:
    chat_id: int
    thread_id: int | None
    group: bool
    reply_to: int | None

    @classmethod
    def of(cls, key: ConversationKey, extras: dict[str, Any]) -> _Target:
        try:
            chat_id = int(key.chat_id)
            thread_id = int(key.thread_id) if key.thread_id else None
        except ValueError as exc:
            raise DeliveryError(f"not a Telegram conversation: {key}") from exc
        reply_to = extras.get("reply_to")
        return cls(
            chat_id=chat_id,
            thread_id=thread_id,
            group=extras.get("chat_type", "private") != "private",
            reply_to=reply_to if isinstance(reply_to, int) else None,
        )


MAX_SENDS_PER_SECOND = 30
"""Telegram's limit for one bot across all its chats ("about 30 messages per second")."""


class _Pacer:
    """Spaces out messages: per chat (~1/s, 20/min in groups) and overall (~30/s).

    ``overall``, when given, paces the bot as a whole across processes (a shared rate) instead of the
    local ``overall_interval``.
    """

    def __init__(
        self, *, overall_interval: float, overall: Callable[[], Awaitable[object]] | None = None
    ) -> None:
        self._overall_interval = overall_interval
        self._overall = overall
        self._chat_next: dict[int, float] = {}
        self._overall_next = 0.0

    def ready(self, chat_id: int) -> bool:
        return asyncio.get_running_loop().time() >= self._chat_next.get(chat_id, 0.0)

    def hold(self, chat_id: int, seconds: float) -> None:
        """Nothing more to ``chat_id`` for ``seconds`` (flood control)."""
        until = asyncio.get_running_loop().time() + seconds
        self._chat_next[chat_id] = max(self._chat_next.get(chat_id, 0.0), until)

    async def wait(self, chat_id: int, interval: float) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if len(self._chat_next) > 10_000:
            self._chat_next = {chat: t for chat, t in self._chat_next.items() if t > now}
        # Reserve the slot before sleeping, so concurrent senders to one chat queue up behind it.
        slot = max(now, self._chat_next.get(chat_id, 0.0))
        self._chat_next[chat_id] = slot + interval
        if slot > now:
            await asyncio.sleep(slot - now)
        if self._overall is not None:
            await self._overall()
            return
        now = loop.time()
        overall = max(now, self._overall_next)
        self._overall_next = overall + self._overall_interval
        if overall > now:
            await asyncio.sleep(overall - now)


class _Typing:
    """Repeats "typing..." every few seconds (it lasts at most 5 s) until stopped."""

    def __init__(self, send: Callable[[], Awaitable[object]], *, interval: float) -> None:
        self._send = send
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="telegram-typing")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self._send()
            except TelegramRetryAfter as exc:
                await asyncio.sleep(exc.retry_after)
                continue
            except (TelegramAPIError, ClientDecodeError):
                # Cosmetic only: the answer goes out whether or not the indicator shows.
                log.debug("typing indicator failed", exc_info=True)
            await asyncio.sleep(self._interval)


@dataclass
class _Draft:
    """The message a streamed answer is being written into, once one was sent."""

    message_id: int | None = None


class TelegramSender(ReplySender):
    """Sends replies through the Bot API with pacing, flood-control retries, typing and streaming.

    ``overall`` is awaited before every Bot API call to pace the bot across processes (a
    :class:`core.pacing.SharedRate`); without it this sender alone keeps ``overall_interval``.
    """

    channel = CHANNEL

    def __init__(
        self,
        *,
        bot: Bot,
        chat_interval: float = 1.0,
        group_interval: float = 3.0,
        overall_interval: float = 1 / MAX_SENDS_PER_SECOND,
        overall: Callable[[], Awaitable[object]] | None = None,
        max_attempts: int = 5,
        max_retry_wait: float = 60.0,
        backoff: float = 0.5,
        typing_interval: float = 4.0,
        stream_after: float = 1.0,
        stream_interval: float = 1.0,
    ) -> None:
        self._bot = bot
        self._chat_interval = chat_interval
        self._group_interval = group_interval
        self._pacer = _Pacer(overall_interval=overall_interval, overall=overall)
        self._max_attempts = max_attempts
        self._max_retry_wait = max_retry_wait
        self._backoff = backoff
        self._typing_interval = typing_interval
        self._stream_after = stream_after
        self._stream_interval = stream_interval

    async def aclose(self) -> None:
        """Close the bot's HTTP session."""
        await self._bot.session.close()

    @property
    def bot(self) -> Bot:
        return self._bot

    async def send(self, reply: Reply) -> None:
        """Send ``reply`` as one or more messages (the first quotes the question in groups)."""
        target = _Target.of(reply.key, reply.extras)
        chunks = render_chunks(reply_text(reply))
        if not chunks:
            log.warning("empty reply not sent", extra={"conversation": str(reply.key)})
            return
        for index, chunk in enumerate(chunks):
            await self._send_chunk(target, chunk, quote=index == 0)

    async def deliver(self, message: InboundMessage, events: AsyncIterator[ReplyEvent]) -> Reply:
        """Answer ``message``: fixed texts for commands and media, else stream the model's answer."""
        name = fixed_answer(message)
        if name is not None:
            # The engine's stream is never started, so the model is not asked.
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
            reply = Reply(
                key=message.key,
                text=fixed_text(name, message.language),
                language=message.language,
                in_reply_to=message.message_id,
                source=ReplySource.SYSTEM,
                extras=dict(message.extras),
            )
            await self.send(reply)
            return reply
        return await self._stream(message, events)

    async def _stream(self, message: InboundMessage, events: AsyncIterator[ReplyEvent]) -> Reply:
        target = _Target.of(message.key, message.extras)
        draft = _Draft()
        try:
            final = await self._show_while_written(target, events, draft)
            return await self._complete(target, final, draft)
        except Exception:
            # The answer did not get through (a database outage mid-answer, the Bot API refusing the
            # last edit): the entry is answered again later, so the half-written message must not stay.
            if draft.message_id is not None:
                await self._withdraw(target, draft.message_id)
            raise

    async def _show_while_written(
        self, target: _Target, events: AsyncIterator[ReplyEvent], draft: _Draft
    ) -> Reply:
        """Show "typing…", then the answer so far in one message edited about once a second (slow
        answers only); returns the final reply."""
        loop = asyncio.get_running_loop()
        typing = _Typing(
            lambda: self._bot(
                SendChatAction(chat_id=target.chat_id, action="typing", message_thread_id=target.thread_id)
            ),
            interval=self._typing_interval,
        )
        typing.start()
        written = ""
        shown = ""
        next_show = loop.time() + self._stream_after
        final: Reply | None = None
        try:
            async for event in events:
                if isinstance(event, ReplyDone):
                    final = event.reply
                    continue
                assert isinstance(event, ReplyDelta)
                written += event.text
                if loop.time() < next_show or not written.strip():
                    continue
                next_show = loop.time() + self._stream_interval
                chunks = render_chunks(written, TEXT_LIMIT - 2)
                if not chunks:
                    continue
                preview = chunks[0] + " …"
                if preview == shown or not self._pacer.ready(target.chat_id):
                    continue
                if draft.message_id is None:
                    await typing.stop()
                    draft.message_id = await self._try_preview(target, preview)
                else:
                    await self._try_edit_preview(target, draft.message_id, preview)
                shown = preview
        finally:
            await typing.stop()
        if final is None:
            raise RuntimeError("engine stream ended without a reply")
        return final

    async def _complete(self, target: _Target, final: Reply, draft: _Draft) -> Reply:
        """Send ``final``: as new messages, or by finishing the draft and sending the rest."""
        if draft.message_id is None:
            await self.send(final)
            return final
        chunks = render_chunks(reply_text(final))
        if not chunks:
            return final
        if not await self._edit(target, draft.message_id, chunks[0]):
            await self._send_chunk(target, chunks[0], quote=True)
        for chunk in chunks[1:]:
            await self._send_chunk(target, chunk, quote=False)
        return final

    async def _withdraw(self, target: _Target, message_id: int) -> None:
        """Delete a streamed message whose answer failed; a later attempt sends the whole answer."""
        try:
            await self._bot(DeleteMessage(chat_id=target.chat_id, message_id=message_id))
        except (TelegramAPIError, ClientDecodeError):
            log.warning("could not delete an unfinished streamed answer", exc_info=True)

    async def _try_preview(self, target: _Target, text: str) -> int | None:
        """Send the first, provisional message of a streamed answer; None when it did not go out."""
        await self._pacer.wait(target.chat_id, self._chat_interval)
        try:
            sent = await self._bot(self._message(target, text, quote=True))
        except TelegramRetryAfter as exc:
            self._pacer.hold(target.chat_id, exc.retry_after)
            return None
        except (TelegramAPIError, ClientDecodeError):
            log.warning("could not show a streamed answer; sending it when complete", exc_info=True)
            return None
        return sent.message_id

    async def _try_edit_preview(self, target: _Target, message_id: int, text: str) -> None:
        await self._pacer.wait(target.chat_id, self._chat_interval)
        try:
            await self._bot(self._edit_method(target, message_id, text))
        except TelegramRetryAfter as exc:
            self._pacer.hold(target.chat_id, exc.retry_after)
        except (TelegramAPIError, ClientDecodeError):
            # The final edit retries properly; a lost intermediate state costs nothing.
            log.debug("streamed edit failed", exc_info=True)

    def _message(self, target: _Target, text: str, *, quote: bool, html_mode: bool = True) -> SendMessage:
        reply_parameters = None
        if quote and target.reply_to is not None:
            # Sent anyway when the customer deleted the question meanwhile.
            reply_parameters = ReplyParameters(message_id=target.reply_to, allow_sending_without_reply=True)
        return SendMessage(
            chat_id=target.chat_id,
            text=text,
            message_thread_id=target.thread_id,
            parse_mode="HTML" if html_mode else None,
            reply_parameters=reply_parameters,
        )

    @staticmethod
    def _edit_method(target: _Target, message_id: int, text: str) -> EditMessageText:
        return EditMessageText(chat_id=target.chat_id, message_id=message_id, text=text, parse_mode="HTML")

    async def _send_chunk(self, target: _Target, chunk: str, *, quote: bool) -> None:
        interval = self._group_interval if target.group else self._chat_interval
        try:
            await self._call(self._message(target, chunk, quote=quote), target.chat_id, interval)
        except TelegramBadRequest as exc:
            if "can't parse entities" not in exc.message.lower():
                raise DeliveryError(f"Telegram refused the message: {exc.message}") from exc
            # Should not happen with escaped text; the customer still gets the words.
            log.error("Telegram could not parse the HTML; sending plain text", exc_info=True)
            plain = html.unescape(re.sub(r"</?b>", "", chunk))
            try:
                await self._call(
                    self._message(target, plain, quote=quote, html_mode=False), target.chat_id, interval
                )
            except TelegramBadRequest as again:
                raise DeliveryError(f"Telegram refused the message: {again.message}") from again

    async def _edit(self, target: _Target, message_id: int, chunk: str) -> bool:
        """Replace a streamed message's text; False when that message can no longer be edited."""
        try:
            await self._call(
                self._edit_method(target, message_id, chunk), target.chat_id, self._chat_interval
            )
        except TelegramBadRequest as exc:
            description = exc.message.lower()
            if "message is not modified" in description:
                return True
            if "message to edit not found" in description or "message can't be edited" in description:
                return False
            raise DeliveryError(f"Telegram refused the edit: {exc.message}") from exc
        return True

    async def _call(self, method: TelegramMethod[T], chat_id: int, interval: float) -> T:
        """Call the Bot API, waiting out flood control and retrying transient failures.

        TelegramBadRequest propagates for the caller to interpret; every other failure becomes a
        DeliveryError once the attempts are used up (or at once for refusals such as a blocked bot).
        """
        attempt = 0
        while True:
            attempt += 1
            await self._pacer.wait(chat_id, interval)
            try:
                return await self._bot(method)
            except TelegramRetryAfter as exc:
                if attempt >= self._max_attempts or exc.retry_after > self._max_retry_wait:
                    raise DeliveryError(
                        f"Telegram flood control on {method.__api_method__}: retry after {exc.retry_after}s"
                    ) from exc
                log.warning(
                    "Telegram flood control: waiting %ss before retrying %s (attempt %d)",
                    exc.retry_after,
                    method.__api_method__,
                    attempt,
                    extra={"chat_id": chat_id},
                )
                self._pacer.hold(chat_id, exc.retry_after)
            except (TelegramNetworkError, TelegramServerError, ClientDecodeError) as exc:
                if attempt >= self._max_attempts:
                    raise DeliveryError(f"Telegram unreachable for {method.__api_method__}: {exc}") from exc
                log.warning("Telegram call %s failed (attempt %d); retrying", method.__api_method__, attempt)
                await asyncio.sleep(min(self._backoff * 2 ** (attempt - 1), 30.0))
            except TelegramBadRequest:
                raise
            except TelegramAPIError as exc:
                raise DeliveryError(f"Telegram refused {method.__api_method__}: {exc.message}") from exc
