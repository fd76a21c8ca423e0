"""Business tools the model may call. Each module registers its tools on a registry.

Adding a tool is one decorated async function in a module listed in ``_TOOL_MODULES``.
"""

from __future__ import annotations

from tools.registry import ToolRegistry

_TOOL_MODULES = ("tools.orders", "tools.memory")


def default_registry() -> ToolRegistry:
    """A registry with every business tool kefu ships."""
    import importlib

    registry = ToolRegistry()
    for module_name in _TOOL_MODULES:
        module = importlib.import_module(module_name)
        module.register(registry)
    return registry
