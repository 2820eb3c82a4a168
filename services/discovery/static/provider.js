// Far Mesh dashboard: a provider's page (/provider/<wallet>), filled from discovery's provider endpoints.
"use strict";

(() => {
  const D = FarDash;
  const { el } = D;

  /** Where a payout transaction can be looked at, by the batch's network (none for a local chain). */
  const EXPLORERS = {
    testnet: "https://testnet.bscscan.com/tx/",
    mainnet: "https://bscscan.com/tx/",
  };
  const STATE_WORDS = {
    planned: "planned", signed: "signed, not sent yet", submitted: "sent, waiting for confirmation",
    confirmed: "confirmed", failed: "failed (will be retried)",
  };

  const state = { chart: null, wallet: null };
  window.farDashboard = state; // for tests and curious people (chart instance, last data)

  const wallet = decodeURIComponent(window.location.pathname.split("/")[2] || "").trim();
  state.wallet = wallet;
  D.setText("wallet", wallet || "—");
  document.title = `${wallet.slice(0, 10)}… — Far Mesh provider`;

  if (!D.WALLET_RE.test(wallet)) {
    document.getElementById("invalid").hidden = false;
    D.setText("invalid-text", `“${wallet.slice(0, 80)}” is not a wallet address: a wallet is 0x followed by 40 ` +
      "hexadecimal digits (0-9, a-f), like the one you gave far-node with --wallet.");
    D.setText("updated", "Nothing to load");
    document.getElementById("refresh-now").disabled = true;
    document.body.dataset.state = "invalid";
    return;
  }

  async function load() {
    const base = `/provider/${wallet}`;
    const [stats, earnings, payments, nodes, checks] = await Promise.all([
      D.api(`${base}/stats`), D.api(`${base}/earnings`), D.api(`${base}/payments`), D.api(`${base}/nodes`),
      D.api(`${base}/checks`),
    ]);
    // Per node: DHT state and paid/pending (the wallet list has liveness, hardware and the ledger already).
    const details = await Promise.all(nodes.nodes.map((n) => D.api(`/nodes/${n.node_id}`).catch(() => null)));
    const merged = nodes.nodes.map((n, i) => ({ ...n, ...(details[i] || {}) }));
    Object.assign(state, { stats, earnings, payments, nodes: merged, checks });
    render(stats, earnings, payments.payments, merged, checks);
  }

  function render(stats, earnings, payments, nodes, checks) {
    const unknown = stats.nodes_total === 0 && stats.sessions === 0 && stats.tokens_served === 0 &&
      payments.length === 0;
    document.getElementById("empty").hidden = !unknown;
    document.getElementById("content").hidden = unknown;
    D.setText("empty-wallet", stats.wallet_address);
    document.body.dataset.empty = unknown ? "1" : "";
    if (unknown) return;
    remember(stats.wallet_address);
    renderTotals(stats);
    renderDisputes(checks);
    renderNodes(nodes, checks);
    renderChart(earnings);
    renderPayments(payments);
  }

  /** The entry page lists the wallets opened recently (this browser only). */
  function remember(address) {
    try {
      const key = "farMesh.recentWallets";
      const list = JSON.parse(window.localStorage.getItem(key) || "[]").filter((w) => w.toLowerCase() !== address);
      window.localStorage.setItem(key, JSON.stringify([address, ...list].slice(0, 5)));
    } catch (_) { /* storage off: fine */ }
  }

  function renderTotals(stats) {
    D.setText("total-tokens", D.formatInt(stats.tokens_served));
    D.setText("total-earned", D.formatFar(stats.earned_far));
    D.setText("total-paid", D.formatFar(stats.paid_far));
    D.setText("total-pending", D.formatFar(stats.pending_far));
    D.setText("total-nodes", `${stats.nodes_online} / ${stats.nodes_total}`);
    const nodesCard = document.getElementById("total-nodes").closest(".card");
    nodesCard.classList.toggle("warn", stats.nodes_total > 0 && stats.nodes_online < stats.nodes_total);
  }

  /** [status, badge text, plain-words detail] of a node. */
  function nodeStatus(node) {
    if (node.active) {
      if (node.reported_state === "joining") {
        return ["online", "Online", "loading its blocks (JOINING): it earns once they are loaded"];
      }
      const dht = node.dht_state;
      if (dht === "ONLINE") return ["online", "Online", "serving its blocks (ONLINE in the swarm)"];
      if (dht === "JOINING") return ["online", "Online", "announced in the swarm, still loading (JOINING)"];
      if (dht === "OFFLINE") return ["online", "Online", "heartbeats arrive but its server announced OFFLINE"];
      return ["online", "Online", "heartbeats arrive; not seen in the swarm (DHT) yet"];
    }
    if (node.state === "offline") {
      return ["offline", "Offline", "unregistered (stopped by its operator); it registers again when restarted"];
    }
    if (node.state === "unregistered") return ["offline", "Offline", "unregistered"];
    return ["offline", "Offline", `no heartbeat for ${D.formatDuration(node.seconds_since_heartbeat)}: ` +
      "is far-node running, and can it reach discovery?"];
  }

  function blocksText(node) {
    const last = node.end_block - 1;
    const span = node.start_block === last ? `block ${last}` : `blocks ${node.start_block}-${last}`;
    return `${span} (${node.end_block - node.start_block}) of ${node.model_id}`;
  }

  function vram(node) {
    const total = node.hardware && node.hardware.vram_total_gb;
    const used = node.vram_used_gb;
    const fmt = (v) => (Number.isInteger(Number(v)) ? String(Number(v)) : Number(v).toFixed(1));
    if (total === undefined || total === null || Number(total) === 0) {
      return used !== null && used !== undefined ? `${fmt(used)} GB used` : "—";
    }
    const text = `${used !== null && used !== undefined ? fmt(used) : "?"} / ${fmt(total)} GB`;
    const pct = used !== null && used !== undefined ? Math.min(100, Math.round((100 * used) / total)) : 0;
    const meter = el("span", { class: "meter", role: "presentation" }, el("span", { class: "meter-fill" }));
    meter.firstChild.style.width = `${pct}%`;
    return el("span", { class: "vram" }, el("span", { text }), meter);
  }

  /** "2:4" -> "blocks 2-3". */
  function spanText(blocks) {
    const [start, end] = String(blocks).split(":").map(Number);
    if (!Number.isInteger(start) || !Number.isInteger(end)) return `blocks ${blocks}`;
    return end - start === 1 ? `block ${start}` : `blocks ${start}-${end - 1}`;
  }

  function plural(count, word) {
    return `${count} ${word}${count === 1 ? "" : "s"}`;
  }

  /** The wallet's withheld total (a card, shown when there is any) and the page's quarantine alert. */
  function renderDisputes(checks) {
    const disputed = Number(checks.disputed_far) > 0 || checks.recent_disputes.length > 0;
    document.getElementById("disputed-card").hidden = !disputed;
    document.getElementById("disputed-card").classList.toggle("bad", disputed);
    D.setText("total-disputed", D.formatFar(checks.disputed_far));
    const quarantined = checks.nodes.filter((n) => n.quarantined);
    const alert = document.getElementById("quarantine-alert");
    alert.hidden = quarantined.length === 0;
    alert.replaceChildren(...(quarantined.length === 0 ? [] : [
      el("h2", { text: quarantined.length === 1 ? "A node of this wallet is quarantined"
                                               : `${quarantined.length} nodes of this wallet are quarantined` }),
      el("p", { text: "No coordinator routes work through a quarantined node, so it earns nothing until an " +
                      "operator lifts the quarantine. Check the node's hardware and software, then contact the " +
                      "mesh operator." }),
      el("ul", { class: "reasons" }, quarantined.map((n) => el("li", { dataset: { peerId: n.peer_id } },
        el("strong", { text: n.public_name || D.shortPeer(n.peer_id) }),
        ` since ${D.formatUtc(n.quarantined_at)}: ${n.quarantine_reason}`))),
    ]));
  }

  /** A node's "Checks" section: its record, what was withheld and why (its most recent disputes), and a
   *  quarantine banner with the reason. */
  function checksSection(check, disputes) {
    if (!check) return null;
    const record = `${check.checks_passed} passed, ${check.checks_failed} failed` +
      (check.checks_inconclusive ? `, ${check.checks_inconclusive} inconclusive` : "");
    const withheld = Number(check.disputed_far) > 0 || check.disputed_sessions > 0
      ? `${D.formatFar(check.disputed_far)} FAR withheld in ${plural(check.disputed_sessions, "session")}`
      : "none";
    const shown = disputes.slice(0, 5);
    return el("section", { class: `checks${check.quarantined ? " quarantined" : ""}`, "data-field": "checks" },
      el("h4", { text: "Checks" }),
      check.quarantined ? el("div", { class: "quarantine-banner", role: "alert", "data-field": "quarantine" },
        el("strong", { text: "Quarantined" }), ` since ${D.formatUtc(check.quarantined_at)}: no work is routed ` +
        "to this node until an operator lifts the quarantine.",
        el("span", { class: "reason", "data-field": "quarantine-reason", text: check.quarantine_reason })) : null,
      el("dl", {},
        el("dt", { text: "Spot checks" }), el("dd", { "data-field": "checks-record", text: record }),
        el("dt", { text: "Disputed" }), el("dd", { "data-field": "disputed", text: withheld })),
      shown.length === 0 ? null : el("ol", { class: "disputes", "data-field": "disputes" },
        shown.map((d) => el("li", { dataset: { sessionId: d.session_id } },
          el("div", { class: "dispute-head" },
            el("span", { "data-field": "dispute-time", text: D.formatUtc(d.disputed_at, true) }),
            el("span", {}, "session ", el("code", { text: `${d.session_id.slice(0, 8)}…`, title: d.session_id })),
            el("span", { "data-field": "dispute-blocks", text: spanText(d.blocks) }),
            el("span", { "data-field": "dispute-withheld",
                         text: Number(d.withheld_far) > 0 ? `${D.formatFar(d.withheld_far)} FAR withheld`
                                                          : "nothing withheld yet (session running)" })),
          el("p", { class: "reason", "data-field": "dispute-reason", text: d.reason || "—" })))),
      disputes.length > shown.length
        ? el("p", { class: "muted", text: `and ${disputes.length - shown.length} earlier disputes` }) : null);
  }

  function renderNodes(nodes, checks) {
    const byNode = Object.fromEntries(checks.nodes.map((c) => [c.node_id, c]));
    const box = document.getElementById("nodes");
    const note = document.getElementById("nodes-empty");
    note.hidden = nodes.length > 0;
    note.textContent = nodes.length ? "" : "No node is registered with this wallet now. The earnings and payments " +
      "below come from work its nodes did earlier.";
    box.replaceChildren(...nodes.map((node) => {
      const [status, badge, detail] = nodeStatus(node);
      const hw = node.hardware || {};
      const temp = node.gpu_temp_c === null || node.gpu_temp_c === undefined ? "—" : `${Math.round(node.gpu_temp_c)} °C`;
      const rows = [
        ["Uptime", node.active ? D.formatDuration(node.uptime_s) : "—", "uptime"],
        ["Last seen", `${D.formatAgo(node.seconds_since_heartbeat)} (${D.formatUtc(node.last_seen, true)})`, "last-seen"],
        ["Blocks", blocksText(node), "blocks"],
        ["State", detail, "state"],
        ["GPU", hw.gpu || hw.device || "—", "gpu"],
        ["VRAM", vram(node), "vram"],
        ["Temperature", temp, "temp"],
        ["Tokens served", D.formatInt(node.tokens_served), "tokens"],
        ["Earned", `${D.formatFar(node.earned_far)} FAR`, "earned"],
      ];
      if (node.pending_far !== undefined) rows.push(["Pending", `${D.formatFar(node.pending_far)} FAR`, "pending"]);
      const check = byNode[node.node_id];
      const disputes = checks.recent_disputes.filter((d) => d.peer_id === node.peer_id);
      const quarantined = Boolean(check && check.quarantined);
      return el("article", { class: `node ${status}${quarantined ? " quarantined" : ""}`,
                             dataset: { nodeId: node.node_id, status, quarantined: quarantined ? "1" : "" } },
        el("header", {},
          el("span", { class: "dot", "aria-hidden": "true" }),
          el("h3", { text: node.public_name || D.shortPeer(node.peer_id) }),
          quarantined ? el("span", { class: "badge quarantined", text: "Quarantined" }) : null,
          el("span", { class: `badge ${status}`, text: badge, "data-field": "status" })),
        el("dl", {}, rows.map(([label, value, field]) => [
          el("dt", { text: label }),
          el("dd", { "data-field": field }, value),
        ])),
        checksSection(check, disputes),
        el("p", { class: "peer muted" }, "peer ", el("code", { text: node.peer_id, title: node.peer_id })));
    }));
  }

  function renderChart(earnings) {
    const days = earnings.earnings;
    const labels = days.map((d) => d.date.slice(5));
    const values = days.map((d) => Number(d.earned_far));
    const active = days.filter((d) => Number(d.earned_far) > 0).length;
    D.setText("earnings-note", active
      ? `${D.formatFar(earnings.total_far)} FAR earned in the last ${earnings.days} days, on ${active} ` +
        `day${active === 1 ? "" : "s"}.`
      : `Nothing earned in the last ${earnings.days} days.`);
    state.chart = D.farBarChart(state.chart, document.getElementById("earnings-chart"), {
      label: "FAR earned", days, labels, values,
      title: (day) => day.date,
      lines: (day) => [`${D.formatFar(day.earned_far)} FAR`, `${D.formatInt(day.tokens_served)} tokens, ` +
                       `${day.sessions} session${day.sessions === 1 ? "" : "s"}`],
    });
  }

  function txCell(payment) {
    if (!payment.tx_hash) return el("span", { class: "muted", text: "not signed yet" });
    const short = `${payment.tx_hash.slice(0, 10)}…${payment.tx_hash.slice(-6)}`;
    const explorer = EXPLORERS[payment.network];
    if (!explorer) {
      return el("span", {}, el("code", { text: short, title: payment.tx_hash, class: "tx" }),
        el("span", { class: "muted", text: ` (${payment.network} chain: no explorer)` }));
    }
    return el("a", { href: `${explorer}${payment.tx_hash}`, target: "_blank", rel: "noopener noreferrer",
                     class: "tx", title: payment.tx_hash }, el("code", { text: short }), " ↗");
  }

  function renderPayments(payments) {
    document.getElementById("payments-empty").hidden = payments.length > 0;
    const table = document.getElementById("payments");
    table.hidden = payments.length === 0;
    table.tBodies[0].replaceChildren(...payments.map((p) => el("tr", { dataset: { batchId: p.batch_id, state: p.state } },
      el("td", { "data-label": "Date", text: D.formatUtc(p.date) }),
      el("td", { "data-label": "Amount (FAR)", class: "num", "data-field": "amount", text: D.formatFar(p.amount_far) }),
      el("td", { "data-label": "Transaction", "data-field": "tx" }, txCell(p)),
      el("td", { "data-label": "Status" }, el("span", { class: `badge pay-${p.state}`, text: STATE_WORDS[p.state] || p.state })),
      el("td", { "data-label": "Network", text: p.network }),
      el("td", { "data-label": "Batch", class: "num", text: `#${p.batch_number}` }))));
  }

  D.autoRefresh(load);
})();
