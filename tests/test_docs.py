"""The documentation as people read it: the site builds in strict mode (a broken link or
reference fails), its generated pages hold what the code has, and the README stays a front
page (at most 20 KB: one sentence, the two commands, the picture, a quick start, links)."""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_saliency
from lightning_saliency import METHODS, SaliencyCallback

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _text(path: Path) -> str:
    return re.sub(r"<[^>]+>", " ", path.read_text())


def test_the_api_reference_has_every_public_name(site):
    api = (site / "api" / "index.html").read_text()
    for name in lightning_saliency.__all__:
        assert re.search(rf'id="lightning_saliency\.[\w.]*\.{name}"', api), name
    assert ":func:" not in api  # the docstrings' roles show as code


def test_the_callback_page_lists_every_argument_from_the_code(site):
    page = _text(site / "callback" / "index.html")
    for name in inspect.signature(SaliencyCallback).parameters:
        assert re.search(rf"\b{name}\b", page), name


def test_the_options_table_is_printed_from_the_registry(site):
    page = _text(site / "methods" / "index.html")
    for name, method in METHODS.items():
        for option in method.options.__dataclass_fields__:
            assert re.search(rf"{re.escape(name)}\s+{option}\b", page), (name, option)


def test_the_readme_is_a_front_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 20_000
    head = readme.split("```bash", 1)
    assert len(head) == 2 and head[0].startswith("# lightning-saliency")
    commands = head[1].split("```", 1)[0]
    assert "examples/shortcut_demo.py" in commands and "-m pytest" in commands
    for target in re.findall(r"\]\(([^)#\s]+)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
