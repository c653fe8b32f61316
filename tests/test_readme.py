"""Every Python example of the README runs, in order, as a reader would paste them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 10


def test_every_python_example_runs_in_order() -> None:
    namespace: dict[str, Any] = {"__name__": "readme"}
    for number, block in enumerate(BLOCKS):
        # The configuration example names a real server; the reader's may not run.
        code = block.replace('"redis://127.0.0.1:6379/0"', '"memory://"')
        try:
            exec(compile(code, f"README.md python block {number}", "exec"), namespace)
        except Exception as error:  # the block's number and source say which one broke
            pytest.fail(f"README python block {number} raised {error!r}:\n{block}")
