// Far Mesh dashboard: the swarm pages (/swarm and /swarm/<model_id>): block coverage, ready flag, blocking reasons.
// The same facts as `far-mesh status`, from GET /models/<id>/coverage and GET /models/<id>/nodes.
"use strict";

(() => {
  const D = FarDash;
  const { el } = D;
  const state = {};
  window.farDashboard = state;

  const prefix = "/swarm/";
  const path = window.location.pathname;
  const modelId = path.startsWith(prefix) ? decodeURIComponent(path.slice(prefix.length)).replace(/\/+$/, "") : "";
  state.modelId = modelId;

  // --- /swarm: the models ---------------------------------------------------------------------------------
  async function loadIndex() {
    const models = (await D.api("/models")).models;
    const coverages = await Promise.all(models.map((m) => D.api(`/models/${m.model_id}/coverage`).catch(() => null)));
    state.models = models;
    renderModels(models, coverages);
  }

  function renderModels(models, coverages) {
    document.getElementById("models-panel").hidden = false;
    document.getElementById("models-empty").hidden = models.length > 0;
    document.querySelector("#models tbody").replaceChildren(...models.map((m, i) => {
      const c = coverages[i];
      const ready = c ? (c.swarm_ready ? "yes" : "no") : "?";
      return el("tr", { dataset: { modelId: m.model_id } },
        el("td", { "data-label": "Model" }, el("a", { href: `/swarm/${m.model_id}`, text: m.model_id })),
        el("td", { "data-label": "Blocks", class: "num", text: String(m.num_blocks) }),
        el("td", { "data-label": "Discovered", class: "num", text: c ? `${c.discovered_blocks}/${c.expected_blocks}` : "?" }),
        el("td", { "data-label": "Loaded", class: "num", text: c ? `${c.loaded_blocks}/${c.expected_blocks}` : "?" }),
        el("td", { "data-label": "Ready" }, el("span", { class: `badge ${ready === "yes" ? "online" : "offline"}`,
                                                          text: ready === "yes" ? "ready" : ready === "no" ? "not ready" : "unknown" })));
    }));
  }

  // --- /swarm/<model>: one model --------------------------------------------------------------------------
  async function loadModel() {
    let coverage;
    let nodes;
    try {
      [coverage, nodes] = await Promise.all([D.api(`/models/${modelId}/coverage`), D.api(`/models/${modelId}/nodes`)]);
    } catch (error) {
      if (error.status === 404) {
        document.getElementById("model-view").hidden = true;
        D.setText("subtitle", `Discovery does not know the model “${modelId}”. Pick one below.`);
        try { await loadIndex(); } catch (_) { /* the banner below says enough */ }
      }
      throw error;
    }
    Object.assign(state, { coverage, nodes });
    renderModel(coverage, nodes.nodes);
  }

  function renderModel(c, registered) {
    document.getElementById("model-view").hidden = false;
    document.title = `${c.model_id} — Far Mesh swarm`;
    D.setText("title", c.model_id);
    D.setText("subtitle", "Which blocks the swarm can serve, who serves them, and what is holding inference up.");
    const ready = c.swarm_ready;
    D.setText("ready", ready ? "YES" : "NO");
    const card = document.getElementById("ready-card");
    card.classList.toggle("good", ready);
    card.classList.toggle("bad", !ready);
    card.dataset.ready = ready ? "yes" : "no";
    D.setText("expected", String(c.expected_blocks));
    D.setText("discovered", `${c.discovered_blocks}/${c.expected_blocks}`);
    D.setText("loaded", `${c.loaded_blocks}/${c.expected_blocks}`);
    const age = c.observed_age_s === null || c.observed_age_s === undefined ? "DHT not read"
      : `DHT read ${Math.round(c.observed_age_s)} s ago`;
    D.setText("summary-line", `Missing blocks: ${D.formatRanges(c.missing_blocks)} | Loading blocks: ` +
      `${D.formatRanges(c.loading_blocks)} | ${age}`);

    // Blocking reasons (or notes when ready), exactly as discovery words them.
    const reasons = c.blocking || [];
    D.setText("blocking-title", ready ? (reasons.length ? "Notes (inference works; these cost their operators money)" : "Nothing is blocking inference") : "Blocking");
    const panel = document.getElementById("blocking-panel");
    panel.classList.toggle("bad", !ready);
    document.getElementById("blocking").replaceChildren(...reasons.map((r) => el("li", { text: r })));

    const names = { ...(c.peer_names || {}) };
    for (const n of registered) if (n.public_name) names[n.peer_id] = names[n.peer_id] || n.public_name;
    renderBlockMap(c, names);
    renderServers(c, registered, names);
    renderBlocks(c, names);
  }

  function blockState(block) {
    if (block.loaded.length) return "loaded";
    if (block.discovered.length) return "loading";
    return "missing";
  }

  function renderBlockMap(c, names) {
    document.getElementById("block-map").replaceChildren(...c.blocks.map((b) => {
      const s = blockState(b);
      const who = b.loaded.length ? b.loaded : b.discovered;
      const title = `block ${b.block}: ${s}${who.length ? ` — ${who.map((p) => D.peerLabel(p, names)).join(", ")}` : ""}`;
      return el("div", { class: `block ${s}`, role: "listitem", title, dataset: { block: String(b.block), state: s } },
        el("span", { class: "block-num", text: String(b.block) }),
        el("span", { class: "block-count", text: b.loaded.length ? `${b.loaded.length}` : b.discovered.length ? `${b.discovered.length}…` : "" }));
    }));
  }

  // Discovery's dial of the server, as far-node status words it: direct, through a relay, or not at all.
  function reachability(reach) {
    if (!reach || reach.reachable === null || reach.reachable === undefined) return "";
    const text = reach.reachable === false ? "UNREACHABLE: clients cannot open sessions with it"
      : reach.via_relay ? `reachable: via relay ${D.shortPeer(reach.via_relay)}` : "reachable: direct";
    return el("div", { class: reach.reachable === false ? "tag warn" : "muted", text,
      title: reach.via_relay || (reach.addresses || []).join(", "),
      dataset: { reach: reach.reachable === false ? "no" : reach.via_relay ? "relay" : "direct" } });
  }

  function renderServers(c, registered, names) {
    const peers = new Map(); // peer_id -> {loaded: Set, joining: Set, node}
    const entry = (p) => {
      if (!peers.has(p)) peers.set(p, { loaded: new Set(), joining: new Set(), node: null });
      return peers.get(p);
    };
    for (const b of c.blocks) {
      for (const p of b.loaded) entry(p).loaded.add(b.block);
      for (const p of b.discovered) if (!b.loaded.includes(p)) entry(p).joining.add(b.block);
    }
    for (const n of registered) entry(n.peer_id).node = n;
    document.getElementById("servers-empty").hidden = peers.size > 0;
    document.getElementById("servers").hidden = peers.size === 0;
    const rows = [...peers.entries()].sort((a, b) => {
      const first = (e) => Math.min(...e[1].loaded, ...e[1].joining, e[1].node ? e[1].node.start_block : Infinity);
      return first(a) - first(b);
    });
    document.querySelector("#servers tbody").replaceChildren(...rows.map(([peer, e]) => {
      const n = e.node;
      const dht = [];
      if (e.loaded.size) dht.push(`ONLINE: blocks ${D.formatRanges([...e.loaded])}`);
      if (e.joining.size) dht.push(`JOINING: blocks ${D.formatRanges([...e.joining])}`);
      let reg;
      let regClass;
      if (!n) { reg = "no — it earns nothing"; regClass = "warn"; }
      else if (n.state !== "online") { reg = `unregistered (${n.state})`; regClass = "warn"; }
      else if (n.active) { reg = `yes, heartbeat ${D.formatAgo(n.seconds_since_heartbeat)}`; regClass = "good"; }
      else { reg = `yes, but no heartbeat for ${D.formatDuration(n.seconds_since_heartbeat)}`; regClass = "warn"; }
      const span = n ? `${n.start_block}:${n.end_block}` : D.formatRanges([...e.loaded, ...e.joining]);
      const lane = el("div", { class: "lane", "aria-hidden": "true" }, c.blocks.map((b) => {
        const cls = e.loaded.has(b.block) ? "loaded" : e.joining.has(b.block) ? "loading"
          : n && b.block >= n.start_block && b.block < n.end_block ? "registered" : "";
        return el("span", { class: cls });
      }));
      lane.style.gridTemplateColumns = `repeat(${c.blocks.length}, 1fr)`;
      return el("tr", { dataset: { peerId: peer } },
        el("td", { "data-label": "Server" }, el("strong", { text: names[peer] || "(no name)" }), " ",
          el("code", { class: "muted", text: D.shortPeer(peer), title: peer })),
        el("td", { "data-label": "Blocks", text: span }),
        el("td", { "data-label": "In the swarm (DHT)" }, dht.join("; ") || "absent (not announced)",
          reachability(n && n.reachability)),
        el("td", { "data-label": "Registered" }, el("span", { class: `tag ${regClass}`, text: reg })),
        el("td", { "data-label": "Span", class: "lanes" }, lane));
    }));
  }

  function renderBlocks(c, names) {
    document.querySelector("#blocks tbody").replaceChildren(...c.blocks.map((b) => {
      const s = blockState(b);
      const joining = b.discovered.filter((p) => !b.loaded.includes(p));
      return el("tr", { dataset: { block: String(b.block), state: s } },
        el("td", { class: "num", text: String(b.block) }),
        el("td", {}, el("span", { class: `tag ${s}`, text: s })),
        el("td", { text: b.loaded.map((p) => D.peerLabel(p, names)).join(", ") || "-" }),
        el("td", { text: joining.map((p) => D.peerLabel(p, names)).join(", ") || "-" }));
    }));
  }

  D.autoRefresh(modelId ? loadModel : loadIndex);
})();
