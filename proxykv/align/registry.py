"""Name -> aligner class registry: ``register_aligner``, ``get_aligner``, ``available_aligners``."""

from __future__ import annotations

import inspect

from proxykv.align.base import Aligner, check_model_shape

_ALIGNERS: dict[str, type[Aligner]] = {}


def register_aligner(cls: type[Aligner] | None = None, *, name: str | None = None,
                     replace: bool = False):
    """Register an ``Aligner`` subclass under ``name`` (default: its ``name`` attribute).

    Usable as ``@register_aligner`` or ``@register_aligner(name="mine")``. The class is built as
    ``cls(proxy_shape, target_shape, **params)``. Registering a taken name raises unless
    ``replace=True``.
    """
    def register(target: type[Aligner]) -> type[Aligner]:
        if not (isinstance(target, type) and issubclass(target, Aligner)):
            raise TypeError(f"register_aligner needs a subclass of proxykv.align.Aligner, got "
                            f"{target!r}")
        key = name if name is not None else target.name
        if not isinstance(key, str) or not key:
            raise ValueError(f"an aligner needs a non-empty name, got {key!r} for "
                             f"{target.__name__}")
        if key in _ALIGNERS and _ALIGNERS[key] is not target and not replace:
            raise ValueError(f"aligner {key!r} is already registered "
                             f"({_ALIGNERS[key].__name__}); pass replace=True to override it")
        _ALIGNERS[key] = target
        return target

    return register if cls is None else register(cls)


def available_aligners() -> list[str]:
    """Registered aligner names, sorted."""
    return sorted(_ALIGNERS)


def aligner_class(name: str) -> type[Aligner]:
    if name not in _ALIGNERS:
        raise ValueError(f"unknown aligner {name!r}; available: "
                         f"{', '.join(repr(n) for n in available_aligners())}")
    return _ALIGNERS[name]


def get_aligner(name: str, proxy_shape, target_shape, **params) -> Aligner:
    """Build the aligner registered as ``name`` for ``proxy_shape=(Lp, Hp)`` ->
    ``target_shape=(Lt, Ht)``; ``params`` are its keyword arguments (see each class).

    Raises ``ValueError`` for an unknown name (listing the registered ones) and ``TypeError`` for
    an unknown parameter (listing the accepted ones), like a call with an unexpected keyword.
    """
    cls = aligner_class(name)
    proxy_shape = check_model_shape("proxy_shape", proxy_shape)
    target_shape = check_model_shape("target_shape", target_shape)
    accepted = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unexpected = sorted(set(params) - set(accepted))
    if unexpected:
        raise TypeError(f"get_aligner({name!r}) got unexpected parameter(s) "
                        f"{', '.join(repr(p) for p in unexpected)}; "
                        f"accepted: {', '.join(accepted) or 'none'}")
    return cls(proxy_shape, target_shape, **params)
