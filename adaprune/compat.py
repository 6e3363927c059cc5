"""Every difference between the transformers releases adaprune supports, in one place.

The remote code a checkpoint carries runs on whatever transformers its user has installed, so the configuration
module checks that release against the tested range before it defines anything (`check_transformers_version`):
older ones fail with one message naming the fix, newer ones warn that the combination is untested. Each
difference is detected from the installed library itself (a parameter in a stock signature, a field of a stock output class, a helper that exists), not
from version strings; no other module branches on the transformers version.

Supported: 5.19 (pre-encoded images in `generate()` with multi-image beam expansion) up to the newest tested minor.
Differences handled here:
- 5.24 renamed `past_key_values` to `cache` in model `forward` signatures, outputs and `generate()`'s model kwargs.
- 5.24 rebuilt the LLaVA outputs on `MultimodalBaseModelOutputWithPast`: `image_outputs` (the whole encoder
  output) replaces `image_hidden_states` (the concatenated features).
- 5.21 added `modeling_utils.slice_logits_to_keep`; before it, models sliced inline.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import LlavaModel
from transformers.masking_utils import create_causal_mask
from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast

MINIMUM_TRANSFORMERS = "5.19"
NEWEST_TESTED_TRANSFORMERS = "5.24"
_NEWEST = Version(NEWEST_TESTED_TRANSFORMERS)
TRANSFORMERS_REQUIREMENT = f"transformers>={MINIMUM_TRANSFORMERS},<{_NEWEST.major}.{_NEWEST.minor + 1}"
"""The pip requirement of the supported range (pyproject.toml declares the same; a test checks they agree)."""


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is newer than the newest release adaprune was tested with."""


def check_transformers_version(installed: str | None = None) -> None:
    """Raises ImportError below the supported range; warns above the newest tested minor.

    installed: a transformers version (default: the installed one)."""
    installed = transformers.__version__ if installed is None else installed
    version = Version(installed)
    if version < Version(MINIMUM_TRANSFORMERS):
        raise ImportError(
            f"adaprune needs {TRANSFORMERS_REQUIREMENT} (tested {MINIMUM_TRANSFORMERS} to "
            f"{NEWEST_TESTED_TRANSFORMERS}.x), but transformers {installed} is installed; "
            f"run: pip install '{TRANSFORMERS_REQUIREMENT}'"
        )
    if (version.major, version.minor) > (_NEWEST.major, _NEWEST.minor):
        warnings.warn(
            f"transformers {installed} is newer than the newest release adaprune was tested with "
            f"({NEWEST_TESTED_TRANSFORMERS}.x); pruning may break. If it does, run: "
            f"pip install '{TRANSFORMERS_REQUIREMENT}'",
            UntestedTransformersWarning,
            stacklevel=2,
        )


CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlavaModel.forward).parameters else "past_key_values"
"""The name under which the installed transformers passes a KV cache to `forward` and `generate`."""

CACHE_FIELD = "cache" if "cache" in LlavaModelOutputWithPast.__dataclass_fields__ else "past_key_values"
"""The name of the KV-cache field of model outputs."""

IMAGE_OUTPUTS_FIELD = (
    "image_outputs" if "image_outputs" in LlavaModelOutputWithPast.__dataclass_fields__ else "image_hidden_states"
)
"""The image field of LLaVA outputs: the whole encoder output (5.24+) or its concatenated features (before)."""

_CACHE_NAMES = ("cache", "past_key_values")


def pop_cache(arguments: dict[str, Any]) -> Any:
    """Removes the KV cache from `arguments`, given under either name, and returns it (None if absent)."""
    given = {name: arguments.pop(name) for name in _CACHE_NAMES if arguments.get(name) is not None}
    for name in _CACHE_NAMES:
        arguments.pop(name, None)
    if len(given) > 1:
        raise ValueError(f"the cache was passed twice, as {' and '.join(given)}; pass it once, as {CACHE_ARGUMENT}=")
    return next(iter(given.values()), None)


def cache_argument(cache: Any) -> dict[str, Any]:
    """Keyword arguments passing `cache` on under the installed name (nothing when there is no cache)."""
    return {} if cache is None else {CACHE_ARGUMENT: cache}


def output_cache(output: Any) -> Any:
    """The KV cache a model output carries, read without the deprecated alias."""
    return getattr(output, CACHE_FIELD, None)


def image_output_fields(image_output: Any, image_features: torch.Tensor) -> dict[str, Any]:
    """The image field of a LLaVA output: the encoder output `image_output` (5.24+), or the concatenated
    `image_features` the prompt received (before)."""
    return {IMAGE_OUTPUTS_FIELD: image_output if IMAGE_OUTPUTS_FIELD == "image_outputs" else image_features}


def model_output_fields(output: Any) -> dict[str, Any]:
    """The cache and image fields of a language-model or LLaVA output, to pass on to another output class."""
    fields = {CACHE_FIELD: output_cache(output)}
    if IMAGE_OUTPUTS_FIELD in getattr(output, "__dataclass_fields__", {}):
        fields[IMAGE_OUTPUTS_FIELD] = getattr(output, IMAGE_OUTPUTS_FIELD)
    return fields


_MASK_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def causal_mask_for_layer(
    config: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Any,
    position_ids: torch.Tensor | None,
    layer_idx: int,
) -> Any:
    """The causal attention mask (in the format of the model's attention backend) for decoder layer `layer_idx`
    over its own cache plus `inputs_embeds`' tokens, from a 2-D (batch, cache + new) padding mask."""
    return create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        layer_idx=layer_idx,
        **{_MASK_CACHE_ARGUMENT: cache},
    )


try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # before 5.21

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """The positions whose logits a forward computes: the last `logits_to_keep` (0: all) or the given indices."""
        indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, indices, :]


def with_signature_of(stock_forward: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Gives a shared forward the exact signature of the installed stock one: its argument order for positional
    callers, and its parameter names, which `generate()` and other tooling inspect (e.g. `mm_encoder_outputs`
    decides whether images are encoded before beams are expanded). Every argument reaches the shared forward by
    name; one the stock signature does not name (e.g. the other cache name) arrives among its keyword arguments."""
    signature = inspect.signature(stock_forward)
    var_keyword = next(
        name for name, parameter in signature.parameters.items() if parameter.kind is parameter.VAR_KEYWORD
    )

    def decorate(shared_forward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(shared_forward)
        def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            arguments = signature.bind(self, *args, **kwargs).arguments
            arguments.pop("self")
            return shared_forward(self, **arguments.pop(var_keyword, {}), **arguments)

        forward.__signature__ = signature  # type: ignore[attr-defined]
        return forward

    return decorate


__all__ = [
    "CACHE_ARGUMENT",
    "CACHE_FIELD",
    "IMAGE_OUTPUTS_FIELD",
    "MINIMUM_TRANSFORMERS",
    "NEWEST_TESTED_TRANSFORMERS",
    "TRANSFORMERS_REQUIREMENT",
    "UntestedTransformersWarning",
    "cache_argument",
    "causal_mask_for_layer",
    "check_transformers_version",
    "image_output_fields",
    "model_output_fields",
    "output_cache",
    "pop_cache",
    "slice_logits_to_keep",
    "with_signature_of",
]
