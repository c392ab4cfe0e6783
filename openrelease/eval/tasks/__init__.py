"""lm-evaluation-harness tasks shipped with openrelease (YAML here; data in arithmetic.jsonl).

Pass this folder as lm-eval's ``include_path``; the eval stage always does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).parent
"""The folder of the YAML task definitions."""


def load_arithmetic(**_: Any) -> Any:
    """The fixed arithmetic problems as a ``datasets.DatasetDict`` with one ``test`` split.

    lm-eval calls this (``custom_dataset`` in the YAML) with the task's metadata, unused here;
    reading the file next to this module makes the tasks work from any working directory.
    """
    import datasets

    text = (TASKS_DIR / "arithmetic.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
