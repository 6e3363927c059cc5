"""Running code in a fresh interpreter that cannot import adaprune, as a checkpoint's user would, and reading
which sibling modules a file imports (what transformers copies next to a checkpoint)."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RELATIVE_IMPORT = re.compile(r"^[ \t]*from[ \t]+(\.+)([\w.]*)[ \t]+import", re.MULTILINE)

# Runs first in every subprocess: the installed package must be unimportable, so only the saved code can be used.
SCRIPT_PRELUDE = '''
import sys


class _BlockAdaprune:
    """Import hook that makes the installed `adaprune` package unimportable."""

    def find_spec(self, name, path=None, target=None):
        if name == "adaprune" or name.startswith("adaprune."):
            raise ImportError(f"adaprune is blocked in this process ({name})")
        return None


sys.meta_path.insert(0, _BlockAdaprune())

import ast
import hashlib
import json

import torch

PARAMS = json.loads(sys.argv[1])
torch.set_num_threads(PARAMS["threads"])


def emit(result):
    with open(PARAMS["result_file"], "w") as file:
        json.dump(result, file)
'''


def state_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over every state_dict entry's name, dtype, shape and bytes, in key order (also run in subprocesses)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class ScriptRun:
    """Outcome of a subprocess script: exit code, its emitted JSON result (None if it emitted none), stderr."""

    returncode: int
    result: dict[str, Any] | None
    stderr: str


def run_isolated(body: str, workdir: Path, params: dict[str, Any], check: bool = True) -> ScriptRun:
    """Runs `body` after SCRIPT_PRELUDE in a fresh interpreter that cannot import adaprune: cwd and HF_HOME are new
    directories under `workdir`, offline, stdin closed; `emit(result)` stores the JSON result in a file.
    With `check`, asserts a clean exit with a result."""
    cwd, hf_home, result_file = workdir / "cwd", workdir / "hf_home", workdir / "result.json"
    params = {"threads": torch.get_num_threads(), "result_file": str(result_file), **params}
    cwd.mkdir(parents=True)
    hf_home.mkdir(parents=True)
    script = SCRIPT_PRELUDE + "\n\n" + inspect.getsource(state_checksum) + "\n\n" + textwrap.dedent(body)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "TRANSFORMERS_VERBOSITY": "error"}
    completed = subprocess.run(
        [sys.executable, "-c", script, json.dumps(params)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(result_file.read_text()) if result_file.exists() else None
    run = ScriptRun(completed.returncode, result, completed.stderr)
    if check:
        assert run.returncode == 0 and run.result is not None, f"subprocess failed:\n{run.stderr[-4000:]}"
    return run


def relative_imports(source: str) -> list[str]:
    """Sibling modules imported as `from .x import ...`; fails on forms `custom_object_save` cannot copy."""
    modules = []
    for dots, name in RELATIVE_IMPORT.findall(source):
        assert dots == "." and name and "." not in name, f"unsupported relative import 'from {dots}{name} import'"
        modules.append(name)
    return modules


REMOTE_CODE_FILES = frozenset(
    {
        "anyres_layout.py",
        "anyres_pruning.py",
        "compat.py",
        "configuration_adaprune.py",
        "decoder_probes.py",
        "decoder_pruning.py",
        "image_pruning.py",
        "method_adaptprune.py",
        "method_autoprune.py",
        "method_blend.py",
        "method_cls_attention.py",
        "method_energy.py",
        "method_fastv.py",
        "method_fixed.py",
        "method_floor.py",
        "method_marginal.py",
        "method_uniform.py",
        "methods.py",
        "modeling_adaprune.py",
        "pruned_generation.py",
        "pruned_prefill.py",
        "pruning_outputs.py",
        "sequence_compaction.py",
        "settings.py",
        "spectral_budget.py",
        "spectral_rules.py",
        "token_selection.py",
        "vision_probes.py",
    }
)
"""The code a converted checkpoint carries: exactly these sibling modules of the package."""

# What the remote code may import besides its siblings: torch, transformers, and two of transformers' own
# dependencies (its config dataclasses come from huggingface_hub, version parsing from packaging).
REMOTE_CODE_DEPENDENCIES = frozenset({"torch", "transformers", "huggingface_hub", "packaging"})


def outside_imports(source: str) -> set[str]:
    """The top-level packages a module imports that are neither the standard library nor allowed dependencies;
    relative imports must name one of the remote-code siblings."""
    outside = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            if f"{node.module}.py" not in REMOTE_CODE_FILES or node.level != 1:
                outside.add(f"{'.' * node.level}{node.module}")
            continue
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in REMOTE_CODE_DEPENDENCIES and top != "__future__":
                outside.add(name)
    return outside
