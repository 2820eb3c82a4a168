"""Serving the browser pages (the provider dashboard on discovery, the user page on the coordinator): one rule for
their security headers and for which static files may be served. The pages are plain HTML/JS/CSS files; nothing is
fetched from a CDN (the chart library is vendored, ``dashboard/vendor.mjs``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fastapi.responses import FileResponse, HTMLResponse, Response

# Only our own origin: scripts, styles and API calls (connect-src) all come from the service serving the page.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".md": "text/markdown; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".ico": "image/x-icon"}


def html_page(directory: Path, name: str, status_code: int = 200) -> HTMLResponse:
    html = (directory / name).read_text(encoding="utf-8")
    return HTMLResponse(html, status_code=status_code, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})


def static_file(directory: Path, path: str, *, only: Optional[frozenset] = None) -> Response:
    """A CSS/JS/image file of ``directory`` (never an HTML page, nothing outside it; when ``only`` is given, one of
    those relative paths); 404 otherwise."""
    target = (directory / path).resolve()
    if (directory not in target.parents or not target.is_file() or target.suffix == ".html"
            or target.suffix not in CONTENT_TYPES
            or (only is not None and target.relative_to(directory).as_posix() not in only)):
        return Response("not found\n", status_code=404, media_type="text/plain")
    return FileResponse(target, media_type=CONTENT_TYPES[target.suffix],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
