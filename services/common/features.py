"""The switch of the compatibility fixes and of the optional fast paths: ``FAR_MESH_DISABLE_COMPAT_FIX`` names,
comma-separated, the ones to turn off (the tests that prove a fix is needed run with it off; docs/install.md)."""

from __future__ import annotations

import os

DISABLE_ENV = "FAR_MESH_DISABLE_COMPAT_FIX"


def feature_enabled(name: str) -> bool:
    """False iff ``name`` is listed in ``FAR_MESH_DISABLE_COMPAT_FIX`` (read on every call: tests change it)."""
    return name not in {item.strip() for item in os.environ.get(DISABLE_ENV, "").split(",")}
