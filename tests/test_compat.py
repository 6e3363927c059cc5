"""The supported transformers range and the differences inside it, in `adaprune.compat`.

The suite runs on both ends of the range (`.ci/run`); these tests pin what the range means: one declaration,
a clear failure below it, a warning above it, and the stock signatures on every pruning class.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
import tomllib
import transformers
from packaging.requirements import Requirement
from packaging.version import Version
from transformers import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
)

from adaprune import (
    AdaPruneLlavaForConditionalGeneration,
    AdaPruneLlavaModel,
    AdaPruneLlavaNextForConditionalGeneration,
    AdaPruneLlavaNextModel,
)
from adaprune.compat import (
    CACHE_ARGUMENT,
    MINIMUM_TRANSFORMERS,
    NEWEST_TESTED_TRANSFORMERS,
    TRANSFORMERS_REQUIREMENT,
    UntestedTransformersWarning,
    check_transformers_version,
    pop_cache,
)

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_pyproject_declares_the_tested_range() -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    declared = next(Requirement(item) for item in dependencies if Requirement(item).name == "transformers")
    assert declared == Requirement(TRANSFORMERS_REQUIREMENT)
    assert Version(MINIMUM_TRANSFORMERS) in declared.specifier
    newest = Version(NEWEST_TESTED_TRANSFORMERS)
    assert Version(f"{newest.major}.{newest.minor}.99") in declared.specifier
    assert Version(f"{newest.major}.{newest.minor + 1}.0") not in declared.specifier


def test_the_installed_transformers_is_in_the_range() -> None:
    assert Version(transformers.__version__) in Requirement(TRANSFORMERS_REQUIREMENT).specifier
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers_version()


@pytest.mark.parametrize("installed", ["5.3.0", "5.18.0", "4.57.6", f"{MINIMUM_TRANSFORMERS}.0.dev0"])
def test_an_older_transformers_fails_with_the_fix(installed: str) -> None:
    with pytest.raises(ImportError) as error:
        check_transformers_version(installed)
    message = str(error.value)
    assert f"transformers {installed} is installed" in message
    assert f"run: pip install '{TRANSFORMERS_REQUIREMENT}'" in message


@pytest.mark.parametrize("installed", [f"{MINIMUM_TRANSFORMERS}.0", f"{NEWEST_TESTED_TRANSFORMERS}.7"])
def test_both_ends_of_the_range_pass_silently(installed: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers_version(installed)


@pytest.mark.parametrize("installed", ["5.99.0", "6.0.0"])
def test_a_newer_transformers_warns_that_it_is_untested(installed: str) -> None:
    with pytest.warns(UntestedTransformersWarning, match=rf"transformers {installed} is newer than .*tested") as record:
        check_transformers_version(installed)
    assert len(record) == 1


@pytest.mark.parametrize(
    ("ours", "stock"),
    [
        (AdaPruneLlavaModel, LlavaModel),
        (AdaPruneLlavaForConditionalGeneration, LlavaForConditionalGeneration),
        (AdaPruneLlavaNextModel, LlavaNextModel),
        (AdaPruneLlavaNextForConditionalGeneration, LlavaNextForConditionalGeneration),
    ],
)
def test_every_pruning_class_has_the_stock_forward_signature(ours: type, stock: type) -> None:
    """The whole signature, annotations included: positional callers work, and tooling that inspects `forward`
    (generate's routing of `mm_encoder_outputs`, output_attentions support, ...) sees the stock model."""
    assert inspect.signature(ours.forward) == inspect.signature(stock.forward)
    assert CACHE_ARGUMENT in inspect.signature(ours.forward).parameters


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_cache_is_found_under_either_name(name: str) -> None:
    cache = object()
    arguments = {name: cache, "use_cache": True}
    assert pop_cache(arguments) is cache
    assert arguments == {"use_cache": True}
    assert pop_cache({"cache": None, "past_key_values": None}) is None
