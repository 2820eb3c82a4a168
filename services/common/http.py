"""Small HTTP helpers shared by the services (error bodies of the shape ``{"error": {"code", "message"}}``)."""

from __future__ import annotations


def validation_message(error) -> str:
    """One readable line from a pydantic/FastAPI validation error: ``field: reason; field: reason``."""
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path", "header"))
        msg = str(item.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
