"""The README's code blocks, as the tests run them.

A block that a test runs is preceded by an HTML comment naming it, which GitHub does not
show:

    <!-- test: python-api -->
    ```python
    ...
    ```

`block("python-api")` returns the code between the fences, exactly as a reader copies it, so a
README example that stops working fails the suite.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"<!-- test: ([\w.-]+) -->\n```[\w-]*\n(.*?)\n```", re.DOTALL)


def blocks() -> dict[str, str]:
    """Every named block of the README, by name (a name used twice is an error)."""
    found: dict[str, str] = {}
    for name, code in _BLOCK.findall(README.read_text(encoding="utf-8")):
        if name in found:
            raise AssertionError(f"README names two blocks {name!r}")
        found[name] = code
    return found


def block(name: str) -> str:
    """The code of the README block named `name`."""
    found = blocks()
    if name not in found:
        raise AssertionError(f"README has no block marked <!-- test: {name} -->")
    return found[name]
