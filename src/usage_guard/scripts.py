"""The package's Lua scripts, read once from ``usage_guard/lua`` with their SHA1 digests.

``_lib.lua`` holds what ``consume`` and ``adjust`` share; it is prepended to both.
"""

from __future__ import annotations

import hashlib
from importlib import resources

SCRIPTS = ("consume", "adjust", "read", "admin")


def _load_scripts() -> dict[str, str]:
    lua = resources.files("usage_guard") / "lua"
    shared = (lua / "_lib.lua").read_text()
    sources = {}
    for name in SCRIPTS:
        body = (lua / f"{name}.lua").read_text()
        sources[name] = shared + body if name in ("consume", "adjust") else body
    return sources


SOURCES = _load_scripts()
#: What EVALSHA names each script by.
SHAS = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in SOURCES.items()}
