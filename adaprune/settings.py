"""How settings and pruning methods are declared: once, as frozen dataclasses.

A settings group is a frozen dataclass whose fields are declared with `setting(default, help, ...)`: the type
annotation, the default, a help string and the check live on the field, and `Settings.__post_init__` validates
every field with one message format (`name must be EXPECTED, got VALUE`). Config fields, command-line flags and
the documentation's settings table are all read from these declarations (`Settings.declared`).

A pruning method is a settings group plus the function that does its work: a `BudgetRule` says how many tokens
each budget unit keeps, a `TokenSelector` which ones. `methods.py` registers them by name.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import Field, dataclass, field, fields
from typing import Any, ClassVar

import torch


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def setting(
    default: Any,
    help: str,
    *,
    choices: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    minimum: int | None = None,
    check: Callable[[Any], bool] | None = None,
    expected: str | None = None,
) -> Any:
    """Declares one setting: its default, a help string, and what it accepts.

    choices: the allowed names (or a function returning them, for names a registry holds); minimum: for integers
    (None is accepted too when the default is None); check/expected: any other rule, with its description.
    """
    return field(
        default=default,
        metadata={"help": help, "choices": choices, "minimum": minimum, "check": check, "expected": expected},
    )


def positive_number(help: str, default: float) -> Any:
    """Declares a setting that takes any number > 0."""
    return setting(default, help, check=lambda value: is_number(value) and value > 0, expected="a number > 0")


def setting_choices(declaration: Field) -> list[str] | None:
    """The names a setting accepts, or None when it is not a choice."""
    choices = declaration.metadata.get("choices")
    if choices is None:
        return None
    return list(choices() if callable(choices) else choices)


@functools.cache
def _type_hints(owner: type) -> dict[str, Any]:
    """The resolved annotations of a settings class (resolving them is slow, and they never change)."""
    return typing.get_type_hints(owner)


def setting_type(declaration: Field, owner: type) -> type:
    """The value type of a setting (bool, int, float or str), from its annotation; `X | None` gives X."""
    annotation = _type_hints(owner)[declaration.name]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def _expectation(declaration: Field, owner: type) -> tuple[Callable[[Any], bool], str]:
    """The rule a setting's value must follow and how the error message describes it."""
    metadata = declaration.metadata
    if metadata.get("check") is not None:
        return metadata["check"], metadata["expected"]
    choices = setting_choices(declaration)
    if choices is not None:
        return (lambda value: isinstance(value, str) and value in choices), f"one of {choices}"
    kind = setting_type(declaration, owner)
    optional = declaration.default is None
    if kind is bool:
        return (lambda value: isinstance(value, bool)), "True or False"
    if kind is int:
        minimum = metadata.get("minimum")
        description = "an integer" + ("" if minimum is None else f" >= {minimum}")

        def in_range(value: Any) -> bool:
            return is_int(value) and (minimum is None or value >= minimum)

        if optional:
            return (lambda value: value is None or in_range(value)), f"None or {description}"
        return in_range, description
    if kind is float:
        return is_number, "a number"
    return (lambda value: isinstance(value, kind)), f"a {kind.__name__}"


def check_setting(name: str, condition: bool, expected: str, value: Any) -> None:
    """Raises the settings error: `name must be EXPECTED, got VALUE`."""
    if not condition:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class Settings:
    """Base of every settings group: each field is checked against its declaration after construction."""

    def __post_init__(self) -> None:
        for declaration in fields(self):
            rule, expected = _expectation(declaration, type(self))
            value = getattr(self, declaration.name)
            check_setting(declaration.name, rule(value), expected, value)

    @classmethod
    def declared(cls) -> tuple[Field, ...]:
        """The group's setting declarations, in order."""
        return fields(cls)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PruningMethod(Settings):
    """A registered method: its parameters are the dataclass fields; `name` is its registry key and the value
    of the config field that chooses it; the class docstring cites its source."""

    name: ClassVar[str]


@dataclass(frozen=True)
class BudgetRule(PruningMethod):
    """How many tokens each budget unit keeps (`budget_mode`).

    How a target mean budget is met (for calibration and benchmarks at matched means): `target_setting` names a
    setting whose value is the budget itself (a target mean sets it); `calibrated_setting` one that calibration
    searches on the images' energy curves. A rule with neither cannot be run at a target mean yet.
    """

    target_setting: ClassVar[str | None] = None
    calibrated_setting: ClassVar[str | None] = None

    def budgets(self, spectrum_features: torch.Tensor) -> torch.LongTensor:
        """Per-unit budgets (n,) for (n, N, d) features, on their device."""
        raise NotImplementedError


@dataclass(frozen=True)
class TokenSelector(PruningMethod):
    """Which tokens each budget unit keeps (`selector`). `required_signals` names what the model must compute
    besides the features (e.g. the vision tower's [CLS] attention). `stage` says where it runs: "vision" on the
    image features before the language model, "language" inside it (`LanguageModelSelector`)."""

    required_signals: ClassVar[frozenset[str]] = frozenset()
    stage: ClassVar[str] = "vision"

    def keep_mask(self, signals: dict[str, torch.Tensor], budgets: torch.Tensor) -> torch.Tensor:
        """(n, N) bool: which of each unit's N tokens to keep, `budgets[i]` of them. `signals["features"]` holds
        the (n, N, d) spectrum features, the others are (n, N, ...)."""
        raise NotImplementedError


@dataclass(frozen=True)
class LanguageModelSelector(TokenSelector):
    """A selector that prunes inside the language model: during prefill, at each of its cut layers the visual
    tokens it drops leave the sequence, so the layers from there on run on the shorter sequence and cache only the
    kept tokens, while the layers below see and cache the tokens as they were.

    At a cut before decoder layer c, its signals describe each budget unit's tokens as they enter layer c:
    `"present"` (n, N) marks the tokens still in the sequence (a vision stage or an earlier cut may have dropped
    some), and the budgets never exceed the units' first count of them. On request (`required_signals`):
    `"prompt_attention"` (n, N) the attention of the prompt's last token to each token at layer c - 1, averaged
    over heads (-inf where not present); `"text_attention"` (n, N, heads, Q) the attention probabilities of the
    text after the row's last image (its last token included; Q rows, zero past a unit's `"text_rows"` (n,)) at
    layer c - 1; `"keys"` (n, N, d) layer c's key projection of its input; `"grid"` the units' `PatchGrid`;
    `"cls_attention"` (n, N) the vision tower's [CLS] attention to each token (0 at LLaVA-NeXT newlines). Always:
    `"n_layers"`, the language model's depth."""

    stage: ClassVar[str] = "language"
    required_signals: ClassVar[frozenset[str]] = frozenset({"prompt_attention"})

    def cut_layers(self, n_layers: int) -> tuple[int, ...]:
        """The decoder layers before which this selector prunes, ascending, for a language model of `n_layers`."""
        raise NotImplementedError

    def keep_at(
        self, layer: int, signals: dict[str, Any], budgets: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """(n, N) bool: the tokens each unit keeps from cut `layer` on, among the present ones. `record` lives for
        one prefill: what earlier cuts stored (e.g. a schedule), and what the user may read afterwards."""
        raise NotImplementedError


@dataclass(frozen=True)
class SingleCutSelector(LanguageModelSelector):
    """An in-LLM selector that cuts once, before decoder layer `prune_layer` (K), keeping each unit's budget."""

    prune_layer: int = setting(
        2,
        "fastv, adaptprune: the decoder layer K from which dropped visual tokens leave the sequence (layers below K "
        "see every token); the attention cue comes from layer K - 1",
        minimum=1,
    )

    def cut_layers(self, n_layers: int) -> tuple[int, ...]:
        return (self.prune_layer,)

    def keep_at(
        self, layer: int, signals: dict[str, Any], budgets: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return self.keep_mask(signals, budgets)


__all__ = [
    "BudgetRule",
    "LanguageModelSelector",
    "PruningMethod",
    "Settings",
    "SingleCutSelector",
    "TokenSelector",
    "check_setting",
    "is_int",
    "is_number",
    "positive_number",
    "setting",
    "setting_choices",
    "setting_type",
]
