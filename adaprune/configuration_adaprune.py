"""Configuration of the pruning LLaVA models: a stock `LlavaConfig` (or `LlavaNextConfig`) plus the pruning settings.

The settings are not listed here: they are the core choices below, each model family's own, and the parameters of
every method in the registry (`methods.py`), each declared once with `settings.setting`. A config carries every
one of them as a plain attribute (written to config.json), filled with its declared default when absent.
"""

from __future__ import annotations

from dataclasses import Field, dataclass
from typing import Any, ClassVar

import torch
from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig, LlavaNextConfig

from .compat import check_transformers_version
from .methods import BUDGET_RULES, SELECTORS, all_methods
from .sequence_compaction import POSITION_POLICIES
from .settings import BudgetRule, Settings, TokenSelector, setting
from .spectral_rules import SpectrumSettings

check_transformers_version()  # before any class is defined: the remote code's first contact with the installed library

STOCK_MODEL_TYPES = {"llava_adaprune": "llava", "llava_next_adaprune": "llava_next"}


@dataclass(frozen=True)
class CoreSettings(Settings):
    """Whether to prune, which registered budget rule and selector, and how kept tokens are numbered."""

    enabled: bool = setting(True, "off: the model behaves exactly like the stock one")
    budget_mode: str = setting(
        "energy",
        "the budget rule, a registered name: 'energy' (E-AdaPrune: each image keeps the smallest rank holding "
        "energy_ratio of its spectral energy), 'fixed' (every image keeps fixed_tokens, the fixed-budget baseline "
        "with the same selector), 'marginal' (one token per spectral component holding at least marginal_share of "
        "the image's energy), 'floor' ('energy' but never below floor_fraction x fixed_tokens) or 'blend' "
        "(between fixed_tokens and the 'energy' budget, by blend_weight)",
        choices=lambda: BUDGET_RULES,
    )
    selector: str = setting(
        "cls_attention",
        "which tokens to keep, a registered name: before the language model 'cls_attention' (those the vision "
        "tower's [CLS] query attends to most at the feature layer, mean over heads, from that layer's own queries "
        "and keys so the tower stays on SDPA) or 'uniform' (evenly spaced in raster order); inside it, from "
        "decoder layer prune_layer on, 'fastv' (those the prompt's last token attends to most) or 'adaptprune' "
        "(that cue times a spatial prior, then soft non-maximum suppression), or after every decoder layer "
        "'autoprune' (a per-image schedule over depth from text-vision mutual information; the budget is its mean "
        "per layer)",
        choices=lambda: SELECTORS,
    )
    vision_stage_selector: str = setting(
        "none",
        "with an in-LLM selector: 'none' (the language model receives every visual token) or a vision-stage "
        "selector ('cls_attention', 'uniform') that first keeps vision_stage_tokens of each image, so both stages "
        "prune",
        choices=lambda: ["none", *(name for name, method in SELECTORS.items() if method.stage == "vision")],
    )
    vision_stage_tokens: int = setting(
        288,
        "with a vision_stage_selector: the tokens of each image (LLaVA-NeXT: budget unit) the vision stage keeps; "
        "the in-LLM selector then keeps the budget among them",
        minimum=1,
    )
    position_policy: str = setting(
        "compact",
        "'compact' (kept tokens get consecutive positions, as if the image had k tokens) or 'original' (they keep "
        "their unpruned position ids)",
        choices=POSITION_POLICIES,
    )


@dataclass(frozen=True)
class AnyResSettings(Settings):
    """The choices that only exist for any-resolution (LLaVA-NeXT) images."""

    budget_scope: str = setting(
        "image",
        "LLaVA-NeXT: 'image' (one spectrum and one budget over all of an image's crops) or 'crop' (one per crop: "
        "min/max/fixed tokens apply per crop)",
        choices=("image", "crop"),
    )
    newline_policy: str = setting(
        "keep_rows",
        "LLaVA-NeXT: 'keep_rows' (keep the newline token of every grid row that keeps a token, so the 2-D layout "
        "cue survives) or 'drop' (drop every newline token)",
        choices=("keep_rows", "drop"),
    )


class PruningSettings:
    """The validated pruning settings of a model, built from its config on every use (so edits are checked too).

    The settings are flat attributes (`settings.energy_ratio`), one per declaration of the groups: the core
    choices, the model family's own (`family_groups`) and every registered method's parameters. Every group is
    validated, the unused methods' too. `budget_rule` and `token_selector` are the chosen methods with their
    parameters. Frozen; equal when of the same class with the same values.
    """

    family_groups: ClassVar[tuple[type[Settings], ...]] = ()

    @classmethod
    def groups(cls) -> list[type[Settings]]:
        return [CoreSettings, *cls.family_groups, *all_methods()]

    @classmethod
    def declared(cls) -> dict[str, tuple[Field, type[Settings]]]:
        """Every setting's declaration and the first group that declares it, by name, in order."""
        declarations: dict[str, tuple[Field, type[Settings]]] = {}
        for group in cls.groups():
            for declaration in group.declared():
                declarations.setdefault(declaration.name, (declaration, group))
        return declarations

    @classmethod
    def field_names(cls) -> list[str]:
        return list(cls.declared())

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {name: declaration.default for name, (declaration, _) in cls.declared().items()}

    @classmethod
    def from_config(cls, config: Any) -> PruningSettings:
        return cls(**{name: getattr(config, name) for name in cls.field_names() if hasattr(config, name)})

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(self.field_names()))
        if unknown:
            raise TypeError(f"unknown pruning settings {unknown}; the settings are {self.field_names()}")
        values = {**self.defaults(), **values}
        groups = {
            group: group(**{declaration.name: values[declaration.name] for declaration in group.declared()})
            for group in self.groups()
        }
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_groups", groups)
        if self.token_selector.stage == "vision" and self.vision_stage_selector != "none":
            raise ValueError(
                f"vision_stage_selector={self.vision_stage_selector!r} adds a vision stage to an in-LLM selector, but "
                f"selector={self.selector!r} already prunes at the vision stage; set vision_stage_selector='none' "
                "or choose an in-LLM selector"
            )

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen; change the config and read config.pruning again")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.as_dict() == self.as_dict()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{name}={value!r}' for name, value in self._values.items())})"

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    @property
    def budget_rule(self) -> BudgetRule:
        """The chosen budget rule (`budget_mode`) with its parameters."""
        return self._groups[BUDGET_RULES[self.budget_mode]]

    @property
    def token_selector(self) -> TokenSelector:
        """The chosen selector (`selector`) with its parameters."""
        return self._groups[SELECTORS[self.selector]]

    @property
    def vision_selector(self) -> TokenSelector | None:
        """The selector of the vision stage: the chosen one if it runs there, else `vision_stage_selector`'s
        (None: the vision stage keeps every token for the in-LLM selector)."""
        if self.token_selector.stage == "vision":
            return self.token_selector
        if self.vision_stage_selector == "none":
            return None
        return self._groups[SELECTORS[self.vision_stage_selector]]

    def vision_stage_budgets(self, budgets: torch.Tensor, n_tokens: int) -> torch.LongTensor:
        """How many of a unit's `n_tokens` the vision stage keeps, given the units' final `budgets`."""
        if self.token_selector.stage == "vision":
            return budgets
        kept = n_tokens if self.vision_stage_selector == "none" else min(self.vision_stage_tokens, n_tokens)
        return torch.full_like(budgets, kept)

    @property
    def spectrum(self) -> SpectrumSettings:
        """How the energy curves are computed (E-AdaPrune's rule; also what calibration searches over)."""
        return SpectrumSettings(
            **{declaration.name: self._values[declaration.name] for declaration in SpectrumSettings.declared()}
        )


class AnyResPruningSettings(PruningSettings):
    """`PruningSettings` plus the choices that only exist for any-resolution (LLaVA-NeXT) images."""

    family_groups = (AnyResSettings,)


class PruningConfigMixin:
    """What every pruning config adds to its stock config: the settings as attributes, checked at construction
    and by `pruning` on every use; and reading a stock config as the base of a pruning one."""

    settings_class: ClassVar[type[PruningSettings]] = PruningSettings

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("model_type", None)  # a stock config's model_type, replaced by ours
        super().__post_init__(**kwargs)  # type: ignore[misc]
        for name, default in self.settings_class.defaults().items():
            if not hasattr(self, name):
                setattr(self, name, default)
        self.pruning  # noqa: B018 - validates the pruning settings at construction

    @property
    def pruning(self) -> PruningSettings:
        """The current settings, validated (raises ValueError naming a bad field)."""
        return self.settings_class.from_config(self)

    @classmethod
    def get_config_dict(cls, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reads a stock config (model_type "llava") as the base of a pruning one, under our model type."""
        config_dict, unused = super().get_config_dict(*args, **kwargs)  # type: ignore[misc]
        if config_dict.get("model_type") == STOCK_MODEL_TYPES.get(cls.model_type):  # type: ignore[attr-defined]
            config_dict = {**config_dict, "model_type": cls.model_type}  # type: ignore[attr-defined]
        return config_dict, unused


@strict
class AdaPruneConfig(PruningConfigMixin, LlavaConfig):
    """`LlavaConfig` with the pruning settings; loads stock llava configs too."""

    model_type = "llava_adaprune"


@strict
class AdaPruneLlavaNextConfig(PruningConfigMixin, LlavaNextConfig):
    """`LlavaNextConfig` with the pruning settings (plus budget scope and newline policy); loads stock llava_next
    configs too."""

    model_type = "llava_next_adaprune"
    settings_class = AnyResPruningSettings


PRUNING_CONFIGS = {config.model_type: config for config in (AdaPruneConfig, AdaPruneLlavaNextConfig)}


def settings_class_for(model_type: str | None) -> type[PruningSettings]:
    """The settings class of a pruning model type or of the stock type it converts (else `PruningSettings`)."""
    stock_to_ours = {stock: ours for ours, stock in STOCK_MODEL_TYPES.items()}
    config = PRUNING_CONFIGS.get(stock_to_ours.get(model_type, model_type))
    return config.settings_class if config is not None else PruningSettings


__all__ = [
    "AdaPruneConfig",
    "AdaPruneLlavaNextConfig",
    "AnyResPruningSettings",
    "AnyResSettings",
    "CoreSettings",
    "PruningSettings",
]
