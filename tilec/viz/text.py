"""Lines of text the console report (tilec.inspect) and the HTML page (viz/html.py)
both show."""
from __future__ import annotations

from typing import Any


def roles_line(roles: list[dict[str, Any]]) -> str:
    """"attention (1 worker), compute (2 workers)"."""
    counts = [(r["name"], len(r["workers"])) for r in roles]
    return ", ".join(f"{name} ({n} worker{'' if n == 1 else 's'})" for name, n in counts)
