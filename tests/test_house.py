"""The shape of the product's code: one home for settings (read once, at setup), the README's
settings table generated from it, no import cycles, and short functions on the product path
(everything a request runs: predict.py, taylor_utils.py, flux/ without flux/lab/)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from flux import config

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = [ROOT / "predict.py", ROOT / "taylor_utils.py"] + sorted(
    p for p in (ROOT / "flux").rglob("*.py") if "lab" not in p.relative_to(ROOT / "flux").parts
)
MAX_FUNCTION_LINES = 60
# the Cog input declaration: one parameter per input, each with its description
DECLARATIONS = {("predict.py", "run")}


def test_the_readme_settings_table_is_the_generated_one():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|")) + "\n"
    assert table == config.markdown_table()
    assert len(re.findall(r"^\| `", table, flags=re.MULTILINE)) == len(config.SETTINGS)


def test_the_environment_is_read_in_one_module_and_only_at_setup():
    """os.environ is touched in flux/config.py alone, and the configuration is read only where a
    process starts: the predictor's setup(), the command line, a context-parallel worker."""
    readers, loaders = [], []
    for path in PRODUCT:
        where = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                readers.append(f"{where}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_env":
                loaders.append((where, _enclosing_function(path, node.lineno)))
    assert readers and all(r.startswith("flux/config.py:") for r in readers), readers
    assert sorted(set(loaders)) == [
        ("flux/cli.py", "download_command"), ("flux/cli.py", "edit_command"),
        ("flux/config.py", "defaults"),  # the settings' defaults: from an empty mapping, no environment
        ("flux/parallel.py", "worker_main"), ("predict.py", "setup"),
    ]  # fmt: skip


def _enclosing_function(path: Path, line: int) -> str:
    functions = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)]
    return min((n for n in functions if n.lineno <= line <= n.end_lineno), key=lambda n: n.end_lineno - n.lineno).name


def test_no_product_module_imports_the_lab():
    """flux/lab is left out of the image cog builds: nothing a request or the command line runs imports it."""
    importers = []
    for path in PRODUCT:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(name.startswith("flux.lab") for name in names):
                importers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert importers == []


def test_the_several_device_module_uses_the_runtime_not_the_other_way_round():
    def imports(module: str) -> set[str]:
        tree = ast.parse((ROOT / "flux" / f"{module}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert "flux.runtime" in imports("parallel")
    for module in ("runtime", "fast", "edit", "loading", "lora", "config"):
        assert "flux.parallel" not in imports(module), module
    # the edit takes what it runs whole: no request defaults, no runtime of its own
    assert "flux.edit" not in imports("runtime") and "flux.request" not in imports("edit")


def test_the_edit_is_given_its_transformer_and_a_decided_plan():
    """edit() has no transformer of its own to fall back on (one device's module would be wrong on
    several); an EditPlan has no defaults and is built by keywords; its layout is decided before."""
    import dataclasses
    import inspect

    from flux.edit import EditPlan, Sampling, edit

    assert inspect.signature(edit).parameters["transformer"].default is inspect.Parameter.empty
    for plan_type in (EditPlan, Sampling):
        fields = dataclasses.fields(plan_type)
        assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields)
    assert all(f.kw_only for f in dataclasses.fields(EditPlan))
    source = (ROOT / "flux" / "edit.py").read_text()
    assert "conditioning_layout(" not in source


def test_no_function_on_the_product_path_is_over_60_lines():
    long = []
    for path in PRODUCT:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (str(path.relative_to(ROOT)), node.name) not in DECLARATIONS:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert long == []
