"""The main job (README's first command) runs end to end on a local checkpoint."""

from __future__ import annotations

import json
import re

import pytest

from adaprune.demo import main


def test_demo_converts_loads_and_reports_budgets(small_checkpoint, tmp_path, capsys: pytest.CaptureFixture) -> None:
    main(["--model", str(small_checkpoint), "--output-dir", str(tmp_path), "--max-new-tokens", "3", "--min-tokens", "2"])
    report = capsys.readouterr().out

    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config["model_type"] == "llava_adaprune"
    assert "AutoModelForImageTextToText" in config["auto_map"]
    rows = {
        match["name"]: int(match["budget"])
        for match in re.finditer(r"^(?P<name>plain|gradient|shapes|busy)\s+(?P<budget>\d+)\s", report, re.MULTILINE)
    }
    assert set(rows) == {"plain", "gradient", "shapes", "busy"}
    assert all(2 <= budget <= 64 for budget in rows.values())
    assert rows["plain"] < rows["busy"]
    kept = re.search(r"(\d+) of (\d+) visual tokens kept", report)
    assert kept and int(kept[1]) == sum(rows.values()) and int(kept[2]) == 4 * 64
