#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and adaprune (editable, with test extras). Safe to re-run.
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
"$VENV/bin/python" -m pip install --quiet -e ".[test]" ${TRANSFORMERS_VERSION:+"transformers$TRANSFORMERS_VERSION"}
