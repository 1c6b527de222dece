"""griffe extension: a dataclass field's trailing comment (or the comment lines right above it)
becomes its docstring in the API reference.

dpt_fast documents each config field with a comment on its line (the style of the codebase, and
what ``dpt_fast.engine.config.field_help`` reads for the CLI's help), not with a string under
it; mkdocstrings reads only the latter. A field that has a docstring keeps it.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path
from typing import Any

from griffe import Attribute, Docstring, Extension


def _comments(source: str) -> dict[int, str]:
    """Comment text (without '#') of each line of ``source`` that has one, by line number."""
    found: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.string.lstrip("#").strip()
    return found


class FieldComments(Extension):
    """Sets the docstring of an undocumented class attribute from its comment."""

    def on_attribute_instance(self, *, node: ast.AST | Any, attr: Attribute, agent: Any,
                              **kwargs: Any) -> None:
        """Called by griffe for each attribute it finds."""
        if attr.docstring is not None or attr.parent is None or not attr.parent.is_class:
            return
        filepath = attr.filepath
        if not isinstance(filepath, Path) or attr.lineno is None or \
                filepath not in attr.lines_collection:
            return
        lines = attr.lines_collection[filepath]
        comments = _comments("\n".join(lines))
        text = comments.get(attr.endlineno or attr.lineno)
        if text is None:  # the comment lines right above the field
            above: list[str] = []
            line = attr.lineno - 1
            while line in comments and lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            text = " ".join(above) or None
        if text:
            attr.docstring = Docstring(text, parent=attr)
