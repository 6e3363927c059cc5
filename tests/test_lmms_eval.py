"""The lmms-eval plugin, end to end and offline: the installed `lmms_eval` command finds `--model adaprune` through
the entry point, runs a local task made from the synthetic dataset, and scores every question as `adaprune eval`
does with the same settings; the mean kept tokens reaches the results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from adaprune.tools import synthetic_vqa
from adaprune.tools.builtin_llava import builtin_checkpoint
from adaprune.tools.evaluation import Variant, run_variant
from adaprune.tools.lmms_eval_model import AdaPruneLmms, cut_at, generation_options
from adaprune.tools.workflow import load_model

QUESTIONS = 48
SETTINGS = {"budget_mode": "fixed", "fixed_tokens": 12, "selector": "cls_attention"}


def test_lmms_eval_resolves_the_model_name_to_the_plugin_class() -> None:
    from lmms_eval.models import get_model

    assert get_model("adaprune") is AdaPruneLmms


@pytest.fixture(scope="module")
def lmms_eval_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    root = tmp_path_factory.mktemp("lmms")
    synthetic_vqa.write_lmms_eval_task(root / "tasks", QUESTIONS)
    model_args = ",".join(
        [f"pretrained={builtin_checkpoint()}", *(f"{key}={value}" for key, value in SETTINGS.items())]
    )
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "adaprune", "--model_args", model_args,
        "--tasks", "adaprune_synthetic_vqa", "--include_path", str(root / "tasks"), "--batch_size", "16",
        "--output_path", str(root / "out"), "--log_samples", "--verbosity", "DEBUG",
    ]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf")}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = [json.loads(path.read_text()) for path in (root / "out").rglob("*_results.json")]
    samples = [json.loads(line) for path in (root / "out").rglob("*_samples_*.jsonl") for line in path.open()]
    assert len(results) == 1 and len(samples) == QUESTIONS, finished.stderr[-3000:]
    return results[0], samples


def test_lmms_eval_scores_every_question_as_adaprune_eval_does(lmms_eval_run: tuple[dict, list[dict]]) -> None:
    results, samples = lmms_eval_run
    questions = list(synthetic_vqa.samples("test", QUESTIONS))
    loaded = load_model(str(builtin_checkpoint()), {})
    ours = run_variant(
        loaded.model, loaded.processor, Variant("fixed", {"enabled": True, **SETTINGS}), questions, batch_size=16
    )
    theirs = {sample["doc_id"]: bool(sample["exact_match"]) for sample in samples}
    assert [theirs[index] for index in range(QUESTIONS)] == ours.correct
    score = results["results"]["adaprune_synthetic_vqa"]["exact_match,none"]
    assert score == pytest.approx(sum(ours.correct) / QUESTIONS)
    assert score > 0.5  # the shipped model answers most questions even from 12 of 144 tokens


def test_lmms_eval_reports_the_mean_kept_tokens(lmms_eval_run: tuple[dict, list[dict]]) -> None:
    results, _ = lmms_eval_run
    assert results["throughput"]["avg_mean_kept_tokens"] == SETTINGS["fixed_tokens"]


def test_generation_options_follow_lmms_eval_conventions() -> None:
    greedy, stops = generation_options({"max_new_tokens": 8, "temperature": 0, "do_sample": False, "until": "\n"})
    assert greedy == {"max_new_tokens": 8, "num_beams": 1, "do_sample": False} and stops == ["\n"]
    sampled, stops = generation_options({"temperature": 0.7, "top_p": 0.9, "num_beams": 2})
    assert sampled == {"max_new_tokens": 128, "num_beams": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert stops == []
    assert cut_at(" red.\nUSER: more", ["\n", "USER:"]) == "red."
