"""lmms-eval model `adaprune`: any LLaVA or LLaVA-NeXT checkpoint (stock or converted) run with visual-token pruning.

    lmms-eval --model adaprune --model_args pretrained=DIR_OR_HUB_ID[,energy_ratio=0.9,min_tokens=16,...] \\
        --tasks gqa,mme,pope --batch_size 8 --output_path results/

Every pruning setting (`budget_mode`, `fixed_tokens`, `selector`, ...) is a model argument and overrides the
checkpoint's own; `device` and `batch_size` as lmms-eval passes them. Under `accelerate launch -m lmms_eval` each
process takes its share of the requests on its own GPU. The mean kept visual tokens per image is logged at the end
and stored with the run's throughput metrics (`avg_mean_kept_tokens` in the results JSON).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger
from PIL import Image
from tqdm.auto import tqdm

from .evaluation import kept_tokens, recorded_budgets
from .workflow import load_model, prompt_for

DEFAULT_MAX_NEW_TOKENS = 128


def generation_options(gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """lmms-eval's generation kwargs as `generate()` options, and the stop strings (`until`) to cut answers at."""
    options = dict(gen_kwargs)
    until = options.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(options.pop("temperature", 0) or 0)
    settings = {
        "max_new_tokens": int(options.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
        "num_beams": int(options.pop("num_beams", 1) or 1),
        "do_sample": bool(options.pop("do_sample", False)) or temperature > 0,
    }
    if settings["do_sample"]:
        settings["temperature"] = temperature or 1.0
        if options.get("top_p") is not None:
            settings["top_p"] = float(options.pop("top_p"))
    return settings, until


def cut_at(text: str, stops: list[str]) -> str:
    for stop in stops:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()


class AdaPruneLmms(lmms):
    """A pruning LLaVA for lmms-eval's `generate_until` tasks (batched, one or more images per request)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 1,
        device: str | None = None,
        max_batch_size: int | None = None,
        **pruning: Any,
    ) -> None:
        super().__init__()
        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
            device = str(accelerator.device)
        self.loaded = load_model(str(pretrained), pruning)
        self.model = self.loaded.model.to(device or "cpu")
        self.processor = self.loaded.processor
        self.processor.tokenizer.padding_side = "left"
        self.batch_size_per_gpu = int(batch_size)
        self.kept_tokens: list[int] = []

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; requests are batched by equal generation options and image count."""
        visuals = [self._visuals(request) for request in requests]
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps([request.args[1], len(visuals[index])], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        answers: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="adaprune")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch_answers = self._answer([requests[index] for index in chunk], [visuals[index] for index in chunk])
                for index, answer in zip(chunk, batch_answers):
                    answers[index] = answer
                progress.update(len(chunk))
        progress.close()
        if self.kept_tokens:
            mean = sum(self.kept_tokens) / len(self.kept_tokens)
            logger.info(
                f"adaprune: {mean:.1f} visual tokens kept per image on average ({len(self.kept_tokens)} images)"
            )
            log_metrics(0.0, 0, 0.0, additional_metrics={"mean_kept_tokens": mean})
        return answers

    def _visuals(self, request: Instance) -> list[Image.Image]:
        """The request's images (lmms-eval's `doc_to_visual` of its document), as RGB."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        return [image.convert("RGB") for image in doc_to_visual(self.task_dict[task][split][doc_id])]

    def _answer(self, batch: list[Instance], visuals: list[list[Image.Image]]) -> list[str]:
        """Greedy or sampled answers to one batch of requests sharing generation options and image count."""
        prompts = [prompt_for(self.processor, request.args[0], len(images)) for request, images in zip(batch, visuals)]
        images = [image for request_images in visuals for image in request_images]
        options, stops = generation_options(batch[0].args[1])
        inputs = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt").to(
            self.model.device
        )
        with torch.inference_mode(), recorded_budgets(self.model) as recorded:
            output = self.model.generate(**inputs, **options)
        if images:
            self.kept_tokens.extend(kept_tokens(self.model, inputs, recorded))
        texts = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers = [cut_at(text, stops) for text in texts]
        for request, answer in zip(batch, answers):
            self.cache_hook.add_partial("generate_until", (request.args[0], request.args[1]), answer)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("adaprune's lmms-eval model answers generate_until tasks only")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("adaprune's lmms-eval model answers single-round generate_until tasks only")
