"""Guards around the model: the input guard checks customer messages before the model sees them.

Public names: :class:`InputGuard`, :class:`GuardDecision`, :func:`normalize_for_matching`,
:func:`neutralize_control_tokens`.
"""

from __future__ import annotations

from core.guards.control_tokens import neutralize_control_tokens
from core.guards.input_guard import GuardDecision, GuardMatch, InputGuard
from core.guards.normalize import normalize_for_matching

__all__ = ["GuardDecision", "GuardMatch", "InputGuard", "neutralize_control_tokens", "normalize_for_matching"]
