"""``kefu chat``: talk to the bot in a terminal, or feed it one message per line from a pipe.

Interactive (stdin is a terminal): a prompt, the answer streamed as the model writes it and then
replaced by the final text. Scripted (stdin is a pipe or file): every non-empty input line is one
message and gets exactly one output line (line breaks inside an answer become spaces), so
``printf '你好\\nhello\\n' | kefu chat`` prints two lines. ``exit``, ``quit``, EOF or Ctrl-C end it.

The conversation key is channel ``terminal`` and the OS user name (or ``--session``), so the history
carries over between runs against the same database.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import re
import signal
import sys
import threading
import uuid
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text

from core.language import detect_language
from core.llm.base import ChatModel
from core.messages import ConversationKey, InboundMessage, Reply, ReplyDelta, ReplyDone
from core.runtime import Runtime
from core.settings import Settings

CHANNEL = "terminal"
EXIT_WORDS = frozenset({"exit", "quit", "/exit", "/quit", "退出"})
_LINE_BREAKS = re.compile(r"\s*\n\s*")
_SESSION = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_NOT_SESSION_CHARS = re.compile(r"[^A-Za-z0-9_.@-]")


def valid_session(value: str) -> bool:
    """Whether ``value`` can name a terminal conversation (``:`` would break conversation keys)."""
    return _SESSION.fullmatch(value) is not None


def default_session() -> str:
    """The OS user name, the conversation id when ``--session`` is not given."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        name = ""
    return _NOT_SESSION_CHARS.sub("_", name)[:64] or "local"


async def read_line(stream: TextIO, prompt: str | None = None) -> str | None:
    """The next line of ``stream`` without blocking the event loop; ``None`` at EOF.

    The read runs in a daemon thread of its own (not the default executor): a thread blocked in
    ``input()`` must not keep the process alive after Ctrl-C.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str | None] = loop.create_future()

    def deliver(value: str | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def read() -> None:
        value: str | None
        error: BaseException | None = None
        try:
            if prompt is not None and stream is sys.stdin:
                value = input(prompt)  # line editing and history when readline is available
            else:
                line = stream.readline()
                value = line.rstrip("\r\n") if line else None
        except EOFError:
            value = None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            value, error = None, exc
        loop.call_soon_threadsafe(deliver, value, error)

    threading.Thread(target=read, name="kefu-chat-stdin", daemon=True).start()
    return await future


class TerminalChat:
    """The REPL around an open :class:`Runtime`."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        session: str,
        stdin: TextIO,
        stdout: TextIO,
        interactive: bool,
    ) -> None:
        self._runtime = runtime
        self._key = ConversationKey(channel=CHANNEL, chat_id=session)
        self._session = session
        self._stdin = stdin
        self._stdout = stdout
        self._interactive = interactive
        self._console = Console(file=stdout, highlight=False, soft_wrap=True)

    def message(self, text: str) -> InboundMessage:
        """``text`` typed by the user, as an inbound message."""
        return InboundMessage(
            key=self._key,
            user_id=self._session,
            message_id=uuid.uuid4().hex,
            text=text,
            language=detect_language(text),
        )

    async def run(self) -> None:
        """Answer messages until ``exit``/``quit`` or EOF."""
        if self._interactive:
            self._console.print(
                "[bold]kefu[/bold] 终端客服 · terminal chat  "
                f"(session [cyan]{self._session}[/cyan]; 输入 exit 退出 · type exit to quit)"
            )
        while True:
            line = await read_line(self._stdin, "你 › " if self._interactive else None)
            if line is None:
                if self._interactive:
                    self._console.print()
                return
            text = line.strip()
            if not text:
                continue
            if text.lower() in EXIT_WORDS:
                return
            message = self.message(text)
            if self._interactive:
                await self._answer_live(message)
            else:
                reply = await self._runtime.engine.handle(message)
                self._stdout.write(one_line(reply.text) + "\n")
                self._stdout.flush()

    async def _answer_live(self, message: InboundMessage) -> None:
        draft = ""
        reply: Reply | None = None
        if not self._console.is_terminal:
            reply = await self._runtime.engine.handle(message)
            self._console.print(f"客服 › {reply.text}")
            return
        with Live(
            Text("客服 › …", style="dim"),
            console=self._console,
            refresh_per_second=12,
            vertical_overflow="visible",
        ) as live:
            async for event in self._runtime.engine.stream(message):
                if isinstance(event, ReplyDelta):
                    draft += event.text
                    live.update(Text("客服 › " + draft))
                elif isinstance(event, ReplyDone):
                    reply = event.reply
                    # The final text is what was stored (after guards): it replaces the draft.
                    live.update(Text("客服 › " + reply.text))


def one_line(text: str) -> str:
    """An answer on a single line, for scripted use."""
    return _LINE_BREAKS.sub(" ", text.strip())


async def run_chat(
    settings: Settings,
    *,
    session: str | None = None,
    model: ChatModel | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    interactive: bool | None = None,
) -> None:
    """Open the runtime and chat until the user leaves."""
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    if interactive is None:
        interactive = stdin.isatty()
    async with Runtime.open(settings, model=model) as runtime:
        chat = TerminalChat(
            runtime,
            session=session or default_session(),
            stdin=stdin,
            stdout=stdout,
            interactive=interactive,
        )
        await chat.run()


def chat_until_done(settings: Settings, *, session: str | None = None) -> None:
    """Run the chat on a fresh event loop until the user leaves (the ``kefu chat`` command).

    Ctrl-C stops cleanly: the answer in progress is abandoned and the runtime closed. Closing waits
    for the model thread to notice, which may take a while during a long prompt evaluation, so a
    second Ctrl-C leaves at once (whatever was stored so far is already committed).
    """
    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        task = loop.create_task(run_chat(settings, session=session))
        interrupts = 0

        def hint() -> None:
            if not task.done():
                sys.stderr.write("\n正在停止… stopping (Ctrl-C again to quit now)\n")
                sys.stderr.flush()

        def on_interrupt() -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts > 1:
                os._exit(130)
            task.cancel()
            loop.call_later(1.0, hint)

        with contextlib.suppress(NotImplementedError):  # no signal handlers on this platform/thread
            loop.add_signal_handler(signal.SIGINT, on_interrupt)
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            sys.stdout.write("\n")
        finally:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signal.SIGINT)
