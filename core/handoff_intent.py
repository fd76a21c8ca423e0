"""Does the customer ask for a person? A small rule set, Chinese and English, tuned against false alarms.

Asked: the Telegram ``/human`` command (the adapter passes ``extras["command"] == "human"``), a message
that *is* a request ("人工", "转人工", "human", "agent please"), or a sentence asking to talk to /
be transferred to a person ("我要找人工客服", "can I speak to an agent?", "connect me with a real
person"). Not asked: words that merely contain "human" or "人工" ("the human resources department",
"人工智能", "人工费多少", "is this answered by a human or a bot").

The engine checks this before the input guard and answers a request with the fixed ``handoff_waiting``
text instead of asking the model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["wants_human"]

_MAX_LENGTH = 80
"""Longer messages are questions that mention a person, not a request for one; the model decides."""

# A whole message that is nothing but a request (after trimming punctuation and politeness).
_ZH_BARE = re.compile(
    r"^(?:转|找|要|接|呼叫|联系)?(?:人工|真人|客服|人工客服|人工服务|真人客服)(?:客服|服务)?$"
)
_EN_BARE = re.compile(
    r"^(?:a |an |real |live )?(?:human|agent|person|operator|representative|human agent|live agent|"
    r"real person|live person|customer service)(?: please| pls| now)?$"
)

# A request inside a sentence: a verb of wanting/reaching followed by a person.
_ZH_REQUEST = re.compile(
    r"(?:转|转接|转到|接通|切换|换|找|要|联系|呼叫|叫)(?:一下|一个|个)?"
    r"(?:人工|真人|客服人员|真人客服|人工客服|在线客服|活人)(?!费|智能|成本|湖|合成|降雨|草坪|养殖|繁殖)"
)
_ZH_NEGATED = re.compile(r"(?:不|别|不用|不要|无需|不需要)(?:转|找|要|联系)?(?:人工|真人)")
_EN_PERSON = (
    r"(?:a |an |the |your |some |one of your )?(?:real |live |actual )?"
    r"(?:human(?: being| agent)?|person|agent|operator|representative|rep|somebody|someone|"
    r"staff(?: member)?|support (?:agent|staff|person))"
)
_EN_REQUEST = re.compile(
    r"\b(?:talk|speak|chat) (?:to|with) " + _EN_PERSON + r"\b"
    r"|\b(?:connect|transfer|put|pass|hand) (?:me )?(?:over |through )?(?:to|with) " + _EN_PERSON + r"\b"
    r"|\b(?:i want|i need|i'd like|i would like|let me have|get me|give me) " + _EN_PERSON + r"\b"
    r"|\b(?:human|agent|person|operator) please\b"
)
# "...the human resources department", "a human or a bot?", "I am a real person": mentions, not requests.
_EN_NOT_PERSON = re.compile(r"\bhuman (?:resources|rights|error|body|nature|race)\b|\bhr\b")
_EN_NEGATED = re.compile(
    r"\b(?:don't|do not|no need to|never|not) (?:\w+ ){0,2}(?:talk|speak|connect|transfer)"
)

_COMMAND = re.compile(r"/human(?:@\w+)?(?:\s|$)")
_TRIM = re.compile(r"^[\s\W_]+|[\s\W_]+$", re.UNICODE)
_POLITE_ZH = re.compile(
    r"^(?:请|请帮我|帮我|我要|我想|麻烦|麻烦你|你好|您好)+|(?:吧|吗|呢|啊|谢谢|好吗|可以吗)+$"
)


def wants_human(text: str, extras: Mapping[str, Any] | None = None) -> bool:
    """True when the customer asks to be handed to a person."""
    if extras is not None and extras.get("command") == "human":
        return True
    lowered = " ".join(text.lower().split())
    if _COMMAND.match(lowered):
        return True
    if not lowered or len(lowered) > _MAX_LENGTH:
        return False
    bare = _TRIM.sub("", lowered)
    zh_bare = _POLITE_ZH.sub("", bare)
    if _ZH_BARE.fullmatch(zh_bare) or _EN_BARE.fullmatch(bare):
        return True
    if _ZH_REQUEST.search(lowered) and not _ZH_NEGATED.search(lowered) and "人工智能" not in lowered:
        return True
    if _EN_NOT_PERSON.search(lowered) or _EN_NEGATED.search(lowered):
        return False
    return _EN_REQUEST.search(lowered) is not None
