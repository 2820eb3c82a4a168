"""Credentials never leave in a message: URLs of RPC nodes and upstream APIs often carry an API key (in the path,
the query or the user info). Errors shown to users and lines written to logs name only the scheme and host."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# user:password@ of any URL quoted in a text (an upstream's error naming its own database, say).
_USER_INFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@]+@")


def redact_url(url: str) -> str:
    """Scheme and host (and port) of an RPC URL, nothing else: providers put API keys in the path, the query or the
    user info (``https://bsc.example/v1/<key>``, ``?apikey=``, ``https://user:key@host``)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable URL>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}" if parts.scheme and host else "<redacted URL>"


def scrub_url(text: str, url: str | None) -> str:
    """``text`` (an error message) without any secret part of ``url``: the whole URL becomes its scheme + host, and the
    path, query, fragment and user info are removed wherever they appear alone (requests quotes ``url: /path?query``)."""
    if not url:
        return text
    text = text.replace(url, redact_url(url))
    try:
        parts = urlsplit(url)
    except ValueError:
        return text
    path_query = parts.path + (f"?{parts.query}" if parts.query else "")
    secrets = [path_query, parts.path, parts.query, parts.fragment, parts.username, parts.password,
               parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""]
    for secret in sorted({s for s in secrets if s and s != "/"}, key=len, reverse=True):
        text = text.replace(secret, "/<redacted>" if secret.startswith("/") else "<redacted>")
    return text


def scrub_secrets(text: str, url: str | None, *secrets: str) -> str:
    """``text`` without any secret part of ``url`` (see :func:`scrub_url`), without any of ``secrets`` (API keys) and
    without the user info of any other URL in it."""
    text = _USER_INFO.sub(lambda match: f"{match['scheme']}<redacted>@", scrub_url(text, url))
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return text
