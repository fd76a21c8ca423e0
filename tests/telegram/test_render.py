"""Rendering and splitting answers for Telegram: what the customer reads must survive HTML parsing and
the 4096-character limit intact."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.telegram import TEXT_LIMIT, render_chunks
from tests.telegram.conftest import parse_html, utf16_len


def visible_words(text: str) -> list[str]:
    return text.replace("**", "").split()


def test_html_special_characters_are_escaped_and_bold_is_rendered() -> None:
    chunks = render_chunks("If a < b && b > c, use <script>. **Important:** done")
    assert chunks == ["If a &lt; b &amp;&amp; b &gt; c, use &lt;script&gt;. <b>Important:</b> done"]
    assert parse_html(chunks[0]) == "If a < b && b > c, use <script>. Important: done"


def test_a_9000_character_answer_becomes_three_messages_split_between_paragraphs() -> None:
    paragraph = ("Refunds reach your card within five working days. " * 18).strip()
    answer = "\n\n".join(f"{i}. {paragraph}" for i in range(10))
    assert 9000 <= len(answer) <= 9700
    chunks = render_chunks(answer)
    assert len(chunks) == 3
    for chunk in chunks:
        shown = parse_html(chunk)
        assert utf16_len(shown) <= TEXT_LIMIT
        assert re.match(r"\d\. Refunds", shown)  # each message starts at a paragraph
        assert shown.endswith("working days.")
    assert visible_words(" ".join(parse_html(c) for c in chunks)) == visible_words(answer)


def test_escaping_never_pushes_a_message_over_the_limit_or_cuts_an_entity() -> None:
    # 5,000 visible characters that become 25,000 characters of HTML: the limit is on visible text.
    answer = "&<>&&" * 1000
    chunks = render_chunks(answer)
    assert len(chunks) == 2
    assert "".join(parse_html(c) for c in chunks) == answer
    assert all(utf16_len(parse_html(c)) <= TEXT_LIMIT for c in chunks)


def test_emoji_count_twice_against_the_limit() -> None:
    chunks = render_chunks("😀" * 3000)
    assert [utf16_len(parse_html(c)) for c in chunks] == [4096, 1904]


def test_chinese_text_without_spaces_is_split_after_a_sentence() -> None:
    sentence = "您的订单已经发货，预计三天内送达。"
    chunks = render_chunks(sentence * 300)
    assert len(chunks) == 2
    assert all(parse_html(c).endswith("。") for c in chunks)


def test_bold_cut_by_a_split_stays_bold_on_both_sides() -> None:
    answer = "**" + "word " * 30 + "end**"
    chunks = render_chunks(answer, limit=80)
    assert len(chunks) == 2
    assert all(c.startswith("<b>") and c.endswith("</b>") for c in chunks)


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(
        alphabet=st.sampled_from(list("ab <>&;*\n.。你😀")) | st.characters(codec="utf-8"),
        max_size=400,
    ),
    limit=st.integers(min_value=8, max_value=120),
)
def test_any_text_renders_to_parsable_messages_within_the_limit(text: str, limit: int) -> None:
    chunks = render_chunks(text, limit=limit)
    shown = [parse_html(chunk) for chunk in chunks]
    assert all(0 < utf16_len(s) <= limit for s in shown)
    assert all(s == s.strip() for s in shown)
    # nothing lost but whitespace at the cuts (the unsplit rendering is the reference)
    whole = render_chunks(text, limit=10**6)
    reference = parse_html(whole[0]) if whole else ""
    assert "".join("".join(shown).split()) == "".join(reference.split())
