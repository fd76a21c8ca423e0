"""HTTP side of the agent console: pages, a JSON API and live updates under ``/admin``.

Pages are server-rendered Jinja2 templates (``bots/admin/templates``) with one plain script
(``static/admin.js``) that refreshes the live parts when the server says something changed. Forms post
to the same ``/admin/api/...`` endpoints scripts use: a form post is answered with a redirect back to
the page, a JSON request with JSON.

Access: ``Authorization: Bearer <KEFU_ADMIN_TOKEN>`` or the session cookie from ``/admin/login``.
Without them the API answers 401 and pages redirect to the login form. Without ``KEFU_ADMIN_TOKEN``
every ``/admin`` path answers 404. A cookie-authenticated POST must come from the console's own origin.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
from pydantic import SecretStr
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.templating import Jinja2Templates

from bots.admin.auth import (
    COOKIE,
    COOKIE_PATH,
    SESSION_SECONDS,
    Agent,
    authenticate,
    clean_name,
    safe_next,
    session_cookie,
    token_matches,
)
from bots.admin.service import STATES, TICKET_STATUSES, Console, ConsoleError
from core.db.models import FaqEntry, Message, Ticket
from core.errors import KefuError
from core.faq.phrasings import current_generated
from core.settings import Settings

log = logging.getLogger(__name__)

EVENT_POLL_SECONDS = 1.0
"""How often the live-update stream looks at the database (works across processes)."""
EVENT_STREAM_SECONDS = 20.0
"""A stream ends after this and the browser's EventSource reconnects by itself; short, because a
server shutting down waits for open responses to finish."""
LOGIN_FAILURES = 10
"""Wrong tokens one client address may try per ``LOGIN_WINDOW`` seconds (shared by every process)."""
LOGIN_WINDOW = 300.0
MAX_IMPORT_BYTES = 5 * 1024 * 1024

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _pretty(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


@cache
def templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bots.admin", "templates"), autoescape=True, trim_blocks=True
    )
    env.filters["pretty"] = _pretty
    return Jinja2Templates(env=env)


# --- access -------------------------------------------------------------------------------------------

Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, Console, Agent], Awaitable[Response]]


def _token(request: Request) -> SecretStr | None:
    settings: Settings = request.app.state.settings
    return settings.admin_token


def _console(request: Request) -> Console:
    console = getattr(request.app.state, "admin_console", None)
    if console is None:
        console = Console(request.app.state.runtime, request.app.state.senders)
        request.app.state.admin_console = console
    assert isinstance(console, Console)
    return console


def _not_found() -> Response:
    return PlainTextResponse("Not Found", status_code=404)


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True  # browsers send Origin on cross-site POSTs; its absence is a same-site client
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _is_form(request: Request) -> bool:
    kind = request.headers.get("content-type", "")
    return kind.startswith(("application/x-www-form-urlencoded", "multipart/form-data"))


def page(handler: Handler) -> Endpoint:
    """An HTML page: the login form for a stranger."""

    async def endpoint(request: Request) -> Response:
        token = _token(request)
        if token is None:
            return _not_found()
        agent = authenticate(request, token)
        if agent is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/admin/login?next={quote(target)}", status_code=303)
        response = await handler(request, _console(request), agent)
        response.headers.update(_SECURITY_HEADERS)
        return response

    return endpoint


def api(handler: Handler) -> Endpoint:
    """A JSON endpoint (also the target of the pages' forms): 401 for a stranger."""

    async def endpoint(request: Request) -> Response:
        token = _token(request)
        if token is None:
            return _not_found()
        agent = authenticate(request, token)
        if agent is None:
            return JSONResponse(
                {"error": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        request.state.browser = agent.via == "session"
        if request.method == "POST" and agent.via == "session" and not _same_origin(request):
            log.warning("console POST from another origin refused")
            return JSONResponse({"error": "cross-origin request refused"}, status_code=403)
        try:
            return await handler(request, _console(request), agent)
        except ConsoleError as exc:
            return _failed(request, str(exc), exc.status)
        except (KefuError, ValueError, KeyError, TypeError) as exc:
            log.info("console action refused: %s", exc)
            return _failed(request, str(exc) or type(exc).__name__, 400)

    return endpoint


def _redirects(request: Request) -> bool:
    """A browser's form post is answered with a redirect back to the page; scripts get JSON."""
    return _is_form(request) and bool(getattr(request.state, "browser", False))


def _failed(request: Request, message: str, status: int) -> Response:
    if _redirects(request):
        return RedirectResponse(_back(request, error=message), status_code=303)
    return JSONResponse({"error": message}, status_code=status)


def _back(request: Request, *, error: str | None = None) -> str:
    target = safe_next(request.query_params.get("next") or _form_next(request))
    if error:
        target += ("&" if "?" in target else "?") + "error=" + quote(error[:300])
    return target


def _form_next(request: Request) -> str | None:
    form = getattr(request.state, "form", None)
    value = form.get("next") if form is not None else None
    return value if isinstance(value, str) else None


async def _payload(request: Request) -> dict[str, Any]:
    """The request's fields, from a form or a JSON object."""
    if _is_form(request):
        form = await request.form(max_files=1, max_fields=50)
        request.state.form = form
        return {k: v for k, v in form.multi_items()}
    try:
        data = await request.json()
    except ValueError as exc:
        raise ConsoleError("the body must be a JSON object") from exc
    if not isinstance(data, dict):
        raise ConsoleError("the body must be a JSON object")
    return data


def _done(request: Request, data: dict[str, Any], status: int = 200) -> Response:
    if _redirects(request):
        return RedirectResponse(_back(request), status_code=303)
    return JSONResponse(data, status_code=status)


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ConsoleError(f"{name} must be a number") from exc


def _path_id(request: Request) -> int:
    return _int(request.path_params["id"], "id")


# --- login --------------------------------------------------------------------------------------------


async def login_form(request: Request) -> Response:
    if _token(request) is None:
        return _not_found()
    context = {"next": safe_next(request.query_params.get("next")), "error": None}
    response = templates().TemplateResponse(request, "login.html", context)
    response.headers.update(_SECURITY_HEADERS)
    return response


async def login(request: Request) -> Response:
    token = _token(request)
    if token is None:
        return _not_found()
    form = await request.form(max_files=0, max_fields=10)
    offered, name = str(form.get("token") or ""), str(form.get("name") or "")
    target = safe_next(str(form.get("next") or ""))
    client = request.client.host if request.client else "?"
    store = request.app.state.runtime.store
    failures_key = f"admin:login:failures:{client}"
    failures = await store.get(failures_key)
    if failures is not None and int(failures) >= LOGIN_FAILURES:
        log.warning("console login refused (too many wrong tokens) from %s", client)
        return PlainTextResponse("Too many attempts; try again later.", status_code=429)
    if not offered or not token_matches(token, offered):
        await store.incr(failures_key, ttl=LOGIN_WINDOW)
        log.warning("console login refused (wrong token) from %s", client)
        context = {"next": target, "error": "wrong token"}
        refused = templates().TemplateResponse(request, "login.html", context, status_code=401)
        refused.headers.update(_SECURITY_HEADERS)
        return refused
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        session_cookie(token, clean_name(name)),
        max_age=SESSION_SECONDS,
        path=COOKIE_PATH,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )
    return response


async def logout(request: Request) -> Response:
    if _token(request) is None:
        return _not_found()
    response = RedirectResponse("/admin/login", status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


async def index(request: Request) -> Response:
    if _token(request) is None:
        return _not_found()
    return RedirectResponse("/admin/conversations", status_code=303)


@cache
def _static(name: str) -> bytes:
    return resources.files("bots.admin").joinpath("static", name).read_bytes()


_STATIC_TYPES = {"admin.js": "text/javascript; charset=utf-8", "admin.css": "text/css; charset=utf-8"}


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if _token(request) is None or name not in _STATIC_TYPES:
        return _not_found()
    return Response(_static(name), media_type=_STATIC_TYPES[name], headers={"Cache-Control": "no-cache"})


# --- pages --------------------------------------------------------------------------------------------


def _render(request: Request, agent: Agent, name: str, **context: Any) -> Response:
    context.update(agent=agent, error=request.query_params.get("error"), path=request.url.path)
    return templates().TemplateResponse(request, name, context)


@page
async def conversations_page(request: Request, console: Console, agent: Agent) -> Response:
    state = request.query_params.get("state")
    rows = await console.list_conversations(state=state if state in STATES else None)
    return _render(request, agent, "conversations.html", rows=rows, state=state, states=STATES)


@page
async def conversation_page(request: Request, console: Console, agent: Agent) -> Response:
    conversation_id = _path_id(request)
    try:
        conversation = await console.conversation(conversation_id)
    except ConsoleError:
        return _not_found()
    messages = await console.transcript(conversation_id)
    tickets = await console.tickets(conversation_id=conversation_id)
    return _render(
        request,
        agent,
        "conversation.html",
        conversation=conversation,
        messages=messages,
        tickets=tickets,
        can_reply=console.senders.get(conversation.channel) is not None,
    )


@page
async def tickets_page(request: Request, console: Console, agent: Agent) -> Response:
    status = request.query_params.get("status")
    rows = await console.tickets(status=status if status in TICKET_STATUSES else None)
    return _render(request, agent, "tickets.html", tickets=rows, status=status, statuses=TICKET_STATUSES)


@page
async def faq_page(request: Request, console: Console, agent: Agent) -> Response:
    entries = await console.faq.repository.list()
    return _render(
        request,
        agent,
        "faq.html",
        entries=entries,
        wordings=await console.learned.wordings(),
        phrasings={e.id: current_generated(e) for e in entries},
        imported=request.query_params.get("imported"),
    )


@page
async def audit_page(request: Request, console: Console, agent: Agent) -> Response:
    raw = request.query_params.get("conversation", "").strip()
    records: list[dict[str, Any]] | None = None
    if raw:
        records = await console.audit(_int(raw, "conversation"))
        await console.note(agent, "audit_viewed", conversation=int(raw))
    return _render(request, agent, "audit.html", records=records, conversation=raw)


# --- API: conversations ----------------------------------------------------------------------------


def _message_json(row: Message) -> dict[str, Any]:
    return {
        "id": row.id,
        "role": row.role,
        "content": row.content,
        "source": row.source,
        "tool_name": row.tool_name,
        "tool_calls": row.tool_calls,
        "meta": row.meta,
        "created_at": row.created_at.isoformat(),
    }


def _ticket_json(ticket: Ticket) -> dict[str, Any]:
    return {
        "id": ticket.id,
        "conversation_id": ticket.conversation_id,
        "summary": ticket.summary,
        "category": ticket.category,
        "priority": ticket.priority,
        "contact": ticket.contact,
        "status": ticket.status,
        "created_at": ticket.created_at.isoformat(),
        "updated_at": ticket.updated_at.isoformat(),
    }


def _faq_json(entry: FaqEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "question": entry.question,
        "alternatives": entry.alternatives,
        "answer": entry.answer,
        "language": entry.language,
        "tags": entry.tags,
        "enabled": entry.enabled,
        "generated": list(current_generated(entry)),
    }


@api
async def api_conversations(request: Request, console: Console, agent: Agent) -> Response:
    rows = await console.list_conversations(state=request.query_params.get("state"))
    return JSONResponse(
        [
            {
                "id": r.id,
                "key": r.key,
                "channel": r.channel,
                "user_id": r.user_id,
                "language": r.language,
                "state": r.state,
                "updated_at": r.updated_at.isoformat(),
                "last_role": r.last_role,
                "last_text": r.last_text,
                "pinned": r.pinned,
                "summary": r.summary,
            }
            for r in rows
        ]
    )


@api
async def api_conversation(request: Request, console: Console, agent: Agent) -> Response:
    conversation = await console.conversation(_path_id(request))
    assert conversation.id is not None
    after = _int(request.query_params.get("after", "0"), "after")
    messages = await console.transcript(conversation.id, after_id=after)
    return JSONResponse(
        {
            "id": conversation.id,
            "key": conversation.key,
            "channel": conversation.channel,
            "state": conversation.state,
            "language": conversation.language,
            "pinned": conversation.pinned,
            "summary": conversation.summary,
            "messages": [_message_json(m) for m in messages],
        }
    )


@api
async def api_take_over(request: Request, console: Console, agent: Agent) -> Response:
    if _is_form(request):
        await _payload(request)
    changed = await console.take_over(_path_id(request), agent)
    return _done(request, {"changed": changed, "state": "agent"})


@api
async def api_release(request: Request, console: Console, agent: Agent) -> Response:
    if _is_form(request):
        await _payload(request)
    changed = await console.hand_back(_path_id(request), agent)
    return _done(request, {"changed": changed, "state": "bot"})


@api
async def api_reply(request: Request, console: Console, agent: Agent) -> Response:
    data = await _payload(request)
    row = await console.reply(_path_id(request), agent, str(data.get("text") or ""))
    return _done(request, {"message": _message_json(row)}, status=201)


# --- API: tickets -------------------------------------------------------------------------------------


@api
async def api_tickets(request: Request, console: Console, agent: Agent) -> Response:
    if request.method == "GET":
        rows = await console.tickets(status=request.query_params.get("status"))
        return JSONResponse([_ticket_json(t) for t in rows])
    data = await _payload(request)
    raw_conversation = data.get("conversation_id")
    ticket = await console.open_ticket(
        agent,
        summary=str(data.get("summary") or ""),
        conversation_id=_int(raw_conversation, "conversation_id")
        if raw_conversation not in (None, "")
        else None,
        category=str(data.get("category") or "general"),
        priority=str(data.get("priority") or "normal"),
        contact=str(data.get("contact") or "") or None,
    )
    return _done(request, {"id": ticket.id, "status": ticket.status}, status=201)


@api
async def api_close_ticket(request: Request, console: Console, agent: Agent) -> Response:
    if _is_form(request):
        await _payload(request)
    closed = await console.close_ticket(_path_id(request), agent)
    return _done(request, {"closed": closed})


# --- API: FAQ -----------------------------------------------------------------------------------------


def _lines(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [part.strip() for part in str(value or "").splitlines() if part.strip()]


def _faq_fields(data: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("question", "answer", "language"):
        if name in data:
            fields[name] = str(data[name]).strip()
    for name in ("alternatives", "tags"):
        if name in data:
            fields[name] = _lines(data[name])
    if "enabled" in data:
        value = data["enabled"]
        fields["enabled"] = (
            value if isinstance(value, bool) else str(value).lower() in ("1", "true", "on", "yes")
        )
    elif not partial or "enabled_present" in data:
        fields["enabled"] = "enabled_present" not in data  # an unchecked box is not sent at all
    return fields


@api
async def api_faq(request: Request, console: Console, agent: Agent) -> Response:
    if request.method == "GET":
        return JSONResponse([_faq_json(e) for e in await console.faq.repository.list()])
    data = await _payload(request)
    entry = await console.faq.add(**_faq_fields(data, partial=False))
    await console.note(agent, "faq_added", entry=entry.id, question=entry.question)
    return _done(request, _faq_json(entry), status=201)


@api
async def api_faq_entry(request: Request, console: Console, agent: Agent) -> Response:
    entry_id = _path_id(request)
    if request.method == "DELETE":
        deleted = await console.faq.delete(entry_id)
        if deleted:
            await console.note(agent, "faq_deleted", entry=entry_id)
        return JSONResponse({"deleted": deleted})
    data = await _payload(request)
    if data.get("delete"):
        deleted = await console.faq.delete(entry_id)
        await console.note(agent, "faq_deleted", entry=entry_id)
        return _done(request, {"deleted": deleted})
    try:
        entry = await console.faq.update(entry_id, **_faq_fields(data, partial=True))
    except KeyError as exc:
        raise ConsoleError(f"no FAQ entry {entry_id}", status=404) from exc
    await console.note(agent, "faq_edited", entry=entry_id, question=entry.question)
    return _done(request, _faq_json(entry))


@api
async def api_faq_import(request: Request, console: Console, agent: Agent) -> Response:
    data = await _payload(request)
    upload = data.get("file")
    if not isinstance(upload, UploadFile) or not upload.filename:
        raise ConsoleError("choose a CSV, YAML or JSON file to import")
    suffix = Path(upload.filename).suffix.lower()
    if suffix not in (".csv", ".yaml", ".yml", ".json"):
        raise ConsoleError("the file must be .csv, .yaml or .json")
    content = await upload.read(MAX_IMPORT_BYTES + 1)
    if len(content) > MAX_IMPORT_BYTES:
        raise ConsoleError("the file is over 5 MB", status=413)
    with tempfile.TemporaryDirectory(prefix="kefu-faq-") as folder:
        path = Path(folder) / f"import{suffix}"
        await asyncio.to_thread(path.write_bytes, content)
        report = await console.faq.import_file(path)
    summary = {
        "total": report.total,
        "created": report.created,
        "updated": report.updated,
        "unchanged": report.unchanged,
        "source": upload.filename,
    }
    await console.note(agent, "faq_imported", **summary)
    if _redirects(request):
        changed = report.created + report.updated
        return RedirectResponse(f"/admin/faq?imported={changed}", status_code=303)
    return JSONResponse(summary)


@api
async def api_faq_learned(request: Request, console: Console, agent: Agent) -> Response:
    """GET: customers' wordings waiting for review. POST ``{id}`` with ``action`` accept or reject."""
    if request.method == "GET":
        return JSONResponse([dataclasses.asdict(w) for w in await console.learned.wordings()])
    data = await _payload(request)
    action = data.get("action")
    if action not in ("accept", "reject"):
        raise ConsoleError("action must be accept or reject")
    done = await console.decide_wording(_path_id(request), agent, accept=action == "accept")
    return _done(request, {"done": done})


@api
async def api_faq_phrasings(request: Request, console: Console, agent: Agent) -> Response:
    """POST ``{id}`` with ``drop`` = the number of a phrasing the model wrote: remove it."""
    data = await _payload(request)
    number = _int(data.get("drop"), "drop")
    done = await console.drop_phrasing(_path_id(request), number, agent)
    return _done(request, {"done": done})


# --- API: audit and live updates ---------------------------------------------------------------------


@api
async def api_audit(request: Request, console: Console, agent: Agent) -> Response:
    conversation_id = _path_id(request)
    records = await console.audit(conversation_id)
    await console.note(agent, "audit_exported", conversation=conversation_id)
    return JSONResponse(records)


@api
async def api_events(request: Request, console: Console, agent: Agent) -> Response:
    """Server-sent events: ``change`` whenever what the page shows changed (DB polled every second)."""
    raw = request.query_params.get("conversation")
    conversation_id = _int(raw, "conversation") if raw else None

    async def stream() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        ends = loop.time() + EVENT_STREAM_SECONDS
        last: str | None = None
        yield "retry: 1000\n\n"
        while loop.time() < ends and not await request.is_disconnected():
            version: str | None = last
            try:
                version = await console.version(conversation_id)
            except Exception:
                log.warning("live update check failed", exc_info=True)
            if version != last:
                if last is not None:
                    yield f"event: change\ndata: {json.dumps({'version': version})}\n\n"
                last = version
            else:
                yield ": idle\n\n"  # keeps proxies from closing the stream, shows a dead client
            await asyncio.sleep(EVENT_POLL_SECONDS)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


routes: list[BaseRoute] = [
    Route("/admin", index, methods=["GET"]),
    Mount(
        "/admin",
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/login", login_form, methods=["GET"]),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/static/{name}", static, methods=["GET"]),
            Route("/conversations", conversations_page, methods=["GET"]),
            Route("/conversations/{id}", conversation_page, methods=["GET"]),
            Route("/tickets", tickets_page, methods=["GET"]),
            Route("/faq", faq_page, methods=["GET"]),
            Route("/audit", audit_page, methods=["GET"]),
            Route("/api/conversations", api_conversations, methods=["GET"]),
            Route("/api/conversations/{id}", api_conversation, methods=["GET"]),
            Route("/api/conversations/{id}/takeover", api_take_over, methods=["POST"]),
            Route("/api/conversations/{id}/release", api_release, methods=["POST"]),
            Route("/api/conversations/{id}/reply", api_reply, methods=["POST"]),
            Route("/api/tickets", api_tickets, methods=["GET", "POST"]),
            Route("/api/tickets/{id}/close", api_close_ticket, methods=["POST"]),
            Route("/api/faq", api_faq, methods=["GET", "POST"]),
            Route("/api/faq/import", api_faq_import, methods=["POST"]),
            Route("/api/faq/learned", api_faq_learned, methods=["GET"]),
            Route("/api/faq/learned/{id}", api_faq_learned, methods=["POST"]),
            Route("/api/faq/{id}", api_faq_entry, methods=["POST", "PUT", "DELETE"]),
            Route("/api/faq/{id}/phrasings", api_faq_phrasings, methods=["POST"]),
            Route("/api/audit/{id}", api_audit, methods=["GET"]),
            Route("/api/events", api_events, methods=["GET"]),
        ],
    ),
]
"""Mounted by the gateway (``bots.gateway.ROUTE_MODULES``)."""
