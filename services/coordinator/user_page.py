"""The user page (docs/user-page.md): the developer's side of the marketplace, served by the
coordinator next to the account API it reads.

* ``GET /account`` — sign in with an API key, balance and reserved amount, how to deposit, usage chart, recent
  requests (tokens, cost, nodes), statement and deposits, API keys (create, revoke). A static page that the browser
  fills from ``/mesh/account``, ``/mesh/account/ledger``, ``/mesh/account/usage`` and ``/mesh/account/keys``, so it
  shows exactly what the API says.
* ``GET /account/static/{file}`` — its own JS/CSS (``services/coordinator/static``);
* ``GET /dashboard/static/{file}`` — the few files it shares with the provider dashboard (styles, helpers, the vendored
  Chart.js), served from discovery's static folder under the same path as there, never from a CDN.

Why the coordinator and not discovery: the page calls the account API with the user's key, and on the same origin
that needs no CORS and the page's Content-Security-Policy can stay ``connect-src 'self'``; the key is sent only to
the service that checks it. Discovery never sees a user's key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from services.common.web import html_page, static_file
from services.discovery.dashboard import STATIC_DIR as DASHBOARD_STATIC_DIR, STATIC_PREFIX as DASHBOARD_PREFIX

STATIC_DIR = (Path(__file__).parent / "static").resolve()
PAGE_PATH = "/account"
STATIC_PREFIX = "/account/static"
# What the user page takes from the provider dashboard (and nothing else of it is served by the coordinator).
SHARED = frozenset({"dashboard.css", "common.js", "favicon.svg", "vendor/chart.umd.min.js",
                    "vendor/chart.js.LICENSE.md"})

router = APIRouter(include_in_schema=False)


@router.get(PAGE_PATH)
async def account_page():
    return html_page(STATIC_DIR, "account.html")


@router.get(STATIC_PREFIX + "/{path:path}")
async def account_static(path: str):
    return static_file(STATIC_DIR, path)


@router.get(DASHBOARD_PREFIX + "/{path:path}")
async def shared_static(path: str):
    return static_file(DASHBOARD_STATIC_DIR, path, only=SHARED)
