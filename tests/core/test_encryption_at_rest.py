"""Encryption at rest: what ConversationStore writes with a key ring is unreadable in the database file,
reads back as plaintext, cannot be moved between conversations, and old plaintext rows still read."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from core.audit import AuditLog
from core.conversations import ConversationStore
from core.crypto import KeyRing, is_token
from core.db.database import Database, sqlite_path
from core.db.models import Message
from core.errors import CryptoError
from core.messages import ConversationKey

SECRET = "我的银行卡号6222020200112233445"
CARD = "6222020200112233445"
RING = KeyRing.from_spec(f"k1:{KeyRing.generate_key()}")
KEY = ConversationKey(channel="web", chat_id="alice")


def _raw_files(db: Database) -> bytes:
    path = sqlite_path(db.url)
    assert path is not None
    # The WAL holds recent writes until a checkpoint: read it (and the shared memory index) too.
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


async def _write_a_turn(store: ConversationStore) -> int:
    conversation = await store.get_or_create(KEY, user_id="alice", language="zh")
    assert conversation.id is not None
    cid = conversation.id
    await store.append(
        cid,
        [
            Message(conversation_id=cid, role="user", content=SECRET, platform_message_id="m1"),
            Message(
                conversation_id=cid,
                role="assistant",
                content="",
                tool_calls=[{"id": "c1", "name": "bind_card", "arguments": {"card": CARD}}],
            ),
            Message(conversation_id=cid, role="tool", content=f"card {CARD} bound", tool_name="bind_card"),
            Message(conversation_id=cid, role="assistant", content=f"已绑定尾号{CARD[-4:]}的卡 ({SECRET})"),
        ],
    )
    await store.update(cid, pinned={"银行卡": CARD})
    assert await store.advance_summary(cid, expected_upto=0, summary=f"顾客绑定银行卡{CARD}", upto=2)
    return cid


async def test_store_with_key_ring_reads_back_plaintext(database: Database) -> None:
    store = ConversationStore(db=database, keyring=RING)
    cid = await _write_a_turn(store)

    rows = await store.messages(cid)
    assert [r.content for r in rows] == [SECRET, "", f"card {CARD} bound", f"已绑定尾号3445的卡 ({SECRET})"]
    assert rows[1].tool_calls == [{"id": "c1", "name": "bind_card", "arguments": {"card": CARD}}]
    assert (await store.recent_messages(cid, turns=1))[0].content == SECRET
    for conversation in (await store.get(KEY), await store.get_by_id(cid)):
        assert conversation is not None
        assert conversation.pinned == {"银行卡": CARD}
        assert conversation.summary == f"顾客绑定银行卡{CARD}"
    again = await store.get_or_create(KEY, user_id="alice", language="zh")
    assert again.pinned == {"银行卡": CARD}
    answer = await store.answer_to(cid, "m1")
    assert answer is not None and answer.content.startswith("已绑定尾号3445")


async def test_append_returns_the_callers_plaintext_rows_with_ids(database: Database) -> None:
    store = ConversationStore(db=database, keyring=RING)
    conversation = await store.get_or_create(KEY, user_id="alice", language="zh")
    assert conversation.id is not None
    row = Message(conversation_id=conversation.id, role="user", content=SECRET)

    [returned] = await store.append(conversation.id, [row])

    assert returned is row and row.id is not None and row.content == SECRET


async def test_database_columns_hold_only_ciphertext(database: Database) -> None:
    cid = await _write_a_turn(ConversationStore(db=database, keyring=RING))

    async with database.engine.connect() as conn:
        contents = (await conn.execute(text("SELECT content, tool_calls FROM messages ORDER BY id"))).all()
        summary, pinned = (
            await conn.execute(text("SELECT summary, pinned FROM conversations WHERE id = :id"), {"id": cid})
        ).one()
    assert all(is_token(c) for c, _ in contents if c)
    assert contents[1].content == ""  # an empty text stays empty: it reveals nothing
    assert '"enc"' in contents[1].tool_calls and CARD not in contents[1].tool_calls
    assert is_token(summary) and '"enc"' in pinned and CARD not in pinned


async def test_database_file_reveals_no_customer_message(database: Database) -> None:
    await _write_a_turn(ConversationStore(db=database, keyring=RING))
    await AuditLog(db=database, keyring=RING).record(
        "inbound", conversation_id=1, actor="customer:alice", data={"text": SECRET}
    )

    raw = _raw_files(database)
    assert len(raw) > 0
    for needle in (SECRET, CARD, "银行卡"):
        assert needle.encode("utf-8") not in raw, needle


async def test_without_a_key_ring_the_file_does_show_the_message(database: Database) -> None:
    # The control for the test above: the search does find plaintext when there is some.
    await _write_a_turn(ConversationStore(db=database))
    assert SECRET.encode("utf-8") in _raw_files(database)


async def test_rows_written_before_encryption_still_read(database: Database) -> None:
    cid = await _write_a_turn(ConversationStore(db=database))  # plaintext era

    store = ConversationStore(db=database, keyring=RING)
    await store.append(cid, [Message(conversation_id=cid, role="user", content="encrypted era")])

    rows = await store.messages(cid)
    assert rows[0].content == SECRET and rows[-1].content == "encrypted era"
    assert rows[1].tool_calls == [{"id": "c1", "name": "bind_card", "arguments": {"card": CARD}}]
    conversation = await store.get_by_id(cid)
    assert conversation is not None and conversation.pinned == {"银行卡": CARD}


async def test_ciphertext_moved_to_another_conversation_does_not_decrypt(database: Database) -> None:
    store = ConversationStore(db=database, keyring=RING)
    alice = await _write_a_turn(store)
    bob_key = ConversationKey(channel="web", chat_id="bob")
    bob = await store.get_or_create(bob_key, user_id="bob", language="zh")
    assert bob.id is not None
    await store.append(bob.id, [Message(conversation_id=bob.id, role="user", content="hello")])

    async with database.engine.begin() as conn:
        # Someone with database access pastes Alice's message into Bob's conversation.
        await conn.execute(
            text(
                "UPDATE messages SET content = (SELECT content FROM messages WHERE conversation_id = :a "
                "ORDER BY id LIMIT 1) WHERE conversation_id = :b"
            ),
            {"a": alice, "b": bob.id},
        )
    with pytest.raises(CryptoError, match="altered or moved"):
        await store.messages(bob.id)


async def test_reading_encrypted_rows_needs_the_key(database: Database) -> None:
    cid = await _write_a_turn(ConversationStore(db=database, keyring=RING))

    with pytest.raises(CryptoError, match="no key ring"):
        await ConversationStore(db=database).messages(cid)
    other = KeyRing.from_spec(f"k9:{KeyRing.generate_key()}")
    with pytest.raises(CryptoError, match="unknown key id 'k1'"):
        await ConversationStore(db=database, keyring=other).get_by_id(cid)
