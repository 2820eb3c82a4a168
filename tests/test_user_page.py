"""The user page (GET /account on the coordinator; docs/user-page.md) in a real browser: Debian's headless Chromium
driven by Playwright (tests/browser_support.py) against the real coordinator app (``create_app``, its lifespan, uvicorn
on a loopback port) over a fresh PostgreSQL database, Redis, the scripted engine (tests/scripted_engine.py: no swarm)
and a deposit made on a local py-evm chain and credited by the real deposit watcher.

Signs in (a wrong key, an empty one: clear messages; the key kept in sessionStorage only), checks balance, reserved
amount, deposit instructions, the deposit and a generated request (tokens, cost, the nodes that served it) against
the database and the API, the usage chart, creates a key (secret shown once, it works), revokes one after a
confirmation (and sees the API refuse it), revoking the signed-in key signs out, the phone layout, and takes the
screenshots user-page.png and user-page-phone.png (into docs/img/ with FAR_MESH_UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from decimal import Decimal

import httpx
import pytest

from infra.processes import wait_until
from services.common.config import Settings
from services.deposits.watcher import DepositWatcher, account_ref, deposit
from tests.browser_support import PHONE, Page, browser, chromium, far, pages_of  # noqa: F401  (fixtures)
from tests.scripted_engine import (DEFAULT_ROUTE, Script, ScriptedModel, ScriptedReadiness, scripted_engine,
                                   serve_app)

MODEL_ID = "test/scripted"
PRICE = Decimal("0.0001")
FAR = 10**18
GRANT = Decimal("1234.567890123456789")  # a float would show 1234.5678901234568: the page must not
DEPOSIT_BASE = 25 * FAR + 5  # 25.000000000000000005 FAR: exact to the last base unit
CONFIRMATIONS = 2
WALLETS = {"QmScriptedA": "0x" + "a1" * 20, "QmScriptedB": "0x" + "b2" * 20}
GENERATE = "/mesh/inference/generate"


def run_async(make_coroutine):
    """Run a coroutine to completion in a thread of its own: Playwright's sync API keeps an event loop running in this
    thread, where asyncio.run is refused."""
    result: dict = {}

    def target():
        try:
            result["value"] = asyncio.run(make_coroutine())
        except BaseException as error:  # re-raised in the caller
            result["error"] = error

    thread = threading.Thread(target=target, name="user-page-async")
    thread.start()
    thread.join(120)
    if "error" in result:
        raise result["error"]
    return result["value"]


class Live:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def auth(self, key: str | None = None) -> dict:
        return {"Authorization": f"Bearer {key or self.key}"}

    def api(self, path: str, key: str | None = None) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers=self.auth(key), timeout=10)

    def db(self, query: str, *args):
        async def fetch():
            import asyncpg

            conn = await asyncpg.connect(self.db_url)
            try:
                return await conn.fetchrow(query, *args)
            finally:
                await conn.close()

        return run_async(fetch)


async def _seed(db_url: str) -> tuple[str, str]:
    """An account (a grant with 15 decimals), its first key, and the scripted route's two servers registered as
    provider nodes (so the usage shows their wallets)."""
    import asyncpg

    from services.coordinator.accounts import AccountStore

    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        store = AccountStore(pool)
        account_id = await store.create_account("ada", GRANT)
        _, key = await store.create_key(account_id, name="laptop", rate_limit_per_minute=600)
        for peer, start, end in DEFAULT_ROUTE:
            await pool.execute(
                """INSERT INTO far_nodes (peer_id, wallet_address, model_id, start_block, end_block, public_name)
                   VALUES ($1, $2, $3, $4, $5, $6)""", peer, WALLETS[peer], MODEL_ID, start, end, f"node-{peer[-1]}")
        return account_id, key
    finally:
        await pool.close()


@pytest.fixture(scope="module")
def live(make_database, redis_url, tiny_model_dir):
    """The coordinator (uvicorn in a thread) with deposits configured on a local chain; an account funded by a grant
    and an on-chain deposit; one completed request."""
    from eth_account import Account
    from transformers import AutoTokenizer

    from services.coordinator.app import create_app
    from services.payouts.chain import new_local_chain

    db_url = make_database()
    chain = new_local_chain()
    account_id, key = run_async(lambda: _seed(db_url))

    # A user's wallet deposits 25.000000000000000005 FAR naming the account; the watcher credits it once final.
    user = Account.create()
    chain.w3.eth.send_transaction({"from": chain.w3.eth.accounts[0], "to": user.address, "value": 10**20})
    chain.send(chain.token.functions.transfer(user.address, DEPOSIT_BASE).build_transaction({"from": chain.address}))
    receipt = deposit(chain, user, account_id, DEPOSIT_BASE)
    chain.advance(CONFIRMATIONS)
    watcher = DepositWatcher(db_url, chain, confirmations=CONFIRMATIONS)
    assert len(run_async(watcher.run_once).credited) == 1

    model = ScriptedModel(MODEL_ID, AutoTokenizer.from_pretrained(tiny_model_dir))
    settings = Settings(POSTGRES_URL=db_url, REDIS_URL=redis_url, DEFAULT_MODEL_ID=MODEL_ID, JWT_SECRET="",
                        PRICE_PER_TOKEN_FAR=PRICE, PRICE_PER_PROMPT_TOKEN_FAR=Decimal(0), PLATFORM_FEE_BPS=1000,
                        BSC_NETWORK="local", DEPOSIT_CONTRACT_ADDRESS=chain.deposit.address,
                        FAR_TOKEN_ADDRESS=chain.token.address, PAYOUT_CONFIRMATIONS=CONFIRMATIONS,
                        GENERATION_TIMEOUT_S=60)
    app = create_app(settings, coordinator_id=f"userpage-{uuid.uuid4().hex[:6]}",
                     engine_factory=scripted_engine(model, ScriptedReadiness(MODEL_ID)))
    with serve_app(app, "user-page-coordinator") as url:
        reply = httpx.post(f"{url}{GENERATE}", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                           json={"prompt": "What is the mesh?", "max_tokens": 12, "stream": False,
                                 "request_id": "req-done-1"})
        assert reply.status_code == 200, reply.text
        yield Live(url=url, app=app, model=model, chain=chain, db_url=db_url, account_id=account_id, key=key,
                   deposit_tx="0x" + bytes(receipt["transactionHash"]).hex(), done=reply.json())


@pytest.fixture
def open_page(browser, live):
    with pages_of(browser, live.url) as make:
        yield make


def sign_in(p: Page, key: str) -> None:
    """With the keyboard, as a user would: the key field has the focus, Enter submits."""
    p.page.wait_for_selector("body[data-state='signed-out']")
    p.wait_js("document.activeElement && document.activeElement.id === 'key-input'")
    p.page.keyboard.type(key)
    p.page.keyboard.press("Enter")
    p.page.wait_for_selector("body[data-state='ok']")


def stored_key(p: Page):
    return p.page.evaluate("() => window.sessionStorage.getItem('farMesh.apiKey')")


def key_rows(p: Page) -> dict:
    return p.page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('#keys tbody tr')].map(r => [
        r.dataset.keyId, {status: r.dataset.status, name: r.cells[0].innerText.trim(),
                          words: r.querySelector("[data-field='status']").innerText.trim(),
                          revoke: !!r.querySelector("button[data-action='revoke']")}]))""")


# ------------------------------------------------------------------------------------------------------- tests
def test_the_page_is_served_by_the_coordinator_from_its_own_origin(live):
    page = httpx.get(f"{live.url}/account")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for path in ("/account/static/account.js", "/account/static/account.css", "/dashboard/static/common.js",
                 "/dashboard/static/dashboard.css", "/dashboard/static/vendor/chart.umd.min.js"):
        assert httpx.get(f"{live.url}{path}").status_code == 200, path
    # only the files it shares with the provider dashboard; no page, nothing outside the folders
    for path in ("/dashboard/static/provider.js", "/account/static/account.html", "/account/static/%2e%2e/app.py"):
        assert httpx.get(f"{live.url}{path}").status_code == 404, path
    assert "/account" not in httpx.get(f"{live.url}/openapi.json").json()["paths"]


def test_a_wrong_or_empty_key_is_explained_and_nothing_is_stored(open_page, live):
    p = open_page()
    p.open("/account", wait_state="signed-out")
    page = p.page
    assert page.is_visible("#signin") and not page.is_visible("#account")
    assert page.get_attribute("#key-input", "type") == "password"
    page.click("#signin-form button[type=submit]")
    assert p.text("#signin-error") == "Paste your API key first (it starts with fl_)."
    page.fill("#key-input", "fl_" + "0" * 40)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signin-error:has-text('not accepted')")
    assert p.text("#signin-error").startswith("This key was not accepted: invalid API key. Check that you pasted")
    assert page.get_attribute("#key-input", "aria-invalid") == "true"
    assert stored_key(p) is None and page.is_hidden("#account")
    assert page.evaluate("() => document.body.dataset.state") == "signed-out"
    p.errors = [e for e in p.errors if "401" not in e]  # the browser logs the refused call itself
    p.assert_clean()


def test_signed_in_the_page_shows_balance_deposit_usage_and_requests(open_page, live):
    # A request still running: its reservation shows as reserved, and the request as running.
    live.model.script = Script(hang_at=1)
    running = threading.Thread(target=lambda: httpx.post(
        f"{live.url}{GENERATE}", headers=live.auth(), timeout=60,
        json={"prompt": "Still thinking", "max_tokens": 20, "stream": False, "request_id": "req-running-2"}))
    running.start()
    try:
        wait_until(lambda: live.api("/mesh/account").json()["reserved_far"] != "0", timeout=15, what="a reservation")
        live.model.script = Script()
        _check_signed_in_page(open_page, live)
    finally:
        httpx.delete(f"{live.url}/mesh/inference/req-running-2", headers=live.auth(), timeout=10)
        running.join(30)


def _check_signed_in_page(open_page, live):
    row = live.db("SELECT balance_far, reserved_far FROM far_accounts WHERE account_id = $1",
                  uuid.UUID(live.account_id))
    assert row["reserved_far"] == Decimal("0.002")  # 20 tokens × 0.0001
    done = live.done
    cost = Decimal(done["cost_far"])
    assert cost > 0 and row["balance_far"] == GRANT + Decimal(DEPOSIT_BASE) / FAR - cost

    p = open_page()
    p.open("/account?refresh=2", wait_state=None)
    sign_in(p, live.key)
    page = p.page
    assert stored_key(p) == live.key  # this tab only (sessionStorage); nothing in localStorage or cookies
    assert page.evaluate("() => window.localStorage.length") == 0 and p.context.cookies() == []

    # Balance: the exact decimal strings of the API (the grant has 15 decimals; the deposit 18).
    assert p.text("#balance") == far(row["balance_far"])
    assert p.text("#balance").startswith("1,259.56") and len(p.text("#balance").split(".")[1]) == 18
    assert p.text("#reserved") == "0.002"
    assert p.text("#available") == far(row["balance_far"] - row["reserved_far"])
    assert p.text("#deposited") == "25.000000000000000005"
    assert p.text("#charged") == far(cost)
    assert p.text("#account-id") == live.account_id
    assert p.text("#current-key").startswith("“laptop” (fl_")

    # How to deposit: the contract, this account's reference, the confirmations (as GET /mesh/account says).
    how = live.api("/mesh/account").json()["deposit"]
    assert p.text("#deposit-contract") == how["contract"] == live.chain.deposit.address
    assert p.text("#deposit-ref") == how["account_ref"] == account_ref(live.account_id)
    assert p.text("#deposit-token") == live.chain.token.address
    assert p.text("#deposit-confirmations") == str(CONFIRMATIONS)
    assert p.text("#deposit-network") == "the local chain"
    assert account_ref(live.account_id) in p.text(".steps")

    # The deposit, from the ledger: amount to the last base unit, its transaction (a local chain: no explorer link).
    deposits = page.query_selector_all("#deposits tbody tr")
    assert len(deposits) == 1
    assert deposits[0].get_attribute("data-tx") == live.deposit_tx
    assert deposits[0].query_selector("[data-field='amount']").inner_text().strip() == "25.000000000000000005"
    assert "local chain: no explorer" in deposits[0].inner_text() and not deposits[0].query_selector("a")
    kinds = page.eval_on_selector_all("#statement tbody tr", "rows => rows.map(r => r.dataset.kind)")
    assert kinds == ["charge", "deposit", "grant"]

    # Recent requests: the completed one with tokens, cost and the two servers (wallets, what each earned).
    rows = {r.get_attribute("data-request-id"): r for r in page.query_selector_all("#requests tbody tr")}
    assert set(rows) == {"req-done-1", "req-running-2"}
    finished = rows["req-done-1"]
    usage = done["usage"]
    assert finished.get_attribute("data-status") == "completed"
    assert finished.query_selector("[data-field='tokens']").inner_text().strip() == \
        f"{usage['prompt_tokens']} + {usage['completion_tokens']}"
    assert finished.query_selector("[data-field='cost']").inner_text().strip() == far(cost) == done["cost_far"]
    served = {li.get_attribute("data-peer-id"): li.inner_text() for li in finished.query_selector_all(".served-by li")}
    assert set(served) == {"QmScriptedA", "QmScriptedB"}
    [api_request] = [r for r in live.api("/mesh/account/usage").json()["requests"] if r["request_id"] == "req-done-1"]
    api_nodes = {n["peer_id"]: n for n in api_request["nodes"]}
    for peer, text in served.items():
        assert f"blocks {api_nodes[peer]['blocks']}" in text
        assert WALLETS[peer][:10] in text and f"{far(Decimal(api_nodes[peer]['payment_far']))} FAR" in text
    assert rows["req-running-2"].get_attribute("data-status") == "running"
    assert "running, 0.002 reserved" in rows["req-running-2"].inner_text()

    # Usage chart: 30 UTC days, today's bar is what was spent today, and bars are drawn.
    chart = page.evaluate("""() => { const c = window.farAccount.chart;
        return {type: c.config.type, n: c.data.datasets[0].data.length, last: c.$days[c.$days.length - 1],
                bars: c.getDatasetMeta(0).data.length}; }""")
    assert chart["type"] == "bar" and chart["n"] == 30 and chart["bars"] == 30
    assert chart["last"]["cost_far"] == done["cost_far"] and chart["last"]["requests"] == 2
    painted = page.evaluate("""() => { const c = document.getElementById('usage-chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let teal = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] === 15 && d[i + 1] === 118 && d[i + 2] === 110) teal++;
        return teal; }""")
    assert painted > 50, painted
    assert "2 requests in the last 30 days" in p.text("#usage-note")

    # Accessible: every form field has a label, every button a name; the page refreshes itself.
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input')].filter(i =>
        !(i.labels && i.labels.length) && !i.getAttribute('aria-label')).map(i => i.id)""")
    assert unlabeled == []
    nameless = page.evaluate("""() => [...document.querySelectorAll('button')].filter(b =>
        !(b.getAttribute('aria-label') || b.innerText.trim())).map(b => b.outerHTML)""")
    assert nameless == []
    p.wait_refresh()
    p.screenshot("user-page.png")
    p.assert_clean()

    # A reload keeps the session (same tab); sign-out forgets the key and clears the figures.
    page.reload()
    page.wait_for_selector("body[data-state='ok']")
    assert p.text("#balance") == far(row["balance_far"])
    page.click("#sign-out")
    page.wait_for_selector("body[data-state='signed-out']")
    assert stored_key(p) is None and page.is_hidden("#account") and p.text("#balance") == "—"
    assert page.query_selector_all("#requests tbody tr") == []


def test_create_a_key_then_revoke_it_after_confirming(open_page, live):
    p = open_page()
    p.open("/account", wait_state=None)
    sign_in(p, live.key)
    page = p.page

    # Create: the secret is shown once, with the copy hint; it works at once.
    page.fill("#new-key-name-input", "ci")
    page.fill("#new-key-limit", "0")
    page.click("#create-key-form button[type=submit]")
    assert "whole number of at least 1" in p.text("#create-key-error")
    page.fill("#new-key-limit", "30")
    page.click("#create-key-form button[type=submit]")
    page.wait_for_selector("#new-key:not([hidden])")
    secret = page.input_value("#new-key-secret")
    assert secret.startswith("fl_") and "shown only once" in p.text("#new-key")
    assert page.evaluate("() => document.activeElement.id") == "new-key-secret"  # selected, ready to copy
    assert live.api("/mesh/account", key=secret).status_code == 200
    page.click("#new-key-copy")
    page.wait_for_selector("#new-key-copied:not(:empty)")
    assert p.text("#new-key-copied") in ("Copied to the clipboard.",
                                         "Your browser did not let the page copy: the text is selected, press "
                                         "Ctrl+C (⌘C) to copy.")
    page.click("#new-key-done")
    assert page.is_hidden("#new-key") and page.input_value("#new-key-secret") == ""

    keys = live.api("/mesh/account/keys").json()["keys"]
    new = next(k for k in keys if k["name"] == "ci")
    assert new["rate_limit_per_minute"] == 30
    p.wait_js(f"document.querySelector(\"#keys tr[data-key-id='{new['key_id']}']\")")
    rows = key_rows(p)
    assert rows[new["key_id"]] == {"status": "active", "name": "ci", "words": "active", "revoke": True}
    first = next(k for k in keys if k["current"])
    assert rows[first["key_id"]]["words"] == "active · this key"

    # Revoke: a confirmation first; Escape cancels (nothing revoked), confirming revokes.
    button = f"#keys tr[data-key-id='{new['key_id']}'] button[data-action='revoke']"
    page.click(button)
    page.wait_for_selector("#revoke-dialog[open]")
    assert "“ci”" in p.text("#revoke-text") and "cannot be undone" in p.text("#revoke-text")
    page.keyboard.press("Escape")
    page.wait_for_selector("#revoke-dialog:not([open])", state="attached")
    assert live.api("/mesh/account", key=secret).status_code == 200
    page.click(button)
    page.wait_for_selector("#revoke-dialog[open]")
    page.click("#revoke-confirm")
    page.wait_for_selector(f"#keys tr[data-key-id='{new['key_id']}'][data-status='revoked']")
    assert key_rows(p)[new["key_id"]]["words"].startswith("revoked ")
    assert not key_rows(p)[new["key_id"]]["revoke"]
    assert "revoked: it is refused from now on" in p.text("#keys-message")

    # The effect: the API refuses the revoked key at once, for the account and for generation.
    refused = live.api("/mesh/account", key=secret)
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]
    generate = httpx.post(f"{live.url}{GENERATE}", headers=live.auth(secret), timeout=10,
                          json={"prompt": "x", "max_tokens": 1, "stream": False})
    assert generate.status_code == 401
    p.assert_clean()

    # And the page refuses it too, saying why.
    page.click("#sign-out")
    page.wait_for_selector("body[data-state='signed-out']")
    page.fill("#key-input", secret)
    page.press("#key-input", "Enter")
    page.wait_for_selector("#signin-error:has-text('revoked')")
    assert p.text("#signin-error").startswith("This key was not accepted: this API key was revoked.")
    assert stored_key(p) is None


def test_revoking_the_signed_in_key_signs_out(open_page, live):
    created = httpx.post(f"{live.url}/mesh/account/keys", headers=live.auth(), json={"name": "temp"}, timeout=10)
    assert created.status_code == 201, created.text
    temp = created.json()
    p = open_page()
    p.open("/account", wait_state=None)
    sign_in(p, temp["key"])
    assert p.text("#current-key").startswith("“temp”")
    p.page.click(f"#keys tr[data-key-id='{temp['key_id']}'] button[data-action='revoke']")
    p.page.wait_for_selector("#revoke-dialog[open]")
    assert "you will be signed out" in p.text("#revoke-text")
    p.page.click("#revoke-confirm")
    p.page.wait_for_selector("body[data-state='signed-out']")
    assert "You revoked the key you were signed in with" in p.text("#signin-error")
    assert stored_key(p) is None
    assert live.api("/mesh/account", key=temp["key"]).status_code == 401


def test_a_key_revoked_elsewhere_signs_the_open_page_out(open_page, live):
    created = httpx.post(f"{live.url}/mesh/account/keys", headers=live.auth(), json={"name": "other tab"}, timeout=10)
    other = created.json()
    p = open_page()
    p.open("/account?refresh=1", wait_state=None)
    sign_in(p, other["key"])
    assert httpx.delete(f"{live.url}/mesh/account/keys/{other['key_id']}", headers=live.auth(),
                        timeout=10).status_code == 200
    p.page.wait_for_selector("body[data-state='signed-out']", timeout=10000)
    assert p.text("#signin-error") == "You were signed out: this API key was revoked. Sign in with another key."


def test_the_page_on_a_phone(open_page, live):
    p = open_page(PHONE)
    p.open("/account", wait_state=None)
    sign_in(p, live.key)
    overflow = p.page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert overflow[0] <= overflow[1], f"horizontal overflow on a phone: {overflow}"
    assert not p.page.is_visible("#requests thead")  # tables stack into cards
    box = p.page.query_selector("#usage-chart").bounding_box()
    assert box["width"] <= PHONE["width"] and box["height"] > 150
    assert p.text("#deposit-ref") == account_ref(live.account_id)
    p.screenshot("user-page-phone.png", full_page=False)  # the first screen: balance and how to deposit
    p.assert_clean()
