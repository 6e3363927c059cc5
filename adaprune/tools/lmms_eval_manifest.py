"""Registers adaprune's model class with lmms-eval (entry-point group `lmms_eval.models`, see pyproject.toml).

lmms-eval loads this module on every run, so it names the class by its path instead of importing it."""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="adaprune", simple_class_path="adaprune.tools.lmms_eval_model.AdaPruneLmms")
