"""The console over HTTP: who gets in, what the pages show, and what each action changes."""

from __future__ import annotations

import html
from pathlib import Path

import pytest
from pydantic import SecretStr

from bots.admin.auth import COOKIE, session_cookie
from core.db.models import Message
from core.faq.learning import LearnedPhrasings
from core.faq.phrasings import source_key
from core.faq.repository import FaqRepository
from core.messages import ReplySource
from tests.admin.conftest import ADMIN_TOKEN, BEARER, Console, admin_settings, running_console

ADMIN_PATHS = [
    "/admin",
    "/admin/",
    "/admin/login",
    "/admin/conversations",
    "/admin/faq",
    "/admin/api/conversations",
    "/admin/api/events",
    "/admin/static/admin.js",
]


async def test_console_is_switched_off_without_a_token(tmp_path: Path) -> None:
    async with running_console(admin_settings(tmp_path, admin_token=None)) as console:
        for path in ADMIN_PATHS:
            response = await console.http.get(path, headers=BEARER)
            assert response.status_code == 404, path
        login = await console.http.post("/admin/login", data={"token": ""})
        assert login.status_code == 404


async def test_strangers_get_401_from_the_api_and_the_login_form_for_pages(tmp_path: Path) -> None:
    async with running_console(admin_settings(tmp_path)) as console:
        api = await console.http.get("/admin/api/conversations")
        assert api.status_code == 401 and api.headers["www-authenticate"] == "Bearer"
        wrong = await console.http.get("/admin/api/conversations", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        page = await console.http.get("/admin/faq?x=1")
        assert page.status_code == 303
        assert page.headers["location"] == "/admin/login?next=/admin/faq%3Fx%3D1"
        # A cookie signed for another token (or before the token was changed) opens nothing.
        forged = session_cookie(SecretStr(ADMIN_TOKEN.replace("0", "1")), "Eve")
        console.http.cookies.set(COOKIE, forged)
        assert (await console.http.get("/admin/conversations")).status_code == 303
        ok = await console.http.get("/admin/api/conversations", headers=BEARER)
        assert ok.status_code == 200 and ok.json() == []


async def test_login_gives_a_signed_httponly_cookie_scoped_to_admin(tmp_path: Path) -> None:
    async with running_console(admin_settings(tmp_path)) as console:
        form = await console.http.get("/admin/login")
        assert form.status_code == 200 and 'name="token"' in form.text and "Admin token" in form.text
        refused = await console.http.post("/admin/login", data={"token": "guess", "next": "/admin/faq"})
        assert refused.status_code == 401 and COOKIE not in refused.cookies
        response = await console.http.post(
            "/admin/login", data={"token": ADMIN_TOKEN, "name": "Mei", "next": "https://evil.example/"}
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/admin/conversations"  # no open redirect
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "path=/admin" in cookie
        page = await console.http.get("/admin/conversations")
        assert page.status_code == 200 and "会话 Conversations" in page.text and "Mei" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        await console.http.post("/admin/logout")
        assert (await console.http.get("/admin/conversations")).status_code == 303


async def test_guessing_the_token_is_cut_off(tmp_path: Path) -> None:
    async with running_console(admin_settings(tmp_path)) as console:
        statuses = [
            (await console.http.post("/admin/login", data={"token": f"guess-{n}"})).status_code
            for n in range(11)
        ]
        assert statuses == [401] * 10 + [429]
        # Even the right token waits until the window has passed.
        right = await console.http.post("/admin/login", data={"token": ADMIN_TOKEN})
        assert right.status_code == 429


async def test_cookie_posts_from_another_site_are_refused(tmp_path: Path) -> None:
    async with running_console(admin_settings(tmp_path)) as console:
        await console.login()
        refused = await console.http.post(
            "/admin/api/tickets", data={"summary": "x"}, headers={"Origin": "https://evil.example"}
        )
        assert refused.status_code == 403
        tickets = (await console.http.get("/admin/api/tickets")).json()
        assert tickets == []


async def test_list_and_transcript_show_state_facts_summary_tools_and_latency(tmp_path: Path) -> None:
    async with running_console(admin_settings(tmp_path)) as console:
        await console.customer_says("我的订单 KF20251103001 到哪了")
        runtime = console.runtime
        conversation = await runtime.conversations.get_by_id(1)
        assert conversation is not None and conversation.id == 1
        await runtime.conversations.update(1, summary="Customer asked about order KF20251103001.")
        await runtime.conversations.append(
            1,
            [
                Message(
                    conversation_id=1,
                    role="assistant",
                    content="",
                    tool_calls=[
                        {"id": "c1", "name": "lookup_order", "arguments": {"order_id": "KF20251103001"}}
                    ],
                ),
                Message(
                    conversation_id=1, role="tool", content='{"status": "shipped"}', tool_name="lookup_order"
                ),
                Message(
                    conversation_id=1,
                    role="assistant",
                    content="Shipped yesterday.",
                    source=ReplySource.MODEL.value,
                    meta={"latency_ms": 812.5},
                ),
            ],
        )
        await console.login()
        listing = await console.http.get("/admin/conversations")
        assert "Shipped yesterday." in listing.text
        assert "KF20251103001" in listing.text  # pinned facts
        assert "Customer asked about order" in listing.text
        page = await console.http.get("/admin/conversations/1")
        assert page.status_code == 200
        text = html.unescape(page.text)
        for shown in ("lookup_order", "812.5 ms", '{"status": "shipped"}', "Bot answer: 我的订单"):
            assert shown in text, shown
        assert (await console.http.get("/admin/conversations/99")).status_code == 404


async def test_faq_edit_changes_the_cached_answer_at_once(tmp_path: Path) -> None:
    async with running_console(admin_settings(tmp_path)) as console:
        created = await console.http.post(
            "/admin/api/faq",
            headers=BEARER,
            json={
                "question": "运费多少钱",
                "answer": "满99元包邮。",
                "language": "zh",
                "alternatives": ["运费怎么算"],
            },
        )
        assert created.status_code == 201, created.text
        entry_id = created.json()["id"]
        assert (await console.customer_says("运费多少钱")).text == "满99元包邮。"
        await console.login()
        edited = await console.http.post(
            f"/admin/api/faq/{entry_id}",
            data={
                "next": "/admin/faq",
                "question": "运费多少钱",
                "alternatives": "运费怎么算",
                "answer": "全场包邮。",
                "enabled_present": "1",
                "enabled": "true",
            },
        )
        assert edited.status_code == 303 and edited.headers["location"] == "/admin/faq", edited.headers
        reply = await console.customer_says("运费怎么算")
        assert (reply.text, reply.source) == ("全场包邮。", ReplySource.FAQ_CACHE)
        assert "全场包邮。" in (await console.http.get("/admin/faq")).text


async def test_faq_import_from_the_upload_form(tmp_path: Path) -> None:
    async with running_console(admin_settings(tmp_path)) as console:
        await console.login()
        csv = "question,answer,language\nHow long is delivery?,Two to three days.,en\n"
        response = await console.http.post(
            "/admin/api/faq/import",
            data={"next": "/admin/faq"},
            files={"file": ("faq.csv", csv.encode(), "text/csv")},
        )
        assert response.status_code == 303 and response.headers["location"] == "/admin/faq?imported=1"
        assert (await console.customer_says("How long is delivery?")).text == "Two to three days."
        bad = await console.http.post(
            "/admin/api/faq/import",
            headers=BEARER,
            files={"file": ("faq.csv", b"question\nno answer\n", "text/csv")},
        )
        assert bad.status_code == 400 and "error" in bad.json()


async def add_entry(console: Console, question: str, answer: str, language: str) -> int:
    """Add an FAQ entry through the console's API; returns its id."""
    created = await console.http.post(
        "/admin/api/faq", headers=BEARER, json={"question": question, "answer": answer, "language": language}
    )
    return int(created.json()["id"])


async def test_an_accepted_customer_wording_is_answered_from_the_faq_at_once(tmp_path: Path) -> None:
    async with running_console(admin_settings(tmp_path)) as console:
        entry_id = await add_entry(console, "退货政策是什么", "七天无理由退货。", "zh")
        learned = LearnedPhrasings(db=console.runtime.db)
        # Two customers picked the entry from the suggestions after asking in their own words.
        await learned.record_pick(entry_id=entry_id, question="买错了能寄回去吗")
        await learned.record_pick(entry_id=entry_id, question="你们是骗子吧")
        assert (await console.customer_says("买错了能寄回去吗")).source is not ReplySource.FAQ_CACHE

        await console.login()
        page = await console.http.get("/admin/faq")
        assert "买错了能寄回去吗" in page.text and "你们是骗子吧" in page.text
        wordings = (await console.http.get("/admin/api/faq/learned", headers=BEARER)).json()
        ids = {w["phrasing"]: w["id"] for w in wordings}
        accepted = await console.http.post(
            f"/admin/api/faq/learned/{ids['买错了能寄回去吗']}",
            data={"next": "/admin/faq#learned", "action": "accept"},
        )
        assert accepted.status_code == 303, accepted.text
        rejected = await console.http.post(
            f"/admin/api/faq/learned/{ids['你们是骗子吧']}", headers=BEARER, json={"action": "reject"}
        )
        assert rejected.json() == {"done": True}
        again = await console.http.post(
            f"/admin/api/faq/learned/{ids['你们是骗子吧']}", headers=BEARER, json={"action": "accept"}
        )
        assert again.json() == {"done": False}  # no longer waiting for review
        bad = await console.http.post(
            f"/admin/api/faq/learned/{ids['你们是骗子吧']}", headers=BEARER, json={}
        )
        assert bad.status_code == 400

        # The wording is one of the entry's phrasings now, served from the FAQ cache in this process.
        reply = await console.customer_says("买错了能寄回去吗", chat_id="another-customer")
        assert (reply.text, reply.source) == ("七天无理由退货。", ReplySource.FAQ_CACHE)
        assert (await console.http.get("/admin/api/faq/learned", headers=BEARER)).json() == []
        entry = (await console.http.get("/admin/api/faq", headers=BEARER)).json()[0]
        assert entry["alternatives"] == ["买错了能寄回去吗"]


async def test_phrasings_the_model_wrote_are_shown_and_can_be_dropped(tmp_path: Path) -> None:
    async with running_console(admin_settings(tmp_path)) as console:
        entry_id = await add_entry(console, "When will my card arrive?", "Within 7 days.", "en")
        repository = FaqRepository(db=console.runtime.db)
        entry = await repository.get(entry_id)
        assert entry is not None
        # What the expand_faq job stores after the model wrote for the entry.
        await repository.set_generated(
            entry, ["where is my card", "card not here yet"], written_for=source_key(entry)
        )

        await console.login()
        page = await console.http.get("/admin/faq")
        assert "Phrasings the model wrote (2)" in page.text and "card not here yet" in page.text
        dropped = await console.http.post(
            f"/admin/api/faq/{entry_id}/phrasings",
            data={"next": f"/admin/faq#generated-{entry_id}", "drop": "1"},
        )
        assert dropped.status_code == 303, dropped.text
        listed = (await console.http.get("/admin/api/faq", headers=BEARER)).json()[0]
        assert listed["generated"] == ["card not here yet"] and listed["alternatives"] == []
        # Out of this process's index at once, not at the next refresh.
        retriever = console.runtime.faq_index.retriever
        assert retriever is not None and retriever.doc(entry_id).generated == ("card not here yet",)

        missing = await console.http.post(
            f"/admin/api/faq/{entry_id}/phrasings", headers=BEARER, json={"drop": 5}
        )
        assert missing.json() == {"done": False}
        bad = await console.http.post(f"/admin/api/faq/{entry_id}/phrasings", headers=BEARER, json={})
        assert bad.status_code == 400


async def test_tickets_are_created_closed_and_audited(tmp_path: Path) -> None:
    async with running_console(admin_settings(tmp_path)) as console:
        await console.customer_says("hello")
        await console.login("Mei")
        created = await console.http.post(
            "/admin/api/tickets",
            data={
                "next": "/admin/conversations/1",
                "conversation_id": "1",
                "summary": "Refund request",
                "priority": "high",
            },
        )
        assert created.status_code == 303 and created.headers["location"] == "/admin/conversations/1"
        tickets = (await console.http.get("/admin/api/tickets", headers=BEARER)).json()
        assert [(t["summary"], t["priority"], t["status"], t["conversation_id"]) for t in tickets] == [
            ("Refund request", "high", "open", 1)
        ]
        closed = await console.http.post(f"/admin/api/tickets/{tickets[0]['id']}/close", headers=BEARER)
        assert closed.json() == {"closed": True}
        page = await console.http.get("/admin/tickets?status=closed")
        assert "Refund request" in page.text
        audit = (await console.http.get("/admin/api/audit/1", headers=BEARER)).json()
        actions = [(r["actor"], r["data"].get("action")) for r in audit if r["kind"] == "admin"]
        assert ("admin:Mei", "ticket_opened") in actions and ("admin:api", "ticket_closed") in actions
        search = await console.http.get("/admin/audit?conversation=1")
        assert "ticket_opened" in search.text and "inbound" in search.text


async def test_a_reply_the_platform_cannot_take_is_reported_and_not_stored(tmp_path: Path) -> None:
    async with running_console(admin_settings(tmp_path)) as console:
        await console.customer_says("hi", channel="wechat", chat_id="openid-123")  # WeChat is switched off
        response = await console.http.post(
            "/admin/api/conversations/1/reply", headers=BEARER, json={"text": "Hello from the team"}
        )
        assert response.status_code == 502 and "no sender" in response.json()["error"]
        roles = [m.role for m in await console.runtime.conversations.messages(1)]
        assert "agent" not in roles
        empty = await console.http.post(
            "/admin/api/conversations/1/reply", headers=BEARER, json={"text": "  "}
        )
        assert empty.status_code == 400


@pytest.mark.parametrize("path", ["/admin/api/conversations/1/takeover", "/admin/api/tickets"])
async def test_malformed_api_bodies_are_400_not_500(tmp_path: Path, path: str) -> None:
    async with running_console(admin_settings(tmp_path)) as console:
        await console.customer_says("hi")
        response = await console.http.post(
            path, headers={**BEARER, "content-type": "application/json"}, content=b"{not json"
        )
        assert response.status_code in (200, 400)
        if path.endswith("tickets"):
            assert response.status_code == 400
