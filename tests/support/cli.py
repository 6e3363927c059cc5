"""Running the `adaprune` command in-process, and checking the pictures it writes."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from PIL import Image

from adaprune.tools.cli import main


def run_cli(argv: list[Any]) -> tuple[int, str, str]:
    """`adaprune ARGV` in-process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in argv])
    return code, out.getvalue(), err.getvalue()


def assert_nontrivial_png(path: Path, min_colours: int = 16) -> None:
    """A valid PNG with real content: many distinct colours, not a blank canvas."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) >= min_colours, f"{path} has {len(colours or [])} colours"
