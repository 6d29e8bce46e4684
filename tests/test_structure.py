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


def package_imports(source: str, module: str) -> list[str]:
    """Every name in llava_loop that ``source`` imports (module level or inside functions), relative ones resolved."""
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
        found += [t for t in targets if t == "llava_loop" or t.startswith("llava_loop.")]
    return found


def demo_imports(source: str, module: str) -> list[str]:
    """Every import in ``source`` (module level or inside functions) that lands in llava_loop.demo."""
    return [t for t in package_imports(source, module) if t == DEMO or t.startswith(DEMO + ".")]


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


@pytest.mark.parametrize(
    "source, module",
    [
        ("from .demo.tiny import build_tiny", "llava_loop.loop"),
        ("def f():\n    from ..demo import shapes", "llava_loop.data.check"),
        ("import llava_loop.demo.pipeline", "llava_loop.cli"),
        ("from llava_loop import demo", "llava_loop.cli"),
    ],
)
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
            names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
                n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            }
            assert not {"deepspeed", "uses_deepspeed", "deepspeed_plugin"} & names, name


AFTER_TRAINING = ("llava_loop.evaluate", "llava_loop.infer", "llava_loop.export", "llava_loop.lmms")


def import_closure(start: str, sources: dict[str, str]) -> set[str]:
    """The llava_loop modules ``start`` imports, transitively, lazy imports inside functions included (``sources``:
    module name -> its source). Importing a module imports its packages first, so they count too."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen or module not in sources:  # not a module: an attribute (a function, a class)
            continue
        seen.add(module)
        parents = [".".join(module.split(".")[:i]) for i in range(2, module.count(".") + 1)]
        todo += parents + package_imports(sources[module], module + (".__init__" if module in PACKAGES else ""))
    return seen


PACKAGES = {name.removesuffix(".__init__") for name, _ in core_modules() if name.endswith(".__init__")}
SOURCES = {name.removesuffix(".__init__"): path.read_text() for name, path in core_modules()}


def test_training_imports_nothing_of_what_comes_after_it():
    """The loop stands on the ground floor: export, inference, generation metrics and lmms-eval build on training,
    never the other way round (a hook that needs them, like lmms-eval's, is named in a config and imported then)."""
    closure = import_closure("llava_loop.loop", SOURCES)
    assert {"llava_loop.loop", "llava_loop.hooks", "llava_loop.validate", "llava_loop.data.collate"} <= closure
    assert not closure & set(AFTER_TRAINING), sorted(closure & set(AFTER_TRAINING))


@pytest.mark.parametrize(
    "module, line",
    [
        ("llava_loop.hooks", "from . import lmms"),
        ("llava_loop.data.collate", "def f():\n    from ..export import export"),  # lazy, two floors down
        ("llava_loop.validate", "import llava_loop.evaluate"),
        ("llava_loop.data.blank_image", "from llava_loop.infer import generate"),
    ],
)
def test_the_closure_sees_an_after_training_import_wherever_it_hides(module, line):
    sources = {**SOURCES, module: SOURCES[module] + "\n" + line + "\n"}  # negative control
    assert import_closure("llava_loop.loop", sources) & set(AFTER_TRAINING)


def test_every_package_ships_in_the_wheel():
    """pyproject lists its packages by hand (configs/ ships as llava_loop.configs): a new subpackage left out of the
    list works in an editable install and is missing from a built wheel."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(init.parent.relative_to(PACKAGE.parent).parts) for init in PACKAGE.rglob("__init__.py")}
    assert on_disk <= listed, sorted(on_disk - listed)
