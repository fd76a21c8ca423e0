"""Business tools the model may call. Each module registers its tools on a registry.

Adding a tool is one decorated async function in a module listed in ``_TOOL_MODULES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tools.registry import ToolRegistry

if TYPE_CHECKING:
    from core.faq.service import RetrieverHolder

_TOOL_MODULES = ("tools.orders", "tools.memory", "tools.tickets", "tools.faq", "tools.handoff")


def default_registry(*, faq_index: RetrieverHolder | None = None) -> ToolRegistry:
    """A registry with every business tool kefu ships.

    Shared services (``faq_index``: the process's FAQ index) go to the modules whose ``register``
    accepts them by name.
    """
    import importlib
    import inspect

    services: dict[str, object] = {"faq_index": faq_index}
    registry = ToolRegistry()
    for module_name in _TOOL_MODULES:
        module = importlib.import_module(module_name)
        accepted = inspect.signature(module.register).parameters
        module.register(registry, **{k: v for k, v in services.items() if k in accepted and v is not None})
    return registry
