"""Provider dashboard pages served by the discovery service (docs/dashboard.md).

Static pages (``services/discovery/static/``) that the browser fills from discovery's own JSON endpoints
(``/provider/{wallet}/stats|earnings|payments|nodes|checks``, ``/nodes/{id}``, ``/models``, ``/models/{id}/coverage``,
``/models/{id}/nodes``), so the pages show exactly what the API says and need nothing from the service object:

* ``GET /dashboard`` — enter or paste a wallet (``/dashboard?wallet=0x…`` redirects to its page, also without JS);
* ``GET /provider/{wallet}`` — nodes, totals, earnings chart (30 days), hardware, payment history, and per node
  its spot checks: passed/failed, disputed (withheld) FAR and why, a quarantine banner (docs/verification.md); the JSON
  endpoints live one level deeper (``/provider/{wallet}/stats`` …), so there is no clash;
* ``GET /swarm`` and ``GET /swarm/{model_id}`` — block coverage map, ready flag, blocking reasons (the facts
  of ``far-mesh status``);
* ``GET /dashboard/static/{file}`` — CSS/JS and the vendored Chart.js (``static/vendor``, built at build time by
  ``dashboard/vendor.mjs``; nothing is fetched from a CDN at run time).

The pages refresh themselves every 30 s (``?refresh=N`` seconds overrides it, for tests and impatient people).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Query
from fastapi.responses import RedirectResponse

from services.common.wallets import WALLET_RE
from services.common.web import html_page, static_file

STATIC_DIR = (Path(__file__).parent / "static").resolve()
STATIC_PREFIX = "/dashboard/static"

router = APIRouter(include_in_schema=False)


def _page(name: str, status_code: int = 200):
    return html_page(STATIC_DIR, name, status_code)


@router.get("/")
async def root():
    return RedirectResponse("/dashboard", status_code=307)


@router.get("/dashboard")
async def dashboard(wallet: str | None = Query(default=None, max_length=200)):
    """The entry page; ``?wallet=`` (the form's no-JS submit) redirects to the wallet's page when valid."""
    if wallet is not None and WALLET_RE.fullmatch(wallet.strip()):
        return RedirectResponse(f"/provider/{wallet.strip()}", status_code=303)
    return _page("entry.html")


@router.get("/provider/{wallet}")
async def provider_page(wallet: str):
    """A wallet's page. A malformed wallet gets the same page (it explains the problem) with status 422."""
    return _page("provider.html", 200 if WALLET_RE.fullmatch(wallet) else 422)


@router.get("/swarm")
async def swarm_index():
    return _page("swarm.html")


@router.get("/swarm/{model_id:path}")
async def swarm_page(model_id: str):
    return _page("swarm.html")


@router.get(STATIC_PREFIX + "/{path:path}")
async def static_asset(path: str):
    return static_file(STATIC_DIR, path)
