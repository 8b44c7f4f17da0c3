"""The policy registry: names -> factories that build configured ``Policy`` objects.

A factory is any callable that takes the policy's parameters as keyword arguments, validates them
and returns a ``Policy`` (a function composing building blocks, or a ``Policy`` subclass). Built-in
policies register themselves when ``proxykv.policies`` is imported; users register their own with
the same decorator.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

Factory = TypeVar("Factory", bound=Callable[..., object])

_FACTORIES: dict[str, Callable[..., object]] = {}


def register_policy(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory`` under ``name``; ``get_policy(name, **params)`` calls it.

    Raises ``ValueError`` if ``name`` is empty or already taken (unregister nothing silently).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy name must be a non-empty str, got {name!r}")

    def decorate(factory: Factory) -> Factory:
        if not callable(factory):
            raise TypeError(f"register_policy({name!r}) needs a callable, got "
                            f"{type(factory).__name__}")
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"a policy named {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return decorate


def unregister_policy(name: str) -> None:
    """Remove ``name`` from the registry (for tests and plugins that re-register)."""
    if name not in _FACTORIES:
        raise ValueError(f"no policy named {name!r} is registered")
    del _FACTORIES[name]


def available_policies() -> list[str]:
    """The registered policy names, sorted."""
    return sorted(_FACTORIES)


def get_policy(name: str, **params):
    """Build the policy registered as ``name`` with ``params`` (validated by the policy).

    Raises ``ValueError`` for an unknown name (listing the available ones) and ``TypeError`` for a
    parameter the policy does not take (listing the ones it does).
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown policy {name!r}; available policies: "
                         f"{', '.join(available_policies()) or '(none)'}")
    factory = _FACTORIES[name]
    accepted = _keyword_parameters(factory)
    if accepted is not None:
        unexpected = sorted(set(params) - set(accepted))
        if unexpected:
            raise TypeError(f"policy {name!r} got unexpected parameter(s) {', '.join(unexpected)}; "
                            f"it takes: {', '.join(accepted) or '(no parameters)'}")
        missing = [key for key, required in accepted.items() if required and key not in params]
        if missing:
            raise TypeError(f"policy {name!r} needs parameter(s) {', '.join(missing)}")
    return factory(**params)


def _keyword_parameters(factory: Callable[..., object]) -> dict[str, bool] | None:
    """``{name: required}`` of the keyword parameters ``factory`` takes, or None when it also
    takes ``**kwargs`` or has no readable signature (then the factory checks for itself)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    parameters = {}
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              inspect.Parameter.KEYWORD_ONLY):
            parameters[parameter.name] = parameter.default is inspect.Parameter.empty
    return parameters
