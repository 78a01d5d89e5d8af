"""The house rules, checked on the source: no method named outside ``methods/``, and no test
reading a private attribute."""

import ast
import re
from pathlib import Path

import pytest

from lightning_saliency.engine.methods import ALIASES, METHODS

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lightning_saliency"
# torch has no public way to count a module's hooks; the tests' hook_count reads these.
ALLOWED_PRIVATE = {"_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"}
WORD = re.compile(r"[a-z0-9_+\-]+")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (documentation, not code)."""
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                found.add(id(value))
    return found


def method_names_in(source: str, names: set[str]) -> list[str]:
    """Method names a piece of code spells out: in its strings (docstrings aside) and as
    identifiers.

    >>> method_names_in('tag = f"saliency/{m}/x" if m != "dff" else None', {"dff"})
    ['dff']
    >>> method_names_in('def f():\\n    "the dff method"\\n    return 1', {"dff"})
    []
    """
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            found += [w for w in WORD.findall(node.value) if w in names]
        elif isinstance(node, ast.Name) and node.id in names:
            found.append(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in names:
            found.append(node.attr)
    return found


def private_reads_in(source: str) -> list[str]:
    """Private attributes (``obj._name``, not dunders) that a piece of code reads.

    >>> private_reads_in("x = callback._samples\\nself._y = 1\\nn = m._forward_hooks")
    ['_samples']
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Load)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and node.attr not in ALLOWED_PRIVATE
        ):
            found.append(node.attr)
    return found


def test_no_method_is_named_outside_methods():
    names = set(METHODS) | set(ALIASES)
    assert "gradcam" in names and "ig" in names
    names.discard("saliency")  # captum's method name is also the tags' prefix, which is not it
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[:2] == ("engine", "methods"):
            continue
        if path.relative_to(PACKAGE) == Path("cli", "parser.py"):  # --help lists them without
            continue  # importing torch; test_cli checks that list against the registry
        found = method_names_in(path.read_text(), names)
        if found:
            offenders[str(path.relative_to(ROOT))] = sorted(set(found))
    assert not offenders, offenders


def test_no_test_reads_a_private_attribute():
    offenders = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        found = private_reads_in(path.read_text())
        if found:
            offenders[path.name] = sorted(set(found))
    assert not offenders, offenders


@pytest.mark.parametrize("checker", [method_names_in, private_reads_in])
def test_the_checks_catch_what_they_look_for(checker):
    def check(source: str) -> list[str]:
        if checker is method_names_in:
            return sorted(checker(source, {"gradcam", "dff"}))
        return sorted(checker(source))

    planted = 'from x import y\nlabel = "saliency/gradcam" if y._secret else "dff"\n'
    clean = 'from x import y\nlabel = f"saliency/{m}" if y.secret else y.__doc__\n'
    expected = ["dff", "gradcam"] if checker is method_names_in else ["_secret"]
    assert check(planted) == expected, f"{checker.__name__} missed a planted offence"
    assert check(clean) == [], f"{checker.__name__} flags code that names nothing"


def test_the_docs_tables_are_the_registry():
    """The methods page's option table is not kept by hand: the site's build prints it from the
    registry in place of its marker. Its methods table (printed by benchmarks/methods.py) names
    every method with the registry's passes and cost."""
    page = (ROOT / "docs" / "methods.md").read_text()
    assert page.count("<!-- options-table -->") == 1
    assert "| method | option | default |" not in page  # no hand-kept copy beside it
    rows = {  # the methods table has six columns
        line.split("|")[1].strip(" `"): line
        for line in page.splitlines()
        if line.startswith("| `") and line.count("|") == 7
    }
    for name, method in METHODS.items():
        assert name in rows, f"docs/methods.md's methods table misses {name}"
        assert f"| {method.passes} | {method.cost} |" in rows[name], name


# -- the house (DESIGN §5): subpackages by concern, each importing only from those below it ----
FLOORS = {"callback": 3, "cli": 3, "evaluate": 2, "viz": 2, "publish": 2, "engine": 1}
"""Each subpackage's floor; the face (``__init__.py``) and the old paths' shims are the roof,
``errors.py``, ``console.py`` and ``demos/`` the ground."""


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of each import of a project module in ``path`` that runs (those
    under ``if TYPE_CHECKING:`` do not), relative imports resolved."""
    found = []
    package = (
        module_of(path).split(".")
        if path.name == "__init__.py"
        else module_of(path).split(".")[:-1]
    )
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.append((base, [a.name for a in node.names]))
    return [(m, names) for m, names in found if m.split(".")[0] == "lightning_saliency"]


def floor_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or (
        len(parts) == 2 and parts[1] not in FLOORS | {"errors": 0, "console": 0, "demos": 0}
    ):
        return 4  # the face and the old paths' shims
    return FLOORS.get(parts[1], 0)


def house_findings() -> list[str]:
    modules = {module_of(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    findings = []
    for module, path in modules.items():
        for target, names in project_imports(path):
            for name in names or [""]:
                full = f"{target}.{name}" if f"{target}.{name}" in modules else target
                if full in modules and full != module:
                    graph[module].add(full)
                if name.startswith("_") and not name.startswith("__") and full == target:
                    findings.append(f"{module} imports the private {target}.{name}")
                if floor_of(full) > floor_of(module) or (
                    floor_of(full) == floor_of(module) == 2
                    and full.split(".")[1] != module.split(".")[1]
                ):
                    findings.append(f"{module} imports {full}, which is not below it")
    for start in graph:  # a cycle: a module that reaches itself
        seen, todo = set(), list(graph[start])
        while todo:
            current = todo.pop()
            if current == start:
                findings.append(f"import cycle through {start}")
                break
            if current not in seen:
                seen.add(current)
                todo += graph[current]
    return sorted(set(findings))


def test_the_house_has_no_cycle_no_arrow_up_and_no_private_import():
    assert house_findings() == []
    lines = (PACKAGE / "callback" / "callback.py").read_text().count("\n")
    assert lines <= 450, f"callback.py has {lines} lines: give the new concern its own module"
