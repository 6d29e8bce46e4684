"""The architecture holds: the core never reaches into the demo, and the seams are real."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import helpers

PACKAGE = Path(__file__).resolve().parents[1] / "llava_loop"
DEMO = "llava_loop.demo"


def demo_imports(source: str, module: str) -> list[str]:
    """Every import in ``source`` (module level or inside functions) that lands in llava_loop.demo."""
    package = module.rsplit(".", 1)[0] if not module.endswith("__init__") else module.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [t for t in targets if t == DEMO or t.startswith(DEMO + ".")]
    return found


def core_modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = "llava_loop." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if not name.startswith(DEMO):
            out.append((name, path))
    return out


def test_the_core_never_imports_the_demo():
    offenders = {name: hits for name, path in core_modules() if (hits := demo_imports(path.read_text(), name))}
    assert not offenders, f"core modules import llava_loop.demo: {offenders}"
    assert len(core_modules()) > 20  # the walk saw the package


@pytest.mark.parametrize("source, module", [
    ("from .demo.tiny import build_tiny", "llava_loop.loop"),
    ("def f():\n    from ..demo import shapes", "llava_loop.data.check"),
    ("import llava_loop.demo.pipeline", "llava_loop.cli"),
    ("from llava_loop import demo", "llava_loop.cli"),
])
def test_the_import_walker_catches_each_form_of_import(source, module):
    assert demo_imports(source, module)  # negative control: each way of reaching the demo is seen


def test_importing_the_whole_core_loads_no_demo_module():
    names = [name.removesuffix(".__init__") for name, _ in core_modules()]
    code = "import sys, importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
    code += f"bad = [m for m in sys.modules if m.startswith({DEMO!r})]\nassert not bad, bad\n"
    subprocess.run([sys.executable, "-c", code], check=True, env=helpers.env(), cwd=helpers.ROOT)


def test_the_demo_plugs_into_the_cli_through_the_entry_point():
    from llava_loop.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo"]).func.__module__ == "llava_loop.demo.commands"
    assert parser.parse_args(["data", "synth", "--out", "x"]).func.__module__ == "llava_loop.demo.commands"
    presets = parser.parse_args(["build", "--preset", "tiny", "--out", "x"]).presets
    assert {"tiny", "bench_small"} <= set(presets)


def test_no_module_branches_on_deepspeed_outside_the_backends():
    """DeepSpeed is a seam: only backends.py may branch on it."""
    for name, path in core_modules():
        if name != "llava_loop.backends":
            tree = ast.parse(path.read_text())
            names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
                    {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
            assert not {"deepspeed", "uses_deepspeed", "deepspeed_plugin"} & names, name
