"""A griffe extension for the API reference: a docstring's ``Example:`` section becomes a code block.

torchkeel's docstrings write ``Example:`` followed by indented code, with or without ``>>>`` prompts
(STYLE.md: "one summary line, ``Args:``, and a short example"). Griffe's Google parser reads a
singular ``Example:`` as an admonition whose body is Markdown, where ``>>>`` lines render as nested
block quotes and ``x[-1]`` reads as a cross-reference. This rewrites the body as a fenced Python
block (prompts stripped) before the docstring is parsed, so the source keeps its plain-text form, and
a reST ``::`` that introduces an indented block (an indented block is code in Markdown too) becomes ``:``.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_HEADER = re.compile(r"^(?P<indent>[ \t]*)Examples?:[ \t]*$")


def fence_examples(text: str) -> str:
    """Rewrite every ``Example:``/``Examples:`` section of ``text`` as a fenced Python block."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _HEADER.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = len(match["indent"])
        body: list[str] = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        code = textwrap.dedent("\n".join(body)).split("\n")
        code = [re.sub(r"^(>>>|\.\.\.)( |$)", "", line) for line in code]
        pad = " " * (indent + 4)
        out.append(f"{match['indent']}Example:")
        out.append(f"{pad}```python")
        out.extend(f"{pad}{line}".rstrip() for line in code)
        out.append(f"{pad}```")
        out.append("")
    return "\n".join(out)


class ExampleFences(griffe.Extension):
    """Fence the ``Example:`` sections of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        text = obj.docstring.value
        if "Example" in text:
            text = fence_examples(text)
        # a reST literal-block marker ("...::" then an indented block) reads as ":" in Markdown
        obj.docstring.value = re.sub(r"(?<=[^:\s]):: *$", ":", text, flags=re.M)
