// Far Mesh dashboard: the entry page (/dashboard): enter or paste a wallet.
"use strict";

(() => {
  const D = FarDash;
  const RECENT_KEY = "farMesh.recentWallets";
  const form = document.getElementById("wallet-form");
  const input = document.getElementById("wallet-input");
  const error = document.getElementById("wallet-error");

  function recent() {
    try {
      const list = JSON.parse(window.localStorage.getItem(RECENT_KEY) || "[]");
      return Array.isArray(list) ? list.filter((w) => D.WALLET_RE.test(w)).slice(0, 5) : [];
    } catch (_) {
      return [];
    }
  }

  function remember(wallet) {
    try {
      const list = [wallet, ...recent().filter((w) => w.toLowerCase() !== wallet.toLowerCase())].slice(0, 5);
      window.localStorage.setItem(RECENT_KEY, JSON.stringify(list));
    } catch (_) { /* private mode: fine */ }
  }

  function problem(value) {
    if (!value) return "Enter a wallet address.";
    if (!value.startsWith("0x")) return "A wallet address starts with 0x.";
    if (!/^0x[0-9a-fA-F]*$/.test(value)) return "A wallet address has only hexadecimal digits (0-9, a-f) after 0x.";
    if (value.length !== 42) {
      return `A wallet address is 0x followed by 40 hexadecimal digits; this one has ${value.length - 2}.`;
    }
    return null;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = input.value.trim().replace(/\s+/g, "");
    const message = problem(value);
    error.hidden = !message;
    error.textContent = message || "";
    input.setAttribute("aria-invalid", message ? "true" : "false");
    if (message) return;
    remember(value);
    window.location.assign(`/provider/${value}`);
  });
  input.addEventListener("input", () => { error.hidden = true; input.removeAttribute("aria-invalid"); });

  const wallets = recent();
  if (wallets.length) {
    document.getElementById("recent").hidden = false;
    document.getElementById("recent-list").replaceChildren(...wallets.map((w) =>
      D.el("li", {}, D.el("a", { href: `/provider/${w}` }, D.el("code", { text: w })))));
  }

  D.api("/models").then((body) => {
    const names = body.models.map((m) => `${m.model_id} (${m.num_blocks} blocks)`).join(", ");
    D.setText("discovery-health", `Discovery is up. Models: ${names || "none configured"}.`);
  }).catch((err) => {
    const node = document.getElementById("discovery-health");
    node.className = "banner";
    node.textContent = D.explain(err);
  });
})();
