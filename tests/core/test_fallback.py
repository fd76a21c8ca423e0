"""FAQ fallback while the model is down: FAQ answers with a limited-mode note, else apology + follow-up
(with the closest FAQ questions to pick from when the best one is plausible)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import select

from core.conversations import ConversationStore
from core.db.database import Database
from core.db.models import FaqEntry, Ticket
from core.errors import ModelUnavailable
from core.faq.fallback import FaqFallback, close_followup, keep_for_followup, parse_pick
from core.faq.repository import FaqRepository
from core.faq.service import RetrieverHolder, refresh_faq_cache
from core.llm.base import ChatRequest
from core.llm.testing import FunctionModel
from core.messages import ConversationKey, InboundMessage
from core.runtime import Runtime
from core.settings import load_settings
from core.texts import text as fixed_text

ENTRIES = [
    FaqEntry(
        id=1,
        question="退款多久到账？",
        answer="原路退回，1-3 个工作日到账。",
        alternatives=["退款什么时候到"],
    ),
    FaqEntry(id=2, question="支持货到付款吗？", answer="暂不支持货到付款。"),
    FaqEntry(
        id=3,
        question="When will I get my refund?",
        answer="Refunds take 1-3 business days.",
        alternatives=["How long do refunds take?"],
        language="en",
    ),
]


@pytest.fixture
async def holder() -> RetrieverHolder:
    holder = RetrieverHolder(embedder=None)
    await holder.rebuild(ENTRIES)
    return holder


@pytest.mark.parametrize(
    ("asked", "language", "answer"),
    [
        ("我的退款什么时候能到账啊", "zh", "原路退回，1-3 个工作日到账。"),
        ("how long does a refund take?", "en", "Refunds take 1-3 business days."),
    ],
)
async def test_confident_match_answers_with_the_limited_mode_note(
    holder: RetrieverHolder, asked: str, language: str, answer: str
) -> None:
    fallback = FaqFallback(retriever_holder=holder)
    result = await fallback.answer(asked, language)  # type: ignore[arg-type]
    assert result.kind == "faq" and not result.needs_followup
    assert result.text.startswith(answer)
    assert result.text.endswith(fixed_text("limited_mode_note", language))  # type: ignore[arg-type]
    assert result.confidence is not None and result.confidence >= holder.threshold


async def test_below_threshold_apologises_and_the_message_is_kept_once(
    holder: RetrieverHolder, database: Database
) -> None:
    fallback = FaqFallback(retriever_holder=holder)
    asked = "你们的耳机降噪效果怎么样"
    result = await fallback.answer(asked, "zh")
    assert result.kind == "unknown" and result.needs_followup
    assert result.text == fixed_text("limited_mode_unknown", "zh")
    assert "退款" not in result.text

    key = ConversationKey(channel="web", chat_id="s1")
    conversation = await ConversationStore(db=database).get_or_create(key, user_id="u1", language="zh")
    first = await keep_for_followup(
        database, key=key, conversation_id=conversation.id, message_id="m7", text=asked, user_id="u1"
    )
    again = await keep_for_followup(
        database, key=key, conversation_id=conversation.id, message_id="m7", text=asked, user_id="u1"
    )
    assert first.created and not again.created and first.id == again.id
    async with database.session() as session:
        tickets = (await session.exec(select(Ticket))).all()
    assert [(t.category, t.status, t.summary, t.conversation_id) for t in tickets] == [
        ("followup", "open", asked, conversation.id)
    ]


async def test_a_strict_threshold_turns_a_weak_match_into_suggestions(holder: RetrieverHolder) -> None:
    loose = await FaqFallback(retriever_holder=holder, threshold=0.0).answer("到账", "zh")
    strict = await FaqFallback(retriever_holder=holder, threshold=0.999).answer("到账", "zh")
    assert loose.kind == "faq"
    assert strict.kind == "suggest" and strict.needs_followup
    # The closest questions of the customer's language only, numbered, best first.
    assert strict.suggested == (1, 2)
    assert strict.text.splitlines() == [
        fixed_text("limited_mode_suggest", "zh"),
        "1. 退款多久到账？",
        "2. 支持货到付款吗？",
        fixed_text("limited_mode_suggest_none", "zh"),
    ]
    assert "原路退回" not in strict.text  # no answer is given until the customer picks


async def test_a_plausible_but_unsure_match_is_offered_not_answered(holder: RetrieverHolder) -> None:
    result = await FaqFallback(retriever_holder=holder).answer("退款失败了怎么办", "zh")
    assert result.kind == "suggest" and result.suggested[0] == 1
    assert result.confidence is not None and result.confidence < holder.threshold
    # Nothing plausible: the plain apology, no list.
    assert (
        await FaqFallback(retriever_holder=holder).answer("你们的耳机降噪效果怎么样", "zh")
    ).kind == "unknown"


@pytest.mark.parametrize(
    ("reply", "number"),
    [("2", 2), ("２", 2), (" 3。", 3), ("#1", 1), ("第二个", 2), ("二", 2), ("option 3", 3), ("No. 2", 2)],
)
def test_a_reply_that_only_names_a_number_is_a_pick(reply: str, number: int) -> None:
    assert parse_pick(reply) == number


@pytest.mark.parametrize("reply", ["12", "0", "2个月了还没到", "我选2但是不对", "退款", ""])
def test_other_replies_are_not_picks(reply: str) -> None:
    assert parse_pick(reply) is None


async def test_a_pick_answers_with_the_chosen_entry(holder: RetrieverHolder) -> None:
    fallback = FaqFallback(retriever_holder=holder)
    picked = fallback.pick("2", [1, 2])
    assert picked is not None and picked.kind == "picked" and not picked.needs_followup
    assert (picked.entry_id, picked.text) == (2, "暂不支持货到付款。")
    assert fallback.pick("3", [1, 2]) is None  # not on the list
    assert fallback.pick("好的", [1, 2]) is None
    await holder.rebuild([e for e in ENTRIES if e.id != 2])
    assert fallback.pick("2", [1, 2]) is None  # the entry was deleted since


async def test_closing_a_followup_closes_only_that_messages_ticket(database: Database) -> None:
    key = ConversationKey(channel="web", chat_id="s2")
    conversation = await ConversationStore(db=database).get_or_create(key, user_id="u1", language="zh")
    for message_id in ("m1", "m2"):
        await keep_for_followup(
            database, key=key, conversation_id=conversation.id, message_id=message_id, text=message_id
        )
    assert await close_followup(database, key=key, message_id="m1")
    assert not await close_followup(database, key=key, message_id="m1")  # already closed
    async with database.session() as session:
        tickets = (await session.exec(select(Ticket).order_by(Ticket.id))).all()  # type: ignore[arg-type]
    assert [(t.summary, t.status) for t in tickets] == [("m1", "closed"), ("m2", "open")]


async def test_answers_only_in_the_customers_language(holder: RetrieverHolder) -> None:
    result = await FaqFallback(retriever_holder=holder).answer("支持货到付款吗", "en")
    assert result.kind == "unknown"
    assert result.text == fixed_text("limited_mode_unknown", "en")


async def test_before_the_index_is_built_the_customer_still_gets_the_apology() -> None:
    result = await FaqFallback(retriever_holder=RetrieverHolder(embedder=None)).answer("退款多久到账", "zh")
    assert result.kind == "unknown"


# The customer's wording matches the entry with a lexical confidence of about 0.43: below the
# calibrated default, above an operator's bolder 0.4.
@pytest.mark.parametrize(("min_confidence", "kind"), [(None, "suggest"), (0.4, "faq")])
async def test_the_operator_sets_how_sure_an_faq_answer_must_be(
    tmp_path: Path, min_confidence: float | None, kind: str
) -> None:
    settings = load_settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'kefu.db'}",
        redis_url=None,
        scheduler_enabled=False,
        faq_min_confidence=min_confidence,
    )

    def model_down(request: ChatRequest) -> str:
        raise ModelUnavailable("connection refused")

    async with Runtime.open(settings, model=FunctionModel(model_down)) as runtime:
        await FaqRepository(db=runtime.db).add(
            question="退款多久到账？", answer="原路退回，1-3 个工作日到账。"
        )
        await refresh_faq_cache(db=runtime.db, store=runtime.store, retriever_holder=runtime.faq_index)
        key = ConversationKey(channel="web", chat_id="s1")
        reply = await runtime.engine.handle(
            InboundMessage(
                key=key, user_id="u1", message_id="m1", text="我的退款什么时候能到账啊", language="zh"
            )
        )
    if kind == "faq":
        assert reply.text.startswith("原路退回，1-3 个工作日到账。")
    else:
        assert reply.text.startswith(fixed_text("limited_mode_suggest", "zh"))
        assert "1. 退款多久到账？" in reply.text
