"""The house rules, checked on the source: no method named outside ``methods/``, and no test
reading a private attribute."""

import ast
import os
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
    planted = 'from x import y\nlabel = "saliency/gradcam" if y._secret else "dff"\n'
    found = checker(planted, {"gradcam", "dff"}) if checker is method_names_in else checker(planted)
    assert found, f"{checker.__name__} missed a planted offence"
    assert os.path.basename(__file__) == "test_structure.py"


def test_readme_tables_are_the_registry():
    """The README's option table is generated from the registry, and its methods table (printed
    by benchmarks/methods.py) names every method with the registry's passes and cost."""
    from helpers import options_table

    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- options-table")
    block = readme[readme.index("\n", start) + 1 : readme.index("<!-- /options-table -->")]
    assert block.strip() == options_table().options_markdown().strip()
    rows = {  # the methods table has six columns
        line.split("|")[1].strip(" `"): line
        for line in readme.splitlines()
        if line.startswith("| `") and line.count("|") == 7
    }
    for name, method in METHODS.items():
        assert name in rows, f"README's methods table misses {name}"
        assert f"| {method.passes} | {method.cost} |" in rows[name], name
