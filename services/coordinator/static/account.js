// Far Mesh user page (/account on the coordinator): sign in with an API key, then balance, how to deposit, usage,
// recent requests, deposits, statement and API keys, all from the self-service account API (/mesh/account/…).
// Money is shown as the API's exact decimal strings (FarDash.formatFar only groups digits); only the chart's bar
// heights are numbers. The key lives in this tab's sessionStorage only.
"use strict";

(() => {
  const D = FarDash;
  const { el } = D;
  const STORAGE_KEY = "farMesh.apiKey";
  const DAYS = 30;
  const EXPLORERS = { testnet: "https://testnet.bscscan.com/tx/", mainnet: "https://bscscan.com/tx/" };
  const STATUS_CLASS = { completed: "pay-confirmed", running: "pay-submitted" };

  // For tests and curious people: the chart instance and the last answers of the API.
  const state = { key: null, chart: null, refresher: null, account: null, usage: null, ledger: null, keys: null };
  window.farAccount = state;

  const $ = (id) => document.getElementById(id);

  // --- the key: this tab only ---------------------------------------------------------------------------------
  function storedKey() {
    try { return window.sessionStorage.getItem(STORAGE_KEY); } catch (_) { return null; }
  }

  function storeKey(key) {
    try { window.sessionStorage.setItem(STORAGE_KEY, key); } catch (_) { /* storage off: signed in until reload */ }
  }

  function forgetKey() {
    try { window.sessionStorage.removeItem(STORAGE_KEY); } catch (_) { /* nothing stored */ }
  }

  /** A call to the account API with the signed-in key. */
  function call(path, options = {}) {
    return D.api(path, { ...options, service: "coordinator", headers: { Authorization: `Bearer ${state.key}` } });
  }

  /** Plain words for an error of the account API (what happened, what to do). */
  function explain(error) {
    if (!(error instanceof D.ApiError)) return `Unexpected error in the page: ${error && error.message}`;
    if (error.kind === "network") {
      return `Cannot reach the coordinator at ${window.location.origin}: it may be down or restarting, or your ` +
             "connection dropped.";
    }
    if (error.kind === "timeout") return `The coordinator is too slow to answer (${error.message}).`;
    if (error.status === 429) return `Too many account requests with this key: ${error.message}.`;
    if (error.status === 503) return `The coordinator is up but cannot serve the account right now (${error.message}).`;
    return `The coordinator answered ${error.status}: ${error.message}`;
  }

  // --- signing in and out -----------------------------------------------------------------------------------
  function signinError(message) {
    const node = $("signin-error");
    node.hidden = !message;
    node.textContent = message || "";
    $("key-input").setAttribute("aria-invalid", message ? "true" : "false");
  }

  /** Back to the sign-in form (sign-out, a key refused during a refresh, the signed-in key revoked). */
  function showSignin(message = null) {
    if (state.refresher) state.refresher.stop();
    state.refresher = null;
    state.key = null;
    forgetKey();
    Object.assign(state, { account: null, usage: null, ledger: null, keys: null });
    clearAccount();
    $("account").hidden = true;
    $("signin").hidden = false;
    D.banner(null);
    signinError(message);
    document.title = "Sign in — Far Mesh account";
    document.body.dataset.state = "signed-out";
    const input = $("key-input");
    input.value = "";
    input.focus();
  }

  /** Nothing of the previous account stays in the page once signed out. */
  function clearAccount() {
    for (const id of ["requests", "deposits", "statement", "keys"]) $(id).tBodies[0].replaceChildren();
    for (const id of ["available", "balance", "reserved", "deposited", "charged", "account-id", "current-key",
                      "deposit-contract", "deposit-ref", "deposit-token"]) D.setText(id, "—");
    D.setText("account-name", "");
    D.setText("keys-message", "");
    hideNewKey();
    if (state.chart) {
      state.chart.destroy();
      state.chart = null;
    }
  }

  /** Checks the key with GET /mesh/account; shows the account, or returns why the key was not accepted. */
  async function signIn(key) {
    state.key = key;
    let account;
    try {
      account = await call("/mesh/account");
    } catch (error) {
      state.key = null;
      if (error.status === 401) {
        return `This key was not accepted: ${error.message}. Check that you pasted the whole key (it starts ` +
               "with fl_); a revoked key cannot be used again.";
      }
      return explain(error);
    }
    storeKey(key);
    showAccount(account);
    return null;
  }

  function showAccount(account) {
    $("signin").hidden = true;
    $("account").hidden = false;
    signinError(null);
    state.account = account;
    renderAccount(account);
    state.refresher = D.autoRefresh(load, { explain });
  }

  async function load() {
    let answers;
    try {
      answers = await Promise.all([
        call("/mesh/account"), call(`/mesh/account/usage?limit=20&days=${DAYS}`),
        call("/mesh/account/ledger?limit=200"), call("/mesh/account/keys"),
      ]);
    } catch (error) {
      if (error.status === 401) { // revoked (or the account is gone) since sign-in
        showSignin(`You were signed out: ${error.message}. Sign in with another key.`);
        return;
      }
      throw error;
    }
    const [account, usage, ledger, keys] = answers;
    Object.assign(state, { account, usage, ledger, keys });
    renderAccount(account);
    renderUsage(usage);
    renderRequests(usage.requests);
    renderLedger(ledger.entries, account.deposit);
    renderKeys(keys.keys);
  }

  // --- rendering ----------------------------------------------------------------------------------------------
  function renderAccount(account) {
    document.title = `${account.name || "Account"} — Far Mesh account`;
    D.setText("account-name", account.name ? `(${account.name})` : "");
    D.setText("account-id", account.account_id);
    D.setText("available", D.formatFar(account.available_far));
    D.setText("balance", D.formatFar(account.balance_far));
    D.setText("reserved", D.formatFar(account.reserved_far));
    D.setText("deposited", D.formatFar(account.deposited_far));
    D.setText("charged", D.formatFar(account.charged_far));
    const how = account.deposit;
    $("deposit-how").hidden = !how;
    $("deposit-off").hidden = !!how;
    if (!how) return;
    const network = how.chain_id ? `BNB Smart Chain ${how.network} (chain id ${how.chain_id})`
      : `the ${how.network} chain`;
    D.setText("deposit-network", network);
    D.setText("deposit-contract", how.contract);
    D.setText("deposit-ref", how.account_ref);
    D.setText("deposit-token", how.token);
    D.setText("deposit-confirmations", String(how.confirmations));
    D.setText("deposit-confirmations-dd", `${how.confirmations} block${how.confirmations === 1 ? "" : "s"} on top ` +
              "of the deposit's block");
    for (const node of document.querySelectorAll("[data-fill='contract']")) node.textContent = how.contract;
    for (const node of document.querySelectorAll("[data-fill='ref']")) node.textContent = how.account_ref;
  }

  /** The last DAYS UTC days, oldest first, as "YYYY-MM-DD". */
  function lastDays() {
    const now = new Date();
    const days = [];
    for (let back = DAYS - 1; back >= 0; back -= 1) {
      days.push(new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() - back))
        .toISOString().slice(0, 10));
    }
    return days;
  }

  function renderUsage(usage) {
    const byDay = Object.fromEntries(usage.daily.map((d) => [d.day, d]));
    const days = lastDays().map((day) => byDay[day] ||
      { day, requests: 0, prompt_tokens: 0, completion_tokens: 0, cost_far: "0" });
    const inWindow = days.filter((d) => d.requests > 0);
    const requests = inWindow.reduce((n, d) => n + d.requests, 0);
    const t = usage.totals;
    D.setText("usage-note", (requests
      ? `${D.formatInt(requests)} request${requests === 1 ? "" : "s"} in the last ${DAYS} days, on ${inWindow.length} ` +
        `day${inWindow.length === 1 ? "" : "s"}. `
      : `No request in the last ${DAYS} days. `) +
      `All time: ${D.formatInt(t.requests)} requests, ${D.formatInt(t.prompt_tokens)} prompt + ` +
      `${D.formatInt(t.completion_tokens)} completion tokens, ${D.formatFar(t.cost_far)} FAR.`);
    state.chart = D.farBarChart(state.chart, $("usage-chart"), {
      label: "FAR spent", days,
      labels: days.map((d) => d.day.slice(5)),
      values: days.map((d) => Number(d.cost_far)), // bar heights only; amounts are shown from the strings
      title: (d) => d.day,
      lines: (d) => [`${D.formatFar(d.cost_far)} FAR`, `${D.formatInt(d.requests)} request` +
                     `${d.requests === 1 ? "" : "s"}, ${D.formatInt(d.prompt_tokens)} + ` +
                     `${D.formatInt(d.completion_tokens)} tokens`],
    });
  }

  function shortHex(text, head = 10, tail = 6) {
    return text && text.length > head + tail + 1 ? `${text.slice(0, head)}…${text.slice(-tail)}` : text || "—";
  }

  function servedBy(nodes) {
    if (!nodes.length) return el("span", { class: "muted", text: "no server step recorded" });
    return el("ul", { class: "served-by" }, nodes.map((n) => el("li", { dataset: { peerId: n.peer_id } },
      el("span", { text: `blocks ${n.blocks}` }), " · ",
      el("code", { text: D.shortPeer(n.peer_id), title: n.peer_id }),
      n.wallet_address ? [" · ", el("code", { text: shortHex(n.wallet_address), title: n.wallet_address })] : null,
      " · ", el("span", { "data-field": "payment", text: `${D.formatFar(n.payment_far)} FAR` }))));
  }

  function renderRequests(requests) {
    $("requests-empty").hidden = requests.length > 0;
    $("requests").hidden = requests.length === 0;
    $("requests").tBodies[0].replaceChildren(...requests.map((r) => {
      const status = r.finish_reason && r.finish_reason !== r.status && r.status !== "running"
        ? `${r.status} (${r.finish_reason})` : r.status;
      const cost = r.cost_far === null ? `running, ${D.formatFar(r.reserved_far)} reserved` : D.formatFar(r.cost_far);
      // a request a spot check proved wrong: its charge is given back (docs/verification.md)
      const refund = r.refunded_far === null || r.refunded_far === undefined ? null
        : el("span", { class: "refund block", "data-field": "refund", title: r.refund_reason || "",
                       text: `refunded ${D.formatFar(r.refunded_far)}: a server's output was proven wrong` });
      return el("tr", { dataset: { requestId: r.request_id, status: r.status } },
        el("td", { "data-label": "Time", text: D.formatUtc(r.created_at, true) }),
        el("td", { "data-label": "Request" }, el("code", { text: r.request_id }),
          el("span", { class: "muted block", text: r.model_id })),
        el("td", { "data-label": "Status" },
          el("span", { class: `badge ${STATUS_CLASS[r.status] || "pay-failed"}`, text: status })),
        el("td", { "data-label": "Tokens", class: "num", "data-field": "tokens",
                   text: `${D.formatInt(r.prompt_tokens)} + ${D.formatInt(r.completion_tokens)}` }),
        el("td", { "data-label": "Cost (FAR)", class: "num", "data-field": "cost" }, cost, refund),
        el("td", { "data-label": "Served by", "data-field": "nodes" }, servedBy(r.nodes)));
    }));
  }

  function txCell(entry, network) {
    const short = shortHex(entry.tx_hash);
    const explorer = EXPLORERS[network];
    if (!explorer) {
      return el("span", {}, el("code", { text: short, title: entry.tx_hash }),
        el("span", { class: "muted", text: ` (${network || "local"} chain: no explorer)` }));
    }
    return el("a", { href: `${explorer}${entry.tx_hash}`, target: "_blank", rel: "noopener noreferrer", class: "tx",
                     title: entry.tx_hash }, el("code", { text: short }), " ↗");
  }

  function entryDetail(entry, network) {
    if (entry.kind === "charge") {
      return el("span", {}, "request ", el("code", { text: entry.request_id }),
        ` (${entry.status}): ${D.formatFar(entry.reserved_far)} reserved, ${D.formatFar(entry.refunded_far)} released`);
    }
    const after = entry.balance_after_far ? `; balance after: ${D.formatFar(entry.balance_after_far)} FAR` : "";
    if (entry.kind === "deposit" && entry.tx_hash) {
      return el("span", {}, "on chain, tx ", txCell(entry, network), after);
    }
    return el("span", { text: `${entry.note || entry.kind}${after}` });
  }

  function renderLedger(entries, deposit) {
    const network = deposit ? deposit.network : null;
    const deposits = entries.filter((e) => e.kind === "deposit");
    $("deposits-empty").hidden = deposits.length > 0;
    $("deposits").hidden = deposits.length === 0;
    $("deposits").tBodies[0].replaceChildren(...deposits.map((e) => el("tr", { dataset: { tx: e.tx_hash || "" } },
      el("td", { "data-label": "Credited", text: D.formatUtc(e.at, true) }),
      el("td", { "data-label": "Amount (FAR)", class: "num", "data-field": "amount", text: D.formatFar(e.amount_far) }),
      el("td", { "data-label": "Transaction", "data-field": "tx" }, e.tx_hash ? txCell(e, network) : "—"),
      el("td", { "data-label": "Block", class: "num", text: e.block_number === null ? "—" : String(e.block_number) }),
      el("td", { "data-label": "From" }, el("code", { text: shortHex(e.from_address), title: e.from_address || "" })))));
    $("statement").tBodies[0].replaceChildren(...entries.slice(0, 25).map((e) => el("tr", { dataset: { kind: e.kind } },
      el("td", { "data-label": "Time", text: D.formatUtc(e.at, true) }),
      el("td", { "data-label": "Kind" }, el("span", { class: `badge kind-${e.kind}`, text: e.kind })),
      el("td", { "data-label": "Amount (FAR)", class: "num", "data-field": "amount", text: D.formatFar(e.amount_far) }),
      el("td", { "data-label": "Detail" }, entryDetail(e, network)))));
  }

  function keyLabel(key) {
    return key.name ? `“${key.name}” (${key.prefix}…)` : `${key.prefix}…`;
  }

  function renderKeys(keys) {
    const current = keys.find((k) => k.current);
    D.setText("current-key", current ? keyLabel(current) : "—");
    $("keys").tBodies[0].replaceChildren(...keys.map((k) => {
      const status = k.revoked_at ? "revoked" : "active";
      const words = k.revoked_at ? `revoked ${D.formatUtc(k.revoked_at)}` : k.current ? "active · this key" : "active";
      return el("tr", { dataset: { keyId: k.key_id, status, current: k.current ? "1" : "" } },
        el("td", { "data-label": "Name", text: k.name || "—" }),
        el("td", { "data-label": "Key" }, el("code", { text: `${k.prefix}…` })),
        el("td", { "data-label": "Per minute", class: "num", text: D.formatInt(k.rate_limit_per_minute) }),
        el("td", { "data-label": "Created", text: D.formatUtc(k.created_at) }),
        el("td", { "data-label": "Status" },
          el("span", { class: `badge ${k.revoked_at ? "offline" : "online"}`, "data-field": "status", text: words })),
        el("td", { "data-label": "" }, k.revoked_at ? null
          : el("button", { type: "button", class: "danger small-button", "data-action": "revoke",
                           "aria-label": `Revoke key ${keyLabel(k)}` }, "Revoke")));
    }));
  }

  // --- keys: create (secret shown once), revoke (confirmed) ----------------------------------------------------
  function hideNewKey() {
    $("new-key").hidden = true;
    $("new-key-secret").value = "";
    D.setText("new-key-copied", "");
  }

  async function copy(text, input, note) {
    try {
      await navigator.clipboard.writeText(text);
      D.setText(note, "Copied to the clipboard.");
    } catch (_) {
      if (input) input.select();
      D.setText(note, "Your browser did not let the page copy: the text is selected, press Ctrl+C (⌘C) to copy.");
    }
  }

  async function reloadKeys() {
    const keys = await call("/mesh/account/keys");
    state.keys = keys;
    renderKeys(keys.keys);
  }

  async function createKey(event) {
    event.preventDefault();
    const errorNode = $("create-key-error");
    const show = (message) => { errorNode.hidden = !message; errorNode.textContent = message || ""; };
    const name = $("new-key-name-input").value.trim();
    const limitText = $("new-key-limit").value.trim();
    if (limitText && !/^[1-9][0-9]{0,8}$/.test(limitText)) {
      $("new-key-limit").setAttribute("aria-invalid", "true");
      show("Requests per minute is a whole number of at least 1 (or leave it empty for this key's limit).");
      $("new-key-limit").focus();
      return;
    }
    $("new-key-limit").setAttribute("aria-invalid", "false");
    show(null);
    const body = { name: name || null };
    if (limitText) body.rate_limit_per_minute = Number(limitText);
    const button = event.submitter || $("create-key-form").querySelector("button[type=submit]");
    button.disabled = true;
    let created;
    try {
      created = await call("/mesh/account/keys", { method: "POST", body });
    } catch (error) {
      if (error.status === 401) return showSignin(`You were signed out: ${error.message}. Sign in with another key.`);
      show(error.status === 409 ? `No new key: ${error.message}.` : explain(error));
      return;
    } finally {
      button.disabled = false;
    }
    $("create-key-form").reset();
    D.setText("new-key-name", created.name ? `“${created.name}”` : "");
    $("new-key").hidden = false;
    const secret = $("new-key-secret");
    secret.value = created.key;
    secret.focus();
    secret.select();
    D.setText("new-key-copied", "");
    D.setText("keys-message", `Key ${keyLabel(created)} created.`);
    await reloadKeys().catch(() => null);
  }

  function askRevoke(key) {
    const dialog = $("revoke-dialog");
    D.setText("revoke-text", `Key ${keyLabel(key)} will be refused at once, by every coordinator, for every request ` +
      "(generate and account). This cannot be undone." +
      (key.current ? " It is the key you are signed in with: you will be signed out." : ""));
    dialog.returnValue = "";
    dialog.onclose = () => {
      if (dialog.returnValue === "revoke") revoke(key);
    };
    dialog.showModal();
  }

  async function revoke(key) {
    try {
      await call(`/mesh/account/keys/${encodeURIComponent(key.key_id)}`, { method: "DELETE" });
    } catch (error) {
      if (error.status === 401) return showSignin(`You were signed out: ${error.message}. Sign in with another key.`);
      D.setText("keys-message", `Could not revoke key ${keyLabel(key)}: ${explain(error)}`);
      return;
    }
    if (key.current) {
      showSignin(`You revoked the key you were signed in with (${keyLabel(key)}); sign in with another key.`);
      return;
    }
    D.setText("keys-message", `Key ${keyLabel(key)} revoked: it is refused from now on.`);
    await reloadKeys().catch(() => null);
    $("keys-title").focus();
  }

  // --- wiring -------------------------------------------------------------------------------------------------
  $("keys-title").tabIndex = -1;
  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) {
      signinError("Paste your API key first (it starts with fl_).");
      $("key-input").focus();
      return;
    }
    const button = $("signin-form").querySelector("button[type=submit]");
    button.disabled = true;
    const problem = await signIn(key);
    button.disabled = false;
    if (problem) {
      signinError(problem);
      $("key-input").focus();
      $("key-input").select();
      document.body.dataset.state = "signed-out";
    }
  });
  $("sign-out").addEventListener("click", () => showSignin(null));
  $("create-key-form").addEventListener("submit", createKey);
  $("new-key-copy").addEventListener("click", () => copy($("new-key-secret").value, $("new-key-secret"),
                                                         "new-key-copied"));
  $("new-key-done").addEventListener("click", () => { hideNewKey(); $("create-key-form").querySelector("input").focus(); });
  $("keys").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action='revoke']");
    if (!button || !state.keys) return;
    const id = button.closest("tr").dataset.keyId;
    const key = state.keys.keys.find((k) => k.key_id === id);
    if (key) askRevoke(key);
  });
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", () => {
      const source = $(button.dataset.copy);
      copy(source.textContent, null, "deposit-copied");
    });
  }

  // A reload of the tab keeps the session (sessionStorage); a new tab starts signed out.
  const saved = storedKey();
  if (saved) signIn(saved).then((problem) => { if (problem) showSignin(problem); });
  else showSignin(null);
})();
