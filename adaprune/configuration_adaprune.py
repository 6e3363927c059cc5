"""Configuration of the pruning LLaVA models: a stock `LlavaConfig` plus the E-AdaPrune settings."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig, LlavaNextConfig

from .compat import check_transformers_version
from .sequence_compaction import POSITION_POLICIES
from .token_selection import SELECTORS

check_transformers_version()  # before any class is defined: the remote code's first contact with the installed library

BUDGET_MODES = ("energy", "fixed")
SPECTRUM_SOURCES = ("vision", "projected")
SPECTRUM_SOLVERS = ("exact", "randomized")
BUDGET_SCOPES = ("image", "crop")
NEWLINE_POLICIES = ("keep_rows", "drop")
STOCK_MODEL_TYPES = {"llava_adaprune": "llava", "llava_next_adaprune": "llava_next"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(condition: bool, field: str, expected: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"{field} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class PruningSettings:
    """The validated pruning settings of a model; built from the config on every use, so edits are checked too.

    enabled: off makes the model behave exactly like the stock one.
    budget_mode: "energy" (per-image budget from the spectrum) or "fixed" (every image keeps `fixed_tokens`).
    energy_ratio: tau in (0, 1], the fraction of spectral energy the kept rank must hold.
    min_tokens / max_tokens: clamp on each image's budget (max None = the image's token count).
    spectrum_source: "vision" (the vision tower's selected-layer features, the projector's input) or "projected".
    center_spectrum: subtract each image's mean token first (PCA-style). On by default: CLIP features share a
        large mean component that otherwise takes most of the energy and makes every budget alike.
    spectrum_solver: "exact" (all eigenvalues of the Gram matrix) or "randomized" (top `randomized_rank`).
    selector: registered name of the selector that picks the kept tokens (see `token_selection.SELECTORS`).
    position_policy: "compact" (kept tokens get consecutive positions) or "original" (they keep theirs).
    """

    enabled: Any = True
    budget_mode: Any = "energy"
    energy_ratio: Any = 0.9
    fixed_tokens: Any = 64
    min_tokens: Any = 16
    max_tokens: Any = None
    spectrum_source: Any = "vision"
    center_spectrum: Any = True
    spectrum_solver: Any = "exact"
    randomized_rank: Any = 128
    randomized_oversampling: Any = 16
    randomized_power_iterations: Any = 2
    selector: Any = "cls_attention"
    position_policy: Any = "compact"

    def __post_init__(self) -> None:
        _check(isinstance(self.enabled, bool), "enabled", "True or False", self.enabled)
        _check(self.budget_mode in BUDGET_MODES, "budget_mode", f"one of {BUDGET_MODES}", self.budget_mode)
        _check(
            _is_number(self.energy_ratio) and 0 < self.energy_ratio <= 1,
            "energy_ratio",
            "a number in (0, 1]",
            self.energy_ratio,
        )
        _check(_is_int(self.fixed_tokens) and self.fixed_tokens >= 1, "fixed_tokens", "an integer >= 1", self.fixed_tokens)
        _check(_is_int(self.min_tokens) and self.min_tokens >= 1, "min_tokens", "an integer >= 1", self.min_tokens)
        _check(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= self.min_tokens),
            "max_tokens",
            f"None or an integer >= min_tokens ({self.min_tokens})",
            self.max_tokens,
        )
        _check(
            self.spectrum_source in SPECTRUM_SOURCES, "spectrum_source", f"one of {SPECTRUM_SOURCES}", self.spectrum_source
        )
        _check(isinstance(self.center_spectrum, bool), "center_spectrum", "True or False", self.center_spectrum)
        _check(
            self.spectrum_solver in SPECTRUM_SOLVERS, "spectrum_solver", f"one of {SPECTRUM_SOLVERS}", self.spectrum_solver
        )
        _check(
            _is_int(self.randomized_rank) and self.randomized_rank >= 1,
            "randomized_rank",
            "an integer >= 1",
            self.randomized_rank,
        )
        _check(
            _is_int(self.randomized_oversampling) and self.randomized_oversampling >= 0,
            "randomized_oversampling",
            "an integer >= 0",
            self.randomized_oversampling,
        )
        _check(
            _is_int(self.randomized_power_iterations) and self.randomized_power_iterations >= 0,
            "randomized_power_iterations",
            "an integer >= 0",
            self.randomized_power_iterations,
        )
        _check(self.selector in SELECTORS, "selector", f"one of {sorted(SELECTORS)}", self.selector)
        _check(
            self.position_policy in POSITION_POLICIES,
            "position_policy",
            f"one of {POSITION_POLICIES}",
            self.position_policy,
        )

    @classmethod
    def from_config(cls, config: Any) -> PruningSettings:
        return cls(**{field.name: getattr(config, field.name) for field in fields(cls)})


@dataclass(frozen=True)
class AnyResPruningSettings(PruningSettings):
    """`PruningSettings` plus the choices that only exist for any-resolution (LLaVA-NeXT) images.

    budget_scope: "image" (one spectrum and one budget over all of an image's crops; default) or "crop" (one per
        crop: the base crop and each high-resolution crop get their own budget, min/max tokens apply per crop).
    newline_policy: "keep_rows" (keep the newline token of every grid row that keeps at least one token, so the
        2-D layout cue survives; default) or "drop" (drop every newline token).
    """

    budget_scope: Any = "image"
    newline_policy: Any = "keep_rows"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.budget_scope in BUDGET_SCOPES, "budget_scope", f"one of {BUDGET_SCOPES}", self.budget_scope)
        _check(
            self.newline_policy in NEWLINE_POLICIES,
            "newline_policy",
            f"one of {NEWLINE_POLICIES}",
            self.newline_policy,
        )


@dataclass
class PruningConfigFields:
    """The pruning settings as config fields (defaults as in `PruningSettings`), shared by every pruning config."""

    enabled: Any = PruningSettings.enabled
    budget_mode: Any = PruningSettings.budget_mode
    energy_ratio: Any = PruningSettings.energy_ratio
    fixed_tokens: Any = PruningSettings.fixed_tokens
    min_tokens: Any = PruningSettings.min_tokens
    max_tokens: Any = PruningSettings.max_tokens
    spectrum_source: Any = PruningSettings.spectrum_source
    center_spectrum: Any = PruningSettings.center_spectrum
    spectrum_solver: Any = PruningSettings.spectrum_solver
    randomized_rank: Any = PruningSettings.randomized_rank
    randomized_oversampling: Any = PruningSettings.randomized_oversampling
    randomized_power_iterations: Any = PruningSettings.randomized_power_iterations
    selector: Any = PruningSettings.selector
    position_policy: Any = PruningSettings.position_policy

    settings_class: ClassVar[type[PruningSettings]] = PruningSettings

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("model_type", None)  # a stock config's model_type, replaced by ours
        super().__post_init__(**kwargs)  # type: ignore[misc]
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
class AdaPruneConfig(PruningConfigFields, LlavaConfig):
    """`LlavaConfig` with E-AdaPrune pruning settings; loads stock llava configs too."""

    model_type = "llava_adaprune"


@dataclass
class AnyResPruningConfigFields(PruningConfigFields):
    """The any-resolution pruning settings as config fields (defaults as in `AnyResPruningSettings`)."""

    budget_scope: Any = AnyResPruningSettings.budget_scope
    newline_policy: Any = AnyResPruningSettings.newline_policy

    settings_class: ClassVar[type[PruningSettings]] = AnyResPruningSettings


@strict
class AdaPruneLlavaNextConfig(AnyResPruningConfigFields, LlavaNextConfig):
    """`LlavaNextConfig` with E-AdaPrune pruning settings (plus budget scope and newline policy); loads stock
    llava_next configs too."""

    model_type = "llava_next_adaprune"


PRUNING_CONFIGS = {config.model_type: config for config in (AdaPruneConfig, AdaPruneLlavaNextConfig)}


def settings_class_for(model_type: str | None) -> type[PruningSettings]:
    """The settings class of a pruning model type or of the stock type it converts (else `PruningSettings`)."""
    stock_to_ours = {stock: ours for ours, stock in STOCK_MODEL_TYPES.items()}
    config = PRUNING_CONFIGS.get(stock_to_ours.get(model_type, model_type))
    return config.settings_class if config is not None else PruningSettings


__all__ = ["AdaPruneConfig", "AdaPruneLlavaNextConfig", "AnyResPruningSettings", "PruningSettings"]
