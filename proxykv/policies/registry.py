"""The policy registry: names -> factories that build configured ``Policy`` objects.

A factory is any callable that takes the policy's parameters as keyword arguments, validates them
and returns a ``Policy`` (a function composing building blocks, or a ``Policy`` subclass). Built-in
policies register themselves when ``proxykv.policies`` is imported; users register their own with
the same decorator.
"""

from __future__ import annotations

from collections.abc import Callable

from proxykv._registry import Factory, Registry

_REGISTRY = Registry("policy", "policies")


def register_policy(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory`` under ``name``; ``get_policy(name, **params)`` calls it.

    Raises ``ValueError`` if ``name`` is empty or already taken (unregister nothing silently).
    """
    return _REGISTRY.register(name)


def unregister_policy(name: str) -> None:
    """Remove ``name`` from the registry (for tests and plugins that re-register)."""
    _REGISTRY.unregister(name)


def available_policies() -> list[str]:
    """The registered policy names, sorted."""
    return _REGISTRY.names()


def get_policy(name: str, **params):
    """Build the policy registered as ``name`` with ``params`` (validated by the policy).

    Raises ``ValueError`` for an unknown name (listing the available ones) and ``TypeError`` for a
    parameter the policy does not take (listing the ones it does) or a required one missing.
    """
    return _REGISTRY.build(name, **params)
