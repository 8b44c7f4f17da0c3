"""A name -> factory registry (policies, scorers): register with a decorator, build by name with the
parameters checked against the factory's signature before it runs."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

Factory = TypeVar("Factory", bound=Callable[..., object])


class Registry:
    """Factories of one ``kind`` of object (``"policy"``, ``"scorer"``), by name."""

    def __init__(self, kind: str, plural: str):
        self.kind, self.plural = kind, plural
        self._factories: dict[str, Callable[..., object]] = {}

    def register(self, name: str) -> Callable[[Factory], Factory]:
        """Decorator registering a factory under ``name``; ``ValueError`` if ``name`` is empty or
        already taken by another factory."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty str, got {name!r}")

        def decorate(factory: Factory) -> Factory:
            if not callable(factory):
                raise TypeError(f"register_{self.kind}({name!r}) needs a callable, got "
                                f"{type(factory).__name__}")
            if name in self._factories and self._factories[name] is not factory:
                raise ValueError(f"a {self.kind} named {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorate

    def unregister(self, name: str) -> None:
        if name not in self._factories:
            raise ValueError(f"no {self.kind} named {name!r} is registered")
        del self._factories[name]

    def names(self) -> list[str]:
        return sorted(self._factories)

    def takes(self, name: str, parameter: str) -> bool:
        """Whether the factory registered as ``name`` takes the keyword ``parameter`` (True for a
        factory with ``**kwargs``; False for an unknown name)."""
        if name not in self._factories:
            return False
        accepted = keyword_parameters(self._factories[name])
        return accepted is None or parameter in accepted

    def build(self, name: str, **params) -> Any:
        """``factory(**params)``; ``ValueError`` for an unknown name (listing the registered ones),
        ``TypeError`` for a parameter the factory does not take or a required one missing."""
        if not isinstance(name, str) or name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; available {self.plural}: "
                             f"{', '.join(self.names()) or '(none)'}")
        factory = self._factories[name]
        accepted = keyword_parameters(factory)
        if accepted is not None:
            unexpected = sorted(set(params) - set(accepted))
            if unexpected:
                raise TypeError(f"{self.kind} {name!r} got unexpected parameter(s) "
                                f"{', '.join(unexpected)}; it takes: "
                                f"{', '.join(accepted) or '(no parameters)'}")
            missing = [key for key, required in accepted.items()
                       if required and key not in params]
            if missing:
                raise TypeError(f"{self.kind} {name!r} needs parameter(s) {', '.join(missing)}")
        return factory(**params)


def keyword_parameters(factory: Callable[..., object]) -> dict[str, bool] | None:
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
