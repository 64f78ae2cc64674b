"""The benchmark's sections, in the order they run: each a module with ``run(bench)``, and optionally
``add_arguments(parser)`` for its own flags and ``WORKERS`` (measurements run in a fresh process)."""

from __future__ import annotations

from sections import check, cli, counts, limits, read, scale, speed

__all__ = ["SECTIONS"]

SECTIONS = {"speed": speed, "check": check, "cli": cli, "scale": scale, "read": read, "counts": counts,
            "limits": limits}
