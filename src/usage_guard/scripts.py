"""The package's Lua scripts, read once from ``usage_guard/lua`` with their SHA1 digests.

``_reservations.lua`` (the sweep of expired reservations) is prepended to every
script, then ``_lib.lua``, what ``consume`` and ``adjust`` share, to those two.
"""

from __future__ import annotations

import hashlib
from importlib import resources

SCRIPTS = ("consume", "adjust", "read", "members", "admin", "ratelimit", "clock")


def _load_scripts() -> dict[str, str]:
    lua = resources.files("usage_guard") / "lua"
    sweep = _code((lua / "_reservations.lua").read_text())
    shared = _code((lua / "_lib.lua").read_text())
    sources = {}
    for name in SCRIPTS:
        body = _code((lua / f"{name}.lua").read_text())
        if name in ("consume", "adjust"):
            body = shared + body
        # A rate limit or a clock reading neither counts nor reads meters: they leave
        # reservations alone.
        sources[name] = body if name in ("ratelimit", "clock") else sweep + body
    return sources


def _code(source: str) -> str:
    """The source without its comment lines and blank lines: the files document the
    scripts, and fakeredis (``memory://``) compiles a script's source on every call."""
    return "".join(
        line
        for line in source.splitlines(keepends=True)
        if line.strip() and not line.lstrip().startswith("--")
    )


SOURCES = _load_scripts()
#: What EVALSHA names each script by.
SHAS = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in SOURCES.items()}
