// Far Mesh dashboard: helpers shared by the pages (no framework, no build step; served by discovery).
"use strict";

const FarDash = (() => {
  const WALLET_RE = /^0x[0-9a-fA-F]{40}$/;
  const DEFAULT_REFRESH_S = 30;
  const FETCH_TIMEOUT_MS = 10000;

  /** Refresh period in seconds: 30 by default, `?refresh=N` (N >= 1) overrides it. */
  function refreshSeconds() {
    const raw = new URLSearchParams(window.location.search).get("refresh");
    const value = Number(raw);
    return raw !== null && Number.isFinite(value) && value >= 1 ? value : DEFAULT_REFRESH_S;
  }

  class ApiError extends Error {
    constructor(kind, message, { status = null, code = null, path = "" } = {}) {
      super(message);
      this.kind = kind; // "network" | "timeout" | "http"
      this.status = status;
      this.code = code;
      this.path = path;
    }
  }

  /**
   * Call a JSON endpoint of the service that served the page (same origin): GET by default; `method`, `headers` and a
   * JSON `body` for the user page's account calls. `service` names it in messages. Throws ApiError in plain words.
   */
  async function api(path, { method = "GET", headers = {}, body = undefined, service = "discovery" } = {}) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
    const init = { method, headers: { Accept: "application/json", ...headers }, cache: "no-store",
                   signal: controller.signal };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      if (error.name === "AbortError") {
        throw new ApiError("timeout", `${service} did not answer ${path} within ${FETCH_TIMEOUT_MS / 1000} s`, { path });
      }
      throw new ApiError("network", `cannot reach the ${service} service at ${window.location.origin}`, { path });
    } finally {
      clearTimeout(timer);
    }
    let answer = null;
    try {
      answer = await response.json();
    } catch (_) {
      answer = null;
    }
    if (!response.ok) {
      const err = answer && answer.error ? answer.error : {};
      throw new ApiError("http", err.message || `${service} answered ${response.status} for ${path}`,
                         { status: response.status, code: err.code || null, path });
    }
    if (answer === null) {
      throw new ApiError("http", `${service} answered ${path} with something that is not JSON`, { path });
    }
    return answer;
  }

  /** Plain words for an ApiError (what happened and what to do). */
  function explain(error) {
    if (!(error instanceof ApiError)) return `Unexpected error in the page: ${error && error.message}`;
    if (error.kind === "network") {
      return `Cannot reach the discovery service at ${window.location.origin}: it may be down or restarting, ` +
             "or your connection dropped.";
    }
    if (error.kind === "timeout") return `The discovery service is too slow to answer (${error.message}).`;
    if (error.status === 503) {
      return `The discovery service is up but cannot read its database right now (${error.message}).`;
    }
    return `The discovery service answered ${error.status}: ${error.message}`;
  }

  // --- formatting -----------------------------------------------------------------------------------------
  const intFmt = new Intl.NumberFormat("en-US");

  function formatInt(value) {
    if (value === null || value === undefined) return "—";
    return intFmt.format(Number(value));
  }

  /** A FAR decimal string shown exactly (no float rounding), integer part grouped: "12345.678" -> "12,345.678". */
  function formatFar(value) {
    if (value === null || value === undefined || value === "") return "—";
    const text = String(value);
    const negative = text.startsWith("-");
    const [whole, frac] = (negative ? text.slice(1) : text).split(".");
    const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    return (negative ? "-" : "") + grouped + (frac ? `.${frac}` : "");
  }

  function formatDuration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(Number(seconds))) return "—";
    let s = Math.max(0, Math.round(Number(seconds)));
    if (s < 60) return `${s} s`;
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d > 0) return `${d} d ${h} h`;
    if (h > 0) return `${h} h ${String(m).padStart(2, "0")} min`;
    return `${m} min ${String(s).padStart(2, "0")} s`;
  }

  function formatAgo(seconds) {
    if (seconds === null || seconds === undefined) return "never";
    return seconds < 1.5 ? "just now" : `${formatDuration(seconds)} ago`;
  }

  /** "2026-11-22T10:00:00+00:00" -> "2026-11-22 10:00 UTC". */
  function formatUtc(iso, withSeconds = false) {
    if (!iso) return "—";
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    const text = date.toISOString().replace("T", " ");
    return `${text.slice(0, withSeconds ? 19 : 16)} UTC`;
  }

  function formatClock(date) {
    return date.toISOString().slice(11, 19) + " UTC";
  }

  /** [0,1,2,5,7,8] -> "0-2, 5, 7-8" (as far-mesh status prints block ranges). */
  function formatRanges(blocks) {
    if (!blocks || blocks.length === 0) return "none";
    const sorted = [...blocks].sort((a, b) => a - b);
    const parts = [];
    let start = sorted[0];
    let prev = sorted[0];
    for (const b of sorted.slice(1).concat([null])) {
      if (b !== null && b === prev + 1) { prev = b; continue; }
      parts.push(start === prev ? `${start}` : `${start}-${prev}`);
      start = b; prev = b;
    }
    return parts.join(", ");
  }

  function shortPeer(peerId) {
    return peerId && peerId.length > 12 ? `${peerId.slice(0, 4)}…${peerId.slice(-6)}` : peerId || "—";
  }

  /** What far-mesh status prints for a peer: `name (Qm12…abcdef)`. */
  function peerLabel(peerId, names) {
    const name = names && names[peerId];
    return name ? `${name} (${shortPeer(peerId)})` : shortPeer(peerId);
  }

  // --- DOM ------------------------------------------------------------------------------------------------
  /** el("div", {class: "x", text: "hi"}, child, ...) */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setText(id, value) {
    const node = document.getElementById(id);
    if (node) node.textContent = value;
  }

  /** The error banner: shown with a message, hidden with null. */
  function banner(message, detail) {
    const node = document.getElementById("banner");
    if (!node) return;
    if (!message) {
      node.hidden = true;
      node.replaceChildren();
      return;
    }
    node.hidden = false;
    node.replaceChildren(el("strong", { text: message }), detail ? el("span", { text: ` ${detail}` }) : null);
  }

  /**
   * Run `load` now and every refreshSeconds(); never two at once. Shows "Updated …" and, when a refresh fails, an
   * explained banner (keeping the last good data on screen; `explain` words the error, default: discovery's).
   * Returns {refresh, stop} ("Refresh now" button; stop() ends the timer, e.g. on sign-out).
   */
  function autoRefresh(load, { explain: words = explain } = {}) {
    const period = refreshSeconds();
    let running = false;
    let timer = null;
    let lastGood = null;
    let stopped = false;
    setText("refresh-period", period === DEFAULT_REFRESH_S ? "every 30 s" : `every ${period} s`);

    async function refresh() {
      if (running || stopped) return;
      running = true;
      clearTimeout(timer);
      document.body.dataset.loading = "1";
      try {
        await load();
        if (stopped) return; // signed out (the user page) while loading: nothing to show
        lastGood = new Date();
        banner(null);
        setText("updated", `Updated ${formatClock(lastGood)}`);
        document.body.dataset.state = "ok";
      } catch (error) {
        if (stopped) return;
        console.warn("dashboard refresh failed:", error);
        const since = lastGood ? `Showing the data of ${formatClock(lastGood)}; ` : "";
        banner(words(error), `${since}retrying every ${period} s.`);
        setText("updated", lastGood ? `Last updated ${formatClock(lastGood)}` : "Not loaded");
        document.body.dataset.state = error.kind === "network" || error.kind === "timeout" ? "unreachable" : "error";
      } finally {
        running = false;
        delete document.body.dataset.loading;
        document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
        if (!stopped) timer = setTimeout(refresh, period * 1000);
      }
    }

    function stop() {
      stopped = true;
      clearTimeout(timer);
    }

    const button = document.getElementById("refresh-now");
    if (button) button.addEventListener("click", () => refresh());
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible" && lastGood && Date.now() - lastGood.getTime() > period * 1000) {
        refresh();
      }
    });
    refresh();
    return { refresh, stop, period };
  }

  /**
   * One bar per day of FAR amounts (a provider's earnings, a user's spending). Creates the chart on `canvas`, or
   * updates `chart` in place (no animation) when there is one; returns it. `values` are the bar heights only:
   * amounts shown to people come from the API's decimal strings, through `title(day)` and `lines(day)`.
   */
  function farBarChart(chart, canvas, { label, days, labels, values, title, lines }) {
    if (typeof Chart === "undefined") {
      throw new ApiError("http", "the chart library did not load (/dashboard/static/vendor/chart.umd.min.js)");
    }
    if (chart) {
      chart.data.labels = labels;
      chart.data.datasets[0].data = values;
      chart.$days = days;
      chart.update("none");
      return chart;
    }
    const created = new Chart(canvas, {
      type: "bar",
      data: {
        labels,
        datasets: [{ label, data: values, backgroundColor: "#0f766e", hoverBackgroundColor: "#115e59",
                     borderRadius: 3, maxBarThickness: 28, minBarLength: 0 }],
      },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        plugins: {
          legend: { display: false },
          tooltip: {
            callbacks: {
              title: (items) => title(created.$days[items[0].dataIndex]),
              label: (item) => lines(created.$days[item.dataIndex]),
            },
          },
        },
        scales: {
          x: { grid: { display: false }, ticks: { maxRotation: 0, autoSkipPadding: 8 } },
          y: { beginAtZero: true, title: { display: true, text: "FAR" }, ticks: { maxTicksLimit: 6 } },
        },
      },
    });
    created.$days = days;
    return created;
  }

  return {
    WALLET_RE, DEFAULT_REFRESH_S, ApiError, api, explain, refreshSeconds, autoRefresh, banner, el, setText,
    formatInt, formatFar, formatDuration, formatAgo, formatUtc, formatClock, formatRanges, shortPeer, peerLabel,
    farBarChart,
  };
})();
