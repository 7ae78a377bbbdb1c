"""The shape of the product's code: one home for settings, the README's settings table complete,
and short functions on the product path (everything a request runs: predict.py, taylor_utils.py,
flux/ without flux/lab/)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from flux import settings

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = [ROOT / "predict.py", ROOT / "taylor_utils.py"] + sorted(
    p for p in (ROOT / "flux").rglob("*.py") if "lab" not in p.relative_to(ROOT / "flux").parts
)
MAX_FUNCTION_LINES = 60
# the Cog input declaration: one parameter per input, each with its description
DECLARATIONS = {("predict.py", "run")}


def _readme_settings() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([A-Z0-9_]+)` \| `?([^|`]*?)`? \|", section, flags=re.MULTILINE))


def test_the_readme_lists_every_setting_with_its_default():
    listed = _readme_settings()
    assert list(listed) == [s.name for s in settings.SETTINGS]
    assert listed == {s.name: s.default for s in settings.SETTINGS}


def test_the_environment_is_read_in_one_module():
    readers = []
    for path in PRODUCT:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert readers and all(r.startswith("flux/settings.py:") for r in readers), readers


def test_no_function_on_the_product_path_is_over_60_lines():
    long = []
    for path in PRODUCT:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (str(path.relative_to(ROOT)), node.name) not in DECLARATIONS:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert long == []
