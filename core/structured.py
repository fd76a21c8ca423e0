"""Answers that must match a JSON schema (a ticket classification, an extraction), validated.

The schema goes to the backend (Ollama ``format``, OpenAI ``response_format``, a llama.cpp grammar) so the
model is constrained while it writes; the answer is then validated with the same pydantic model, and one
invalid answer is retried with the validation error shown to the model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from core.errors import ModelOutputError
from core.llm.base import ChatMessage, ChatModel, ChatRequest

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)


async def ask_structured(
    model: ChatModel,
    messages: Sequence[ChatMessage],
    schema: type[T],
    *,
    attempts: int = 2,
    max_tokens: int | None = None,
) -> T:
    """The model's answer to ``messages`` as a validated ``schema`` instance.

    Raises ModelOutputError when no attempt produced valid JSON for the schema.
    """
    prompt = list(messages)
    json_schema = schema.model_json_schema()
    error = "no attempt made"
    for attempt in range(1, attempts + 1):
        response = await model.complete(
            ChatRequest(
                messages=tuple(prompt), json_schema=json_schema, temperature=0.0, max_tokens=max_tokens
            )
        )
        try:
            return schema.model_validate_json(response.content)
        except ValidationError as exc:
            error = str(exc)
            log.warning("structured answer invalid (attempt %d): %s", attempt, error.splitlines()[0])
            prompt += [
                ChatMessage.assistant(response.content),
                ChatMessage.user(
                    f"That answer does not match the required JSON schema: {error}. Answer again."
                ),
            ]
    raise ModelOutputError(f"no valid {schema.__name__} after {attempts} attempts: {error}")
