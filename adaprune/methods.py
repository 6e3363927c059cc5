"""The registry of pruning methods: every budget rule and token selector, by name.

One line per method below. The imports are plain static ones on purpose: transformers copies exactly the sibling
modules a checkpoint's code imports this way. `register` adds a method at run time (e.g. a user's own, or a test's).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .method_adaptprune import AdaptPruneSelector
from .method_autoprune import AutoPruneSelector
from .method_blend import BlendBudget
from .method_cls_attention import ClsAttentionSelector
from .method_energy import EnergyBudget
from .method_fastv import FastVSelector
from .method_fixed import FixedBudget
from .method_floor import FloorBudget
from .method_marginal import MarginalBudget
from .method_uniform import UniformSelector
from .settings import BudgetRule, PruningMethod, TokenSelector

BUDGET_RULES: dict[str, type[BudgetRule]] = {}
"""`budget_mode` -> budget rule."""

SELECTORS: dict[str, type[TokenSelector]] = {}
"""`selector` -> token selector."""


def _table(method: type[PruningMethod]) -> dict[str, type[PruningMethod]]:
    if issubclass(method, BudgetRule):
        return BUDGET_RULES  # type: ignore[return-value]
    if issubclass(method, TokenSelector):
        return SELECTORS  # type: ignore[return-value]
    raise TypeError(f"{method.__name__} is neither a BudgetRule nor a TokenSelector; subclass one of them")


def register(method: type[PruningMethod]) -> type[PruningMethod]:
    """Adds a method under its `name`; its settings become config fields and command-line flags. A setting name
    may be shared only by methods that inherit the same declaration (e.g. the spectrum settings)."""
    table = _table(method)
    if method.name in table and table[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered ({table[method.name].__name__})")
    declared = {declaration.name: declaration for other in all_methods() for declaration in other.declared()}
    for declaration in method.declared():
        if declaration.name in declared and declared[declaration.name] is not declaration:
            raise ValueError(
                f"{method.__name__} declares the setting {declaration.name!r}, which another method declares "
                "differently; rename it or inherit the shared declaration"
            )
    table[method.name] = method
    return method


def unregister(method: type[PruningMethod]) -> None:
    """Removes a method registered with `register`."""
    del _table(method)[method.name]


@contextmanager
def registered(method: type[PruningMethod]) -> Iterator[type[PruningMethod]]:
    """`register` for the duration of a block."""
    register(method)
    try:
        yield method
    finally:
        unregister(method)


def all_methods() -> list[type[PruningMethod]]:
    """Every registered method: the budget rules, then the selectors."""
    return [*BUDGET_RULES.values(), *SELECTORS.values()]


register(EnergyBudget)
register(FixedBudget)
register(MarginalBudget)
register(FloorBudget)
register(BlendBudget)
register(ClsAttentionSelector)
register(UniformSelector)
register(FastVSelector)
register(AdaptPruneSelector)
register(AutoPruneSelector)
