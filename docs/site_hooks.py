"""MkDocs hooks: the pages that come from the code or from files outside ``docs/``.

- ``api.md``: one entry per public name of the package's face (``lightning_saliency.__all__``),
  rendered by mkdocstrings from the docstrings (which run as doctests).
- ``detection.md`` and ``contributing.md``: ``benchmarks/README.md`` and ``CONTRIBUTING.md``,
  their links to other files of the repository turned into links to the site's pages.
- ``<!-- options-table -->`` in ``methods.md``: the table of every method's options, printed
  from the registry by ``docs/options_table.py`` at build time.
- The docstrings' Sphinx roles (``:func:`x```, which the doctests and IDEs read) show as code.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
# links from the files outside docs/ to what the site has as pages
PAGES = {
    "README.md": "index.md",
    "../README.md": "index.md",
    "benchmarks/README.md": "detection.md",
    "CONTRIBUTING.md": "contributing.md",
    "../CONTRIBUTING.md": "contributing.md",
}
OPTIONS = "<!-- options-table -->"
ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|obj|exc):(<code>)~?")


def _public_names() -> list[tuple[str, str]]:
    """``(name, module)`` of every name on the package's face."""
    sys.path.insert(0, str(ROOT))
    import lightning_saliency

    where = vars(lightning_saliency)["_WHERE"]  # the face's own map of where each name lives
    return [(name, where[name]) for name in lightning_saliency.__all__]


def _api_page() -> str:
    lines = [
        "# API reference",
        "",
        "Every name a user or a plugin author imports, from the package's face "
        "(`from lightning_saliency import ...`), generated from the docstrings.",
        "",
    ]
    for name, module in _public_names():
        lines += [f"::: {module}.{name}", "    options:", f"      heading: {name}", ""]
    return "\n".join(lines)


def _linked(text: str) -> str:
    """Links to repository files that the site has as pages point to the pages; others become
    code (the site does not carry the repository)."""

    def swap(match: re.Match[str]) -> str:
        label, target = match.group(1), match.group(2)
        path, _, anchor = target.partition("#")
        if path in PAGES:
            return f"[{label}]({PAGES[path]}{'#' + anchor if anchor else ''})"
        if path.startswith(("http://", "https://")) or not path:
            return match.group(0)
        return f"{label} (`{path}`)"

    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", swap, text)


def _options_table() -> str:
    spec = importlib.util.spec_from_file_location(
        "options_table", ROOT / "docs" / "options_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.options_markdown())


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "api.md", content=_api_page()))
    for source, page in (
        ("benchmarks/README.md", "detection.md"),
        ("CONTRIBUTING.md", "contributing.md"),
    ):
        files.append(File.generated(config, page, content=_linked((ROOT / source).read_text())))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if OPTIONS in markdown:
        return markdown.replace(OPTIONS, _options_table())
    return markdown


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    return ROLE.sub(r"\1", html)
