"""Structured answers: schema sent to the backend, answer validated, one retry on invalid output."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel

from core.errors import ModelOutputError
from core.llm.base import ChatMessage, ChatRequest
from core.llm.llamacpp import LlamaCppModel
from core.llm.testing import FunctionModel
from core.structured import ask_structured


class TicketTriage(BaseModel):
    category: Literal["shipping", "refund", "account", "other"]
    urgent: bool


QUESTION = [ChatMessage.user("My parcel is two weeks late and I need it tomorrow! Classify this ticket.")]


async def test_the_schema_is_sent_and_the_answer_validated() -> None:
    model = FunctionModel(lambda r: '{"category": "shipping", "urgent": true}')
    triage = await ask_structured(model, QUESTION, TicketTriage)
    assert triage == TicketTriage(category="shipping", urgent=True)
    assert model.requests[0].json_schema == TicketTriage.model_json_schema()


async def test_an_invalid_answer_is_retried_with_the_error_shown() -> None:
    answers = iter(['{"category": "late parcel"}', '{"category": "shipping", "urgent": false}'])
    model = FunctionModel(lambda r: next(answers))
    triage = await ask_structured(model, QUESTION, TicketTriage)
    assert triage.category == "shipping"
    retry: ChatRequest = model.requests[1]
    assert "does not match the required JSON schema" in retry.messages[-1].content


async def test_no_valid_answer_raises_a_model_output_error() -> None:
    model = FunctionModel(lambda r: "shipping, urgent")
    with pytest.raises(ModelOutputError, match="TicketTriage"):
        await ask_structured(model, QUESTION, TicketTriage)


@pytest.mark.model
async def test_the_embedded_model_is_constrained_to_the_schema() -> None:
    async with LlamaCppModel(n_ctx=1024, max_tokens=48, temperature=0.0, seed=3) as model:
        triage = await ask_structured(model, QUESTION, TicketTriage, attempts=1)
    assert triage.category in ("shipping", "refund", "account", "other")
