"""The provider dashboard in a real browser (Debian's headless Chromium driven by Playwright) against a live
discovery service (subprocess on a loopback port, real Postgres + Redis, a real DHT bootstrap and one Petals
server), with seeded ledger/payout data and nodes registered and heartbeating through the real API.

Checks the numbers against the database, the chart (30 bars, right values, drawn pixels), the payment tx links
(BscScan testnet / mainnet, none for a local chain), a node whose heartbeats stop showing offline after a refresh,
the empty and error states (unknown wallet, malformed wallet, discovery down), the phone layout, and takes the
screenshots docs/dashboard.md shows (into docs/img/ with FAR_MESH_UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import httpx
import pytest

from infra.processes import wait_until
from infra.swarm import LocalSwarm
from services.common.identity import create_identity, load_identity, registration_message
from services.common.money import format_far
from tests.browser_support import (IMG_DIR, PHONE, browser, chromium, far,  # noqa: F401  (fixtures)
                                   pages_of)
from tests.fixtures.swarm import MODEL_ID, NUM_BLOCKS, start_discovery

pytestmark = pytest.mark.swarm

WALLET = "0x5afe5afE5afE5afE5afE5aFe5aFe5Afe5Afe5AfE"  # mixed case (valid EIP-55) on purpose: pages and API answer lowercase
OTHER_WALLET = "0x" + "77" * 20  # another provider, must not leak into WALLET's numbers
UNKNOWN_WALLET = "0x" + "0d" * 20
TTL_S = 3.0
TX = {"testnet": "0x" + "a1" * 32, "mainnet": "0x" + "b2" * 32, "local": "0x" + "c3" * 32}


# --------------------------------------------------------------------------------------------------------
# Browser (tests/browser_support.py: Debian's Chromium, the Page wrapper)
# --------------------------------------------------------------------------------------------------------
@pytest.fixture
def open_page(browser, stack):
    with pages_of(browser, stack.url) as make:
        yield make


# --------------------------------------------------------------------------------------------------------
# The live stack: DHT bootstrap + one Petals server, discovery, registered nodes, seeded ledger
# --------------------------------------------------------------------------------------------------------
class Heartbeats:
    """Heartbeats every 0.5 s for the registered nodes (as far-node would); stop() one to let it lapse."""

    def __init__(self, url: str):
        self.url = url
        self.nodes: dict[str, tuple[str, dict]] = {}  # name -> (token, report)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True, name="dashboard-heartbeats")

    def add(self, name: str, token: str, report: dict):
        with self.lock:
            self.nodes[name] = (token, report)

    def stop(self, name: str):
        with self.lock:
            self.nodes.pop(name, None)

    def _run(self):
        with httpx.Client(timeout=5) as client:
            while not self.done.wait(0.5):
                with self.lock:
                    beats = list(self.nodes.items())
                for name, (token, report) in beats:
                    try:
                        r = client.post(f"{self.url}/nodes/heartbeat", json=report,
                                        headers={"Authorization": f"Bearer {token}"})
                        if r.status_code != 200:
                            self.errors.append(f"{name}: {r.status_code} {r.text[:200]}")
                    except httpx.HTTPError as error:
                        self.errors.append(f"{name}: {error!r}")

    def close(self):
        self.done.set()
        self.thread.join(timeout=5)


class Stack:
    def __init__(self, url, discovery, swarm, heartbeats, nodes, expected, db_url):
        self.url, self.discovery, self.swarm, self.heartbeats = url, discovery, swarm, heartbeats
        self.nodes, self.expected, self.db_url = nodes, expected, db_url

    def api(self, path: str) -> dict:
        response = httpx.get(f"{self.url}{path}", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()


def register(url: str, identity, *, wallet: str, span: tuple[int, int], name: str, hardware: dict) -> dict:
    nonce = httpx.get(f"{url}/nodes/challenge", params={"peer_id": identity.peer_id}).json()["nonce"]
    message = registration_message(nonce=nonce, peer_id=identity.peer_id, wallet_address=wallet, model_id=MODEL_ID,
                                   start_block=span[0], end_block=span[1], public_name=name, hardware=hardware)
    response = httpx.post(f"{url}/nodes/register", json={
        "peer_id": identity.peer_id, "wallet_address": wallet, "model_id": MODEL_ID, "start_block": span[0],
        "end_block": span[1], "public_name": name, "hardware": hardware, "public_key": identity.public_key_b64,
        "signature": identity.sign(message), "nonce": nonce}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def seed_ledger(postgres_url: str, nodes: dict) -> dict:
    """Sessions on several days (one outside the 30-day window, one still running), three payout batches
    (testnet confirmed, mainnet confirmed, local submitted). Returns the expected figures, read back with SQL."""
    import psycopg

    from database.migrate import libpq_url

    today = datetime.now(timezone.utc).date()
    now = datetime.now(timezone.utc)
    # (node, days ago or None = running, completion tokens, batch)
    plan = [
        ("alpha", 35, 400, "testnet"), ("alpha", 29, 120, "testnet"), ("beta", 29, 80, "testnet"),
        ("alpha", 10, 250, "mainnet"), ("beta", 10, 150, "mainnet"),
        ("alpha", 3, 60, "local"), ("alpha", 1, 90, None), ("beta", 1, 30, None),
        ("alpha", 0, 45, None), ("beta", None, 25, None),
    ]
    sessions = {}  # (node, days ago) -> session id
    with psycopg.connect(libpq_url(postgres_url), autocommit=True) as conn:
        batches = {}
        for network, state, confirmed_days in (("testnet", "confirmed", 20), ("mainnet", "confirmed", 5),
                                               ("local", "submitted", None)):
            when = now - timedelta(days=confirmed_days if confirmed_days is not None else 1)
            batches[network] = conn.execute(
                """INSERT INTO far_payment_batches (network, state, cutoff, total_far, recipient_count, raw_tx, tx_hash,
                                                    nonce, created_at, confirmed_at, block_number)
                   VALUES (%s, %s, %s, 0, 1, '\\x00', %s, 0, %s, %s, %s) RETURNING batch_id""",
                (network, state, when, TX[network], when, when if state == "confirmed" else None,
                 1000 + len(batches) if state == "confirmed" else None)).fetchone()[0]
        for name, days_ago, tokens, batch in plan:
            node = nodes[name]
            blocks = f"{node['span'][0]}:{node['span'][1]}"
            width = node["span"][1] - node["span"][0]
            session_id = conn.execute(
                """INSERT INTO far_mesh_sessions (request_id, model_id, price_per_token_far, price_per_prompt_token_far,
                                                  platform_fee_bps) VALUES (%s, %s, 0.0001, 0, 1000) RETURNING session_id""",
                (uuid.uuid4().hex, MODEL_ID)).fetchone()[0]
            sessions[(name, days_ago)] = session_id
            conn.execute(
                """INSERT INTO far_session_contributions (session_id, peer_id, node_id, wallet_address, blocks,
                                                          work_units, steps) VALUES (%s, %s, %s, %s, %s, %s, %s)""",
                (session_id, node["peer_id"], node["node_id"], node["wallet"], blocks, tokens * width, tokens))
            if name == "alpha":  # another provider shared the session: WALLET gets only its share
                conn.execute(
                    """INSERT INTO far_session_contributions (session_id, peer_id, node_id, wallet_address, blocks,
                                                              work_units, steps) VALUES (%s, %s, %s, %s, '2:4', %s, %s)""",
                    (session_id, nodes["other"]["peer_id"], nodes["other"]["node_id"], OTHER_WALLET, tokens * 2,
                     tokens))
            if days_ago is None:
                continue
            conn.execute("SELECT finalize_session(%s, 'completed', 'length', 0, %s)", (session_id, tokens))
            finalized = datetime.combine(today - timedelta(days=days_ago), datetime.min.time(), timezone.utc) + \
                timedelta(hours=12)
            conn.execute("UPDATE far_mesh_sessions SET finalized_at = least(%s, now()) WHERE session_id = %s",
                         (finalized, session_id))
            if batch:
                conn.execute("UPDATE far_session_contributions SET payment_batch_id = %s "
                             "WHERE session_id = %s AND lower(wallet_address) = lower(%s)",
                             (batches[batch], session_id, WALLET))
        for network, batch_id in batches.items():
            amount = conn.execute("SELECT sum(payment_far) FROM far_session_contributions WHERE payment_batch_id = %s",
                                  (batch_id,)).fetchone()[0]
            conn.execute("INSERT INTO far_payment_batch_items VALUES (%s, %s, %s, %s, 3)",
                         (batch_id, WALLET.lower(), amount, int(amount * 10**18)))
            conn.execute("UPDATE far_payment_batches SET total_far = %s WHERE batch_id = %s", (amount, batch_id))

        checks = seed_checks(conn, nodes, sessions)

        # Expected figures, straight from the ledger.
        row = conn.execute(
            """SELECT sum(c.payment_far) FILTER (WHERE s.finalized_at IS NOT NULL),
                      sum(c.payment_far) FILTER (WHERE s.finalized_at IS NOT NULL AND b.state = 'confirmed'),
                      sum(c.work_units / 2)
                 FROM far_session_contributions c JOIN far_mesh_sessions s USING (session_id)
                 LEFT JOIN far_payment_batches b ON b.batch_id = c.payment_batch_id
                WHERE lower(c.wallet_address) = lower(%s)""", (WALLET,)).fetchone()
        earned, paid, tokens = row
        per_day = dict(conn.execute(
            """SELECT (s.finalized_at AT TIME ZONE 'UTC')::date, sum(c.payment_far)
                 FROM far_session_contributions c JOIN far_mesh_sessions s USING (session_id)
                WHERE lower(c.wallet_address) = lower(%s) AND s.finalized_at IS NOT NULL GROUP BY 1""",
            (WALLET,)).fetchall())
        per_node = {}
        for name in ("alpha", "beta"):
            per_node[name] = conn.execute(
                """SELECT coalesce(sum(c.payment_far) FILTER (WHERE s.finalized_at IS NOT NULL), 0),
                          sum(c.work_units / 2) FROM far_session_contributions c JOIN far_mesh_sessions s USING (session_id)
                    WHERE c.node_id = %s""", (nodes[name]["node_id"],)).fetchone()
        amounts = dict(conn.execute(
            "SELECT b.network, i.amount_far FROM far_payment_batch_items i JOIN far_payment_batches b USING (batch_id)"
        ).fetchall())
    return {"earned": earned, "paid": paid, "pending": earned - paid, "tokens": int(tokens), "per_day": per_day,
            "per_node": per_node, "amounts": amounts, "today": today, "checks": checks}


def seed_checks(conn, nodes: dict, sessions: dict) -> dict:
    """Spot checks as the coordinator writes them (services/coordinator/checks.py): alpha passed all of its checks;
    beta failed two (one in a settled session: its payment is withheld; one in the running session: disputed,
    nothing to withhold yet) and is quarantined. Returns what the page must show, read back with SQL."""
    alpha, beta, other = nodes["alpha"]["peer_id"], nodes["beta"]["peer_id"], nodes["other"]["peer_id"]
    row = ("INSERT INTO far_spot_checks (session_id, model_id, checked_peer_id, blocks, positions, prefix_length, "
           "verifier_peer_id, referee_peer_id, outcome, suspect_peer_id, error, tolerance, dtype) "
           "VALUES (%s, %s, %s, %s, 1, %s, %s, %s, %s, %s, %s, 0.0001, 'float32')")
    for i in range(7):
        conn.execute(row, (sessions[("alpha", 1)], MODEL_ID, alpha, "0:2", 10 + i, other, None, "passed", None, 2e-7))
    for i in range(3):
        conn.execute(row, (sessions[("beta", 10)], MODEL_ID, beta, "2:4", 10 + i, other, None, "passed", None, 3e-7))
    reasons = {}
    for key, error in ((("beta", 1), 0.0712), (("beta", None), 0.0695)):
        conn.execute(row, (sessions[key], MODEL_ID, beta, "2:4", 20, other, alpha, "failed", beta, error))
        reasons[key] = (f"spot check of blocks 2:4 (1 positions) failed: its outputs are {error:.3g} away (relative L2) "
                        f"from {alpha}'s and {error - 0.0004:.3g} from the other server's, tolerance 0.0001 (float32)")
        conn.execute("SELECT * FROM dispute_contribution(%s, %s, '2:4', %s)", (sessions[key], beta, reasons[key]))
    quarantine = f"2 failed spot checks; last: {reasons[('beta', None)]}"
    conn.execute("INSERT INTO far_quarantine (peer_id, reason, failed_checks) VALUES (%s, %s, 2)", (beta, quarantine))
    withheld = conn.execute("SELECT coalesce(sum(withheld_far), 0) FROM far_session_contributions WHERE peer_id = %s",
                            (beta,)).fetchone()[0]
    assert withheld > 0
    return {"withheld": withheld, "quarantine": quarantine, "reasons": reasons,
            "settled_dispute": str(sessions[("beta", 1)]), "running_dispute": str(sessions[("beta", None)])}


@pytest.fixture(scope="module")
def stack(tiny_model_dir, make_database, redis_url, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dashboard")
    postgres_url = make_database()  # a fresh migrated database of our own: other modules' rows stay out
    heartbeats = None
    discovery = None
    with LocalSwarm(tiny_model_dir, MODEL_ID, workdir / "swarm", update_period=5) as swarm:
        swarm.start_bootstrap()
        node_a = swarm.start_node("alpha", "0:2")  # a real Petals server (not registering by itself)
        try:
            discovery, url = start_discovery(
                workdir=workdir, initial_peers=swarm.initial_peers, postgres_url=postgres_url, redis_url=redis_url,
                env_extra={"DISCOVERY_MODELS": f"{MODEL_ID}={NUM_BLOCKS}", "FAR_MESH_MODEL_PATH": "",
                           "NODE_HEARTBEAT_TTL_S": str(TTL_S), "DISCOVERY_FLUSH_INTERVAL_S": "0.5"})
            # Nodes registered through the real API (signed with their libp2p identity keys).
            create_identity(workdir / "beta.key")
            create_identity(workdir / "other.key")
            nodes = {}
            for name, key, wallet, span, hardware, report in (
                ("alpha", node_a.identity, WALLET, (0, 2),
                 {"gpu": "NVIDIA RTX 4090", "vram_total_gb": 24, "ram_total_gb": 64, "device": "cuda"},
                 {"vram_used_gb": 9.5, "gpu_temp_c": 61, "tokens_served": 1000, "state": "online"}),
                ("beta", workdir / "beta.key", WALLET, (2, 4),
                 {"gpu": "NVIDIA RTX 3090", "vram_total_gb": 24, "ram_total_gb": 32, "device": "cuda"},
                 {"vram_used_gb": 12.25, "gpu_temp_c": 70, "state": "online"}),
                ("other", workdir / "other.key", OTHER_WALLET, (2, 4),
                 {"gpu": "NVIDIA A100", "vram_total_gb": 80, "device": "cuda"}, {}),
            ):
                identity = load_identity(key)
                reply = register(url, identity, wallet=wallet, span=span, name=name, hardware=hardware)
                nodes[name] = {"node_id": reply["node_id"], "token": reply["node_token"], "peer_id": identity.peer_id,
                               "wallet": wallet, "span": span, "report": report}
            heartbeats = Heartbeats(url)
            for name in ("alpha", "beta"):
                heartbeats.add(name, nodes[name]["token"], nodes[name]["report"])
            heartbeats.thread.start()
            httpx.post(f"{url}/nodes/unregister", headers={"Authorization": f"Bearer {nodes['other']['token']}"})
            expected = seed_ledger(postgres_url, nodes)
            swarm.wait_online(["alpha"], NUM_BLOCKS, timeout=90)
            wait_until(lambda: httpx.get(f"{url}/models/{MODEL_ID}/coverage").json()["loaded_blocks"] == 2,
                       timeout=30, what="discovery sees alpha's blocks loaded", process=discovery)
            yield Stack(url, discovery, swarm, heartbeats, nodes, expected, postgres_url)
        finally:
            if heartbeats is not None:
                heartbeats.close()
            if discovery is not None:
                discovery.stop()


# --------------------------------------------------------------------------------------------------------
# Tests (in order: the last one stops discovery)
# --------------------------------------------------------------------------------------------------------
def test_entry_page_validates_and_opens_the_wallet(open_page, stack):
    p = open_page()
    p.open("/dashboard", wait_state=None)
    page = p.page
    page.wait_for_selector("#discovery-health:has-text('Discovery is up')")
    assert MODEL_ID in p.text("#discovery-health")
    page.fill("#wallet-input", "0x12345")
    page.click("button[type=submit]")
    assert p.text("#wallet-error") == "A wallet address is 0x followed by 40 hexadecimal digits; this one has 5."
    page.fill("#wallet-input", "0x" + "zz" * 20)
    page.click("button[type=submit]")
    assert "only hexadecimal digits" in p.text("#wallet-error")
    page.fill("#wallet-input", WALLET)
    p.screenshot("dashboard-entry.png")
    page.fill("#wallet-input", f"  {WALLET}  ")  # pasted with spaces: trimmed
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.url}/provider/{WALLET}")
    page.wait_for_selector("body[data-state='ok']")
    # no-JS path: the form's GET redirects on the server
    r = httpx.get(f"{stack.url}/dashboard", params={"wallet": WALLET}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/provider/{WALLET}"
    p.assert_clean()


def test_provider_page_shows_the_ledger(open_page, stack):
    exp = stack.expected
    p = open_page()
    response = p.open(f"/provider/{WALLET}?refresh=2")
    assert response.status == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    page = p.page

    # Totals = the ledger (earned = Σ payment_far of finalized sessions; paid = in confirmed batches).
    assert p.text("#total-earned") == far(exp["earned"])
    assert p.text("#total-paid") == far(exp["paid"])
    assert p.text("#total-pending") == far(exp["pending"])
    assert p.text("#total-tokens") == f"{exp['tokens']:,}"
    assert p.text("#total-nodes") == "2 / 2"
    assert exp["earned"] > 0 and exp["paid"] > 0 and exp["pending"] > 0
    stats = stack.api(f"/provider/{WALLET}/stats")
    assert (stats["earned_far"], stats["paid_far"]) == (format_far(exp["earned"]), format_far(exp["paid"]))

    # Nodes: status, uptime, last seen, blocks, state, hardware, per-node money (one atomic snapshot: the page
    # re-renders on every refresh).
    cards = page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('article.node')].map(c => [
        c.dataset.nodeId, {node_status: c.dataset.status, ...Object.fromEntries([...c.querySelectorAll('[data-field]')]
            .map(f => [f.dataset.field, f.innerText.trim()]))}]))""")
    assert set(cards) == {stack.nodes["alpha"]["node_id"], stack.nodes["beta"]["node_id"]}
    alpha = cards[stack.nodes["alpha"]["node_id"]]
    beta = cards[stack.nodes["beta"]["node_id"]]
    for card in (alpha, beta):
        assert card["node_status"] == "online" and card["status"] == "Online", card
        assert card["uptime"].endswith(" s") or "min" in card["uptime"], card
        assert "ago" in card["last-seen"] or "just now" in card["last-seen"], card
    assert alpha["blocks"] == f"blocks 0-1 (2) of {MODEL_ID}"
    assert beta["blocks"] == f"blocks 2-3 (2) of {MODEL_ID}"
    assert alpha["state"] == "serving its blocks (ONLINE in the swarm)"  # the real Petals server
    assert beta["state"] == "heartbeats arrive; not seen in the swarm (DHT) yet"
    assert alpha["gpu"] == "NVIDIA RTX 4090" and beta["gpu"] == "NVIDIA RTX 3090"
    assert alpha["vram"] == "9.5 / 24 GB" and beta["vram"] == "12.3 / 24 GB"
    assert alpha["temp"] == "61 °C" and beta["temp"] == "70 °C"
    for name, card in (("alpha", alpha), ("beta", beta)):
        earned, tokens = exp["per_node"][name]
        assert card["earned"] == f"{far(earned)} FAR"
        assert card["tokens"] == f"{int(tokens):,}"

    # Earnings chart: 30 daily bars, the right values on the right days, and pixels actually drawn.
    chart = page.evaluate("""() => { const c = window.farDashboard.chart;
        return {type: c.config.type, labels: c.data.labels, values: c.data.datasets[0].data,
                days: c.$days.map(d => [d.date, d.earned_far]), bars: c.getDatasetMeta(0).data.length}; }""")
    assert chart["type"] == "bar" and chart["bars"] == 30 and len(chart["values"]) == 30
    today = exp["today"]
    assert chart["days"][-1][0] == today.isoformat()
    assert chart["days"][0][0] == (today - timedelta(days=29)).isoformat()
    for (day, earned_text), value in zip(chart["days"], chart["values"]):
        want = exp["per_day"].get(date.fromisoformat(day), Decimal(0))
        assert Decimal(earned_text) == want, day
        assert value == pytest.approx(float(want))
    nonzero = [d for d, _ in chart["days"] if Decimal(_) > 0]
    assert len(nonzero) == 5  # days 29, 10, 3, 1, 0; day 35 is outside the window
    painted = page.evaluate("""() => { const c = document.getElementById('earnings-chart');
        const ctx = c.getContext('2d'); const d = ctx.getImageData(0, 0, c.width, c.height).data;
        let teal = 0, any = 0;
        for (let i = 0; i < d.length; i += 4) { if (d[i + 3] > 0) any++;
          if (d[i] === 15 && d[i + 1] === 118 && d[i + 2] === 110 && d[i + 3] === 255) teal++; }
        return {w: c.width, h: c.height, any, teal}; }""")
    assert painted["w"] > 300 and painted["h"] > 150
    assert painted["teal"] > 200, painted  # the bars (#0f766e) are drawn
    assert "5 days" in p.text("#earnings-note")

    # Payments: newest first; tx links to BscScan testnet/mainnet, no link for the local chain.
    rows = page.evaluate("""() => [...document.querySelectorAll('#payments tbody tr')].map(r => ({
        state: r.dataset.state, network: r.querySelector("td[data-label='Network']").innerText.trim(),
        amount: r.querySelector("[data-field='amount']").innerText.trim(),
        links: [...r.querySelectorAll('a')].map(a => a.getAttribute('href')),
        tx: r.querySelector("[data-field='tx']").innerText.trim(), text: r.innerText}))""")
    assert [r["state"] for r in rows] == ["submitted", "confirmed", "confirmed"]
    by_network = {r["network"]: r for r in rows}
    assert by_network["testnet"]["links"] == [f"https://testnet.bscscan.com/tx/{TX['testnet']}"]
    assert by_network["mainnet"]["links"] == [f"https://bscscan.com/tx/{TX['mainnet']}"]
    assert by_network["local"]["links"] == []
    assert "no explorer" in by_network["local"]["tx"]
    for network, row in by_network.items():
        assert row["amount"] == far(exp["amounts"][network])
    assert "confirmed" in by_network["testnet"]["text"]
    assert "waiting for confirmation" in by_network["local"]["text"]

    # It refreshes itself (?refresh=2 here; 30 s by default).
    assert p.text("#refresh-period") == "every 2 s"
    p.wait_refresh()
    p.screenshot("dashboard-provider.png")
    p.assert_clean()


def test_provider_page_shows_checks_disputes_and_quarantine(open_page, stack):
    """The "Checks" section of every node: passed/failed, the withheld FAR and the reason of each dispute (session,
    blocks, time), a quarantine banner with the reason; the wallet's withheld total and a page alert."""
    exp = stack.expected["checks"]
    p = open_page()
    p.open(f"/provider/{WALLET}")
    alpha = f"article.node[data-node-id='{stack.nodes['alpha']['node_id']}']"
    beta = f"article.node[data-node-id='{stack.nodes['beta']['node_id']}']"

    assert p.text(f"{alpha} [data-field='checks-record']") == "7 passed, 0 failed"
    assert p.text(f"{alpha} [data-field='disputed']") == "none"
    assert not p.page.query_selector(f"{alpha} [data-field='quarantine']")
    assert not p.page.query_selector(f"{alpha} [data-field='disputes']")
    assert p.page.get_attribute(alpha, "data-quarantined") == ""

    assert p.text(f"{beta} [data-field='checks-record']") == "3 passed, 2 failed"
    assert p.text(f"{beta} [data-field='disputed']") == f"{far(exp['withheld'])} FAR withheld in 2 sessions"
    assert p.page.get_attribute(beta, "data-quarantined") == "1"
    assert p.page.is_visible(f"{beta} [data-field='quarantine']")
    assert p.text(f"{beta} [data-field='quarantine-reason']") == exp["quarantine"]
    assert "no work is routed to this node" in p.text(f"{beta} [data-field='quarantine']")
    disputes = p.page.evaluate(f"""() => [...document.querySelectorAll("{beta} [data-field='disputes'] li")].map(li =>
        ({{session: li.dataset.sessionId, ...Object.fromEntries([...li.querySelectorAll('[data-field]')]
            .map(f => [f.dataset.field, f.innerText.trim()]))}}))""")
    by_session = {d["session"]: d for d in disputes}
    assert set(by_session) == {exp["settled_dispute"], exp["running_dispute"]}
    settled, running = by_session[exp["settled_dispute"]], by_session[exp["running_dispute"]]
    assert settled["dispute-reason"] == exp["reasons"][("beta", 1)]
    assert running["dispute-reason"] == exp["reasons"][("beta", None)]
    assert settled["dispute-withheld"] == f"{far(exp['withheld'])} FAR withheld"
    assert running["dispute-withheld"] == "nothing withheld yet (session running)"
    assert settled["dispute-blocks"] == "blocks 2-3" and settled["dispute-time"].endswith(" UTC")

    # the wallet: its withheld total, and an alert naming the quarantined node and why
    assert p.page.is_visible("#disputed-card") and p.text("#total-disputed") == far(exp["withheld"])
    assert p.page.is_visible("#quarantine-alert")
    alert = p.text("#quarantine-alert")
    assert "A node of this wallet is quarantined" in alert and "beta" in alert and exp["quarantine"] in alert
    # the withheld amount is not in the earnings (it is never paid)
    assert p.text("#total-earned") == far(stack.expected["earned"])
    p.page.locator(beta).screenshot(path=str(IMG_DIR / "dashboard-provider-checks.png"))
    p.assert_clean()


def test_provider_page_on_a_phone(open_page, stack):
    p = open_page(PHONE)
    p.open(f"/provider/{WALLET}")
    assert p.text("#refresh-period") == "every 30 s"  # the default
    assert p.text("#total-earned") == far(stack.expected["earned"])
    overflow = p.page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert overflow[0] <= overflow[1], f"horizontal overflow on a phone: {overflow}"
    assert p.page.is_visible("#earnings-chart")
    box = p.page.query_selector("#earnings-chart").bounding_box()
    assert box["width"] <= PHONE["width"] and box["height"] > 150
    # payments stack into cards: the header row is hidden, labels come from data-label
    assert not p.page.is_visible("#payments thead")
    p.screenshot("dashboard-provider-phone.png")
    p.assert_clean()


def test_swarm_page_shows_coverage_like_far_mesh_status(open_page, stack):
    import io

    from rich.console import Console

    from services.discovery.status import render

    p = open_page()
    p.open("/swarm")
    row = p.page.query_selector(f"#models tr[data-model-id='{MODEL_ID}']")
    assert row is not None and "not ready" in row.inner_text() and "2/4" in row.inner_text()
    row.query_selector("a").click()
    p.page.wait_for_url(f"{stack.url}/swarm/{MODEL_ID}")
    p.page.wait_for_selector("body[data-state='ok']")

    coverage = stack.api(f"/models/{MODEL_ID}/coverage")
    assert coverage["loaded_blocks"] == 2 and not coverage["swarm_ready"], coverage
    out = io.StringIO()
    render(coverage, Console(file=out, width=200, color_system=None))
    status_text = out.getvalue()
    assert p.text("#ready") == "NO" and "Swarm Ready: NO" in status_text
    assert p.text("#expected") == "4"
    assert p.text("#discovered") == f"{coverage['discovered_blocks']}/4" == "2/4"
    assert p.text("#loaded") == "2/4"
    summary = p.text("#summary-line")
    assert summary.startswith("Missing blocks: 2-3 | Loading blocks: none | DHT read")
    assert "Missing blocks: 2-3 | Loading blocks: none" in status_text
    assert p.text("#blocking-title") == "Blocking"
    reasons = [li.inner_text().strip() for li in p.page.query_selector_all("#blocking li")]
    assert reasons == coverage["blocking"]
    assert "blocks 2-3: no server announced" in reasons
    assert any('node "beta"' in r and "absent from the DHT" in r for r in reasons), reasons
    for reason in reasons:
        assert reason in status_text
    states = p.page.eval_on_selector_all("#block-map .block", "els => els.map(e => e.dataset.state)")
    assert states == ["loaded", "loaded", "missing", "missing"]
    blocks = p.page.query_selector_all("#blocks tbody tr")
    alpha_peer = stack.nodes["alpha"]["peer_id"]
    assert f"alpha ({alpha_peer[:4]}…{alpha_peer[-6:]})" in blocks[0].inner_text()
    assert f"alpha ({alpha_peer[:4]}…{alpha_peer[-6:]})" in status_text
    servers = {r.get_attribute("data-peer-id"): r.inner_text() for r in p.page.query_selector_all("#servers tbody tr")}
    assert "ONLINE: blocks 0-1" in servers[alpha_peer] and "yes, heartbeat" in servers[alpha_peer]
    assert "absent (not announced)" in servers[stack.nodes["beta"]["peer_id"]]
    assert "unregistered (offline)" in servers[stack.nodes["other"]["peer_id"]]
    p.screenshot("dashboard-swarm.png")
    p.assert_clean()

    unknown = open_page()
    unknown.open("/swarm/org/nope", wait_state="error")
    assert "unknown model 'org/nope'" in unknown.text("#banner")
    assert unknown.page.is_visible(f"#models tr[data-model-id='{MODEL_ID}']")


def test_unknown_and_malformed_wallets_are_explained(open_page, stack):
    p = open_page()
    p.open(f"/provider/{UNKNOWN_WALLET}")
    assert p.page.is_visible("#empty") and not p.page.is_visible("#content")
    assert "No node is registered with wallet" in p.text("#empty")
    assert p.text("#empty-wallet") == UNKNOWN_WALLET
    p.assert_clean()

    bad = open_page(PHONE)
    response = bad.open("/provider/0xnot-a-wallet", wait_state="invalid")
    assert response.status == 422
    assert bad.page.is_visible("#invalid")
    assert "is not a wallet address: a wallet is 0x followed by 40 hexadecimal digits" in bad.text("#invalid-text")
    assert not [u for u in bad.requests if "/provider/0xnot-a-wallet/" in u]  # nothing asked for it


def test_a_node_whose_heartbeats_stop_shows_offline_after_refresh(open_page, stack):
    p = open_page()
    p.open(f"/provider/{WALLET}?refresh=1")
    beta_id = stack.nodes["beta"]["node_id"]
    card = f"article.node[data-node-id='{beta_id}']"
    assert p.page.get_attribute(card, "data-status") == "online"
    stack.heartbeats.stop("beta")  # far-node died: no more heartbeats
    stopped = time.monotonic()
    p.page.wait_for_selector(f"{card}[data-status='offline']", timeout=int((TTL_S + 10) * 1000))
    assert time.monotonic() - stopped >= TTL_S - 1  # offline because its heartbeat lapsed, not before
    assert p.text(f"{card} [data-field='status']") == "Offline"
    assert p.text(f"{card} [data-field='state']").startswith("no heartbeat for ")
    assert p.text(f"{card} [data-field='uptime']") == "—"
    alpha = f"article.node[data-node-id='{stack.nodes['alpha']['node_id']}']"
    assert p.page.get_attribute(alpha, "data-status") == "online"
    p.wait_js("document.getElementById('total-nodes').textContent === '1 / 2'")
    assert "warn" in p.page.get_attribute("#total-nodes", "class") or \
        p.page.eval_on_selector("#total-nodes", "e => e.closest('.card').classList.contains('warn')")
    p.assert_clean()


def test_discovery_down_is_explained_and_the_last_data_stays(open_page, stack):
    p = open_page()
    p.open(f"/provider/{WALLET}?refresh=1")
    earned = p.text("#total-earned")
    assert p.page.is_hidden("#banner")
    stack.discovery.stop()  # discovery goes away under the open page
    p.page.wait_for_selector("body[data-state='unreachable']", timeout=15000)
    banner = p.text("#banner")
    assert "Cannot reach the discovery service" in banner and stack.url in banner
    assert "Showing the data of" in banner and "retrying every 1 s" in banner
    assert p.text("#total-earned") == earned  # the last good numbers stay on screen
    assert p.text("#updated").startswith("Last updated ")
