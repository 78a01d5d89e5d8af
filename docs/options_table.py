"""The table of every method's options (``docs/methods.md``), generated from the registry: the
documentation site's build puts it in the page (``docs/site_hooks.py``).

    python docs/options_table.py
"""

from __future__ import annotations

import dataclasses
import inspect

from lightning_saliency.engine.methods import METHODS, SaliencyMethod


def option_docs(method: SaliencyMethod) -> dict[str, str]:
    """Each option's one-paragraph description, from the ``Attributes:`` section of the
    options dataclass's docstring.

    Examples:
        >>> option_docs(METHODS["dff"])["components"]
        'how many concepts (K) to factorise the layer into.'
    """
    docs: dict[str, str] = {}
    current = None
    inside = False
    for line in inspect.cleandoc(method.options.__doc__ or "").splitlines():
        text = line.strip()
        if text == "Attributes:":
            inside = True
            continue
        if not inside or not text:
            continue
        name, sep, rest = text.partition(":")
        entry = line.startswith("    ") and not line.startswith("     ")  # one level in
        if sep and name.isidentifier() and entry:
            current = name
            docs[name] = rest.strip()
        elif current is not None:
            docs[current] += " " + text
    return docs


def options_markdown() -> str:
    """The table of every method's options, as the methods page shows it."""
    rows = [
        "| method | option | default | flat name | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, method in sorted(METHODS.items()):
        docs = option_docs(method)
        flat = {option: f"`{key}`" for key, option in method.flat_names.items()}
        for f in dataclasses.fields(method.options):
            text = docs.get(f.name, "").replace("``", "`")
            also = flat.get(f.name, "")
            rows.append(f"| `{name}` | `{f.name}` | `{f.default!r}` | {also} | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(options_markdown())
