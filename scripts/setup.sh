#!/usr/bin/env bash
# Creates .venv with the CPU build of torch, adaprune (editable, with test extras) and lmms-eval. Safe to re-run.
# VENV=dir puts it elsewhere; TRANSFORMERS_VERSION='==5.19' pins transformers inside the supported range
# (default: the newest release pyproject.toml allows).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first and pinned: this release is a local CPU wheel here; a looser spec would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
# lmms-eval without its declared dependencies: it declares torchvision, which pulls a CUDA build of torch over the
# CPU one (and the torchvision matching torch 2.13 cannot load its ops on the CPU build, which breaks transformers).
# Its core (registry, evaluator, task loading) needs only what the `lmms-eval-core` extra lists.
"$VENV/bin/python" -m pip install --quiet --no-deps "lmms-eval==${LMMS_EVAL_VERSION:-0.7.3}"
"$VENV/bin/python" -m pip install --quiet -e ".[test,lmms-eval-core]" ${TRANSFORMERS_VERSION:+"transformers$TRANSFORMERS_VERSION"}
"$VENV/bin/python" - <<'PY'
import importlib.util
assert importlib.util.find_spec("torchvision") is None, "torchvision got installed; remove it (pip uninstall torchvision)"
PY
