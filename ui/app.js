// qit console: a small single-page app over qit's public HTTP API (nothing it does is
// impossible with curl). No framework and no build step: plain DOM, uPlot for charts.
// With `--auth` the token from /auth/login lives in sessionStorage and goes only in the
// Authorization header, never in a URL.
"use strict";

(function () {
  const POLL_MS = 2000;
  const HISTORY = 300; // points kept per series: 10 minutes at 2 s
  const PAGE = 25; // messages per page of the browser
  const TOKEN_KEY = "qit-token";

  // ---------- tiny helpers ----------

  /** Creates an element: h("td", {class: "num"}, "12"). Text goes in as text, never HTML. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "class") el.className = v;
      else if (k === "dataset") Object.assign(el.dataset, v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  const $ = (sel, root) => (root || document).querySelector(sel);
  const fmt = new Intl.NumberFormat();
  const num = (n) => (n === undefined || n === null ? "–" : fmt.format(n));
  const rate = (n) => (n === undefined || n === null ? "–" : n < 10 ? n.toFixed(1) : fmt.format(Math.round(n)));
  function bytes(n) {
    if (n === undefined || n === null) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }
  function age(ms) {
    if (ms === undefined || ms === null) return "–";
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }
  const time = (ms) => new Date(ms).toLocaleString();
  const enc = encodeURIComponent;

  function toast(text, bad) {
    const t = h("div", { class: "toast" + (bad ? " bad" : ""), role: "status" }, text);
    $("#toasts").append(t);
    setTimeout(() => t.remove(), bad ? 7000 : 3500);
  }

  // ---------- API ----------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  const session = {
    get token() { return sessionStorage.getItem(TOKEN_KEY); },
    set token(v) { if (v) sessionStorage.setItem(TOKEN_KEY, v); else sessionStorage.removeItem(TOKEN_KEY); },
    authOn: false,
  };

  /** Calls the API; resolves to parsed JSON (or null for 204), rejects with ApiError. */
  async function api(method, path, opts) {
    opts = opts || {};
    const headers = Object.assign({}, opts.headers || {});
    if (session.token) headers["Authorization"] = "Bearer " + session.token;
    let body = opts.raw;
    if (opts.json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(opts.json);
    }
    let res;
    try {
      res = await fetch(path, { method, headers, body, cache: "no-store" });
    } catch (e) {
      throw new ApiError(0, "network", "the server cannot be reached");
    }
    if (res.status === 204) return null;
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
    if (!res.ok) {
      const err = (data && data.error) || {};
      if (res.status === 401 && path !== "/auth/login") onUnauthenticated();
      throw new ApiError(res.status, err.code || "http_" + res.status, err.message || res.statusText);
    }
    return data;
  }

  function onUnauthenticated() {
    session.authOn = true;
    session.token = null;
    if (!location.hash.startsWith("#/login")) {
      sessionStorage.setItem("qit-after-login", location.hash || "#/");
      location.hash = "#/login";
    }
  }

  function failed(e) {
    if (e && e.status === 401) return;
    toast((e && e.message) || String(e), true);
  }

  /** The user name in a JWT (its `sub`), for display only: the server checks the token. */
  function tokenUser(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(part)).sub || null;
    } catch (e) {
      return null;
    }
  }

  function renderUser() {
    const user = session.token ? tokenUser(session.token) : null;
    $("#user").hidden = !user;
    $("#user").textContent = user ? "Signed in as " + user : "";
    $("#logout").hidden = !session.token;
  }

  // ---------- polling and history (kept in the page) ----------

  let timer = null;
  let view = null; // { refresh(): Promise, destroy?() }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(tick, POLL_MS);
  }
  async function tick() {
    if (view && view.refresh && !document.hidden) {
      try {
        await view.refresh();
        $("#live").classList.remove("stale");
      } catch (e) {
        $("#live").classList.add("stale");
        if (e.status !== 401) console.warn(e);
      }
    }
    schedule();
  }

  /** Per-queue samples: published total, done total (all groups), backlog; rates by delta. */
  const history = {
    t: [], publish: [], done: [], backlog: [], inflight: [],
    last: new Map(), // queue -> {t, published, done}
    rates: new Map(), // queue -> {publish, done}
  };

  function published(q) {
    return q.partitions.reduce((s, p) => s + p.next_offset, 0);
  }
  function done(q) {
    // Messages every group has finished (acked or dead-lettered): published - backlog, per group.
    const pub = published(q);
    return q.groups.reduce((s, g) => s + Math.max(0, pub - g.backlog), 0);
  }

  function sample(queues) {
    const now = Date.now() / 1000;
    let pubRate = 0, doneRate = 0, backlog = 0, inflight = 0;
    const seen = new Set();
    for (const q of queues) {
      seen.add(q.name);
      const cur = { t: now, published: published(q), done: done(q) };
      const prev = history.last.get(q.name);
      if (prev && cur.t > prev.t) {
        const dt = cur.t - prev.t;
        const r = {
          publish: Math.max(0, (cur.published - prev.published) / dt),
          done: Math.max(0, (cur.done - prev.done) / dt),
        };
        history.rates.set(q.name, r);
        pubRate += r.publish;
        doneRate += r.done;
      }
      history.last.set(q.name, cur);
      for (const g of q.groups) { backlog += g.backlog; inflight += g.in_flight; }
    }
    for (const name of [...history.last.keys()]) if (!seen.has(name)) { history.last.delete(name); history.rates.delete(name); }
    history.t.push(now);
    history.publish.push(pubRate);
    history.done.push(doneRate);
    history.backlog.push(backlog);
    history.inflight.push(inflight);
    for (const k of ["t", "publish", "done", "backlog", "inflight"]) {
      if (history[k].length > HISTORY) history[k].shift();
    }
  }

  // ---------- charts ----------

  function css(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function makeChart(el, title, series) {
    const width = Math.max(300, el.clientWidth - 8);
    const axis = { stroke: css("--muted"), grid: { stroke: css("--line"), width: 1 }, ticks: { stroke: css("--line") } };
    const opts = {
      title, width, height: 200,
      cursor: { drag: { x: false, y: false } },
      // At least the last two minutes, so that a fresh page does not span years.
      scales: { x: { time: true, range: (u, min, max) => {
        const now = Date.now() / 1000;
        const hi = max == null ? now : max;
        return [Math.min(min == null ? hi : min, hi - 120), hi];
      } } },
      axes: [axis, Object.assign({ size: 56 }, axis)],
      series: [{}].concat(series.map((s) => ({ label: s.label, stroke: s.color, width: 2, fill: s.color + "22", points: { show: false } }))),
    };
    const chart = new uPlot(opts, [[]].concat(series.map(() => [])), el);
    return chart;
  }

  // ---------- views ----------

  const app = () => $("#app");

  function setNav(which) {
    for (const a of document.querySelectorAll("#nav a[data-nav]")) a.classList.toggle("active", a.dataset.nav === which);
  }

  function mount(v) {
    if (view && view.destroy) view.destroy();
    view = v;
    if (v.refresh) v.refresh().catch(failed);
  }

  // ----- login -----

  function loginView() {
    setNav(null);
    const error = h("div", { class: "error-text", "data-test": "login-error" });
    const user = h("input", { name: "username", autocomplete: "username", required: true, "data-test": "login-user" });
    const pass = h("input", { name: "password", type: "password", autocomplete: "current-password", required: true, "data-test": "login-password" });
    const form = h("form", { class: "form stack", "data-test": "login-form" },
      h("label", {}, "User", user),
      h("label", {}, "Password", pass),
      error,
      h("button", { type: "submit", "data-test": "login-submit" }, "Sign in"));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      error.textContent = "";
      try {
        const res = await api("POST", "/auth/login", { json: { username: user.value, password: pass.value } });
        session.token = res.token;
        renderUser();
        location.hash = sessionStorage.getItem("qit-after-login") || "#/";
      } catch (e) {
        error.textContent = e.status === 401 ? "Wrong user name or password." : e.message;
      }
    });
    app().replaceChildren(h("div", { class: "panel login" },
      h("h1", {}, "Sign in"),
      h("p", {}, "This qit server has authentication on."),
      form));
    user.focus();
    mount({});
  }

  // ----- overview -----

  function overviewView() {
    setNav("overview");
    const state = { sort: sessionStorage.getItem("qit-sort") || "name", asc: sessionStorage.getItem("qit-asc") !== "0", filter: "", hideDlq: false, queues: [] };
    const cards = h("div", { class: "cards" });
    const chartRates = h("div", { class: "chart" });
    const chartBacklog = h("div", { class: "chart" });
    const tbody = h("tbody", { "data-test": "queue-rows" });
    const count = h("span", { class: "muted" });
    const filter = h("input", { type: "search", placeholder: "Filter queues…", "data-test": "queue-filter", "aria-label": "Filter queues" });
    const onFilter = () => { state.filter = filter.value.trim().toLowerCase(); renderRows(); };
    filter.addEventListener("input", onFilter);
    filter.addEventListener("change", onFilter);
    const hide = h("input", { type: "checkbox" });
    hide.addEventListener("change", () => { state.hideDlq = hide.checked; renderRows(); });

    const columns = [
      ["name", "Queue", (q) => q.name, false],
      ["partitions", "Partitions", (q) => q.partitions.length, true],
      ["backlog", "Backlog", (q) => sum(q.groups, "backlog"), true],
      ["in_flight", "In flight", (q) => sum(q.groups, "in_flight"), true],
      ["dead", "Dead-lettered", (q) => sum(q.groups, "dead_lettered"), true],
      ["publish", "Publish/s", (q) => (history.rates.get(q.name) || {}).publish || 0, true],
      ["done", "Ack/s", (q) => (history.rates.get(q.name) || {}).done || 0, true],
      ["bytes", "Bytes", (q) => sum(q.partitions, "bytes"), true],
    ];
    const head = h("tr", {}, columns.map(([key, label, , isNum]) => {
      const th = h("th", { class: "sortable" + (isNum ? " num" : ""), "data-sort": key, title: key === "done" ? "Messages finished per second (acked or dead-lettered), all groups" : null }, label);
      th.addEventListener("click", () => {
        if (state.sort === key) state.asc = !state.asc; else { state.sort = key; state.asc = key === "name"; }
        sessionStorage.setItem("qit-sort", state.sort);
        sessionStorage.setItem("qit-asc", state.asc ? "1" : "0");
        renderRows();
      });
      return th;
    }));

    const createName = h("input", { placeholder: "new-queue", "data-test": "create-queue-name", "aria-label": "Queue name", pattern: "[A-Za-z0-9_\\-][A-Za-z0-9._\\-]{0,199}", required: true });
    const createParts = h("input", { type: "number", min: 1, max: 256, value: 1, style: "width:80px", "aria-label": "Partitions" });
    const createMax = h("input", { type: "number", min: 0, value: 5, style: "width:90px", "aria-label": "Max deliveries" });
    const createForm = h("form", { class: "form" },
      h("label", { class: "grow" }, "Name", createName),
      h("label", {}, "Partitions", createParts),
      h("label", {}, "Max deliveries", createMax),
      h("button", { type: "submit", "data-test": "create-queue" }, "Create queue"));
    createForm.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const name = createName.value.trim();
      try {
        await api("POST", "/queues/" + enc(name), { json: { partitions: Number(createParts.value), max_deliveries: Number(createMax.value) } });
        toast("Queue " + name + " created");
        createName.value = "";
        await v.refresh();
      } catch (e) { failed(e); }
    });

    app().replaceChildren(
      h("div", { class: "page-head" }, h("h1", {}, "Queues"), count, h("div", { class: "spacer" })),
      cards,
      h("div", { class: "charts" },
        h("div", { class: "panel" }, chartRates),
        h("div", { class: "panel" }, chartBacklog)),
      h("div", { class: "panel" },
        h("div", { class: "toolbar" }, filter, h("label", { class: "check" }, hide, "Hide dead-letter queues"), h("div", { style: "flex:1" })),
        h("div", { class: "table-wrap" }, h("table", { "data-test": "queue-table" }, h("thead", {}, head), tbody))),
      h("div", { class: "panel" }, h("h2", {}, "New queue"), createForm));

    const rates = makeChart(chartRates, "Messages per second", [
      { label: "published", color: "#4f46e5" }, { label: "acked", color: "#12805c" }]);
    const backlogChart = makeChart(chartBacklog, "Backlog and in flight", [
      { label: "backlog", color: "#b54708" }, { label: "in flight", color: "#0ea5e9" }]);
    const onResize = () => {
      rates.setSize({ width: Math.max(300, chartRates.clientWidth - 8), height: 200 });
      backlogChart.setSize({ width: Math.max(300, chartBacklog.clientWidth - 8), height: 200 });
    };
    window.addEventListener("resize", onResize);

    function sum(list, key) { return list.reduce((s, x) => s + (x[key] || 0), 0); }

    function renderCards() {
      const qs = state.queues;
      const last = (arr) => (arr.length ? arr[arr.length - 1] : 0);
      const dead = qs.reduce((s, q) => s + sum(q.groups, "dead_lettered"), 0);
      const items = [
        ["Queues", num(qs.length)],
        ["Backlog", num(last(history.backlog))],
        ["In flight", num(last(history.inflight))],
        ["Dead-lettered", num(dead), dead > 0],
        ["Publish/s", rate(last(history.publish))],
        ["Ack/s", rate(last(history.done))],
        ["Stored", bytes(qs.reduce((s, q) => s + sum(q.partitions, "bytes"), 0))],
      ];
      cards.replaceChildren(...items.map(([label, value, bad]) =>
        h("div", { class: "card" + (bad ? " bad" : "") }, h("div", { class: "label" }, label), h("div", { class: "value" }, value))));
    }

    function renderRows() {
      for (const th of head.children) {
        th.classList.toggle("sorted", th.dataset.sort === state.sort);
        th.classList.toggle("asc", th.dataset.sort === state.sort && state.asc);
      }
      const col = columns.find((c) => c[0] === state.sort) || columns[0];
      let rows = state.queues.filter((q) => (!state.filter || q.name.toLowerCase().includes(state.filter)) && !(state.hideDlq && q.name.endsWith(".dlq")));
      rows.sort((a, b) => {
        const x = col[2](a), y = col[2](b);
        const c = typeof x === "string" ? x.localeCompare(y) : x - y;
        return state.asc ? c : -c;
      });
      const shown = rows.slice(0, 500);
      count.textContent = rows.length === state.queues.length ? num(rows.length) + " queues" : num(rows.length) + " of " + num(state.queues.length) + " queues";
      if (!shown.length) {
        tbody.replaceChildren(h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, state.queues.length ? "No queue matches the filter." : "No queues yet: create one below, or publish with curl.")));
        return;
      }
      tbody.replaceChildren(...shown.map((q) => {
        const dead = sum(q.groups, "dead_lettered");
        return h("tr", { "data-queue": q.name },
          h("td", { class: "name" }, h("a", { href: "#/queues/" + enc(q.name) }, q.name)),
          h("td", { class: "num" }, q.partitions.length),
          h("td", { class: "num" }, num(sum(q.groups, "backlog"))),
          h("td", { class: "num" }, num(sum(q.groups, "in_flight"))),
          h("td", { class: "num" }, dead ? h("span", { class: "pill bad" }, num(dead)) : "0"),
          h("td", { class: "num" }, rate((history.rates.get(q.name) || {}).publish)),
          h("td", { class: "num" }, rate((history.rates.get(q.name) || {}).done)),
          h("td", { class: "num" }, bytes(sum(q.partitions, "bytes"))));
      }));
      if (rows.length > shown.length) tbody.append(h("tr", {}, h("td", { colspan: columns.length, class: "muted" }, "Showing 500 of " + num(rows.length) + ": narrow the filter.")));
    }

    const v = {
      async refresh() {
        const res = await api("GET", "/queues");
        state.queues = res.queues;
        sample(res.queues);
        renderCards();
        renderRows();
        rates.setData([history.t, history.publish, history.done]);
        backlogChart.setData([history.t, history.backlog, history.inflight]);
      },
      destroy() { window.removeEventListener("resize", onResize); rates.destroy(); backlogChart.destroy(); },
    };
    renderCards();
    mount(v);
  }

  // ----- message rendering -----

  function hex(b64) {
    const raw = atob(b64);
    const lines = [];
    for (let i = 0; i < raw.length; i += 16) {
      const chunk = raw.slice(i, i + 16);
      const hx = [...chunk].map((c) => c.charCodeAt(0).toString(16).padStart(2, "0")).join(" ");
      const text = [...chunk].map((c) => { const n = c.charCodeAt(0); return n >= 32 && n < 127 ? c : "."; }).join("");
      lines.push(i.toString(16).padStart(8, "0") + "  " + hx.padEnd(48) + "  " + text);
    }
    return lines.join("\n");
  }

  function bodyView(m) {
    if (m.body_base64 !== undefined) {
      const mode = h("select", { "aria-label": "Binary view" }, h("option", { value: "hex" }, "hex"), h("option", { value: "b64" }, "base64"));
      const pre = h("pre", { "data-test": "msg-body" }, hex(m.body_base64));
      mode.addEventListener("change", () => { pre.textContent = mode.value === "hex" ? hex(m.body_base64) : m.body_base64; });
      return [h("div", { class: "toolbar" }, h("span", { class: "pill" }, "binary, " + atob(m.body_base64).length + " bytes"), mode), pre];
    }
    const isText = typeof m.body === "string";
    return [h("pre", { "data-test": "msg-body" }, isText ? m.body : JSON.stringify(m.body, null, 2))];
  }

  function preview(m) {
    if (m.body_base64 !== undefined) return "binary " + m.body_base64.slice(0, 60);
    return typeof m.body === "string" ? m.body : JSON.stringify(m.body);
  }

  function messageRow(m) {
    const heads = Object.entries(m.headers || {});
    const row = h("div", { class: "msg", "data-test": "message", "data-id": m.id },
      h("div", { class: "msg-head" },
        h("code", {}, m.id),
        h("span", { class: "muted" }, time(m.timestamp)),
        m.key ? h("span", { class: "pill accent" }, "key " + m.key) : null,
        h("span", { class: "preview" }, preview(m))),
      h("div", { class: "msg-body" },
        h("dl", { class: "kv" },
          h("dt", {}, "id"), h("dd", {}, m.id),
          h("dt", {}, "time"), h("dd", {}, new Date(m.timestamp).toISOString()),
          h("dt", {}, "key"), h("dd", {}, m.key === undefined ? "–" : m.key),
          h("dt", {}, "content type"), h("dd", {}, m.content_type || "–"),
          h("dt", {}, "delivery count"), h("dd", {}, m.delivery_count),
          h("dt", {}, "headers"), h("dd", {}, heads.length ? heads.map(([k, v]) => k + ": " + v).join("\n") : "–")),
        bodyView(m)));
    row.firstChild.addEventListener("click", () => row.classList.toggle("open"));
    return row;
  }

  /** A newest-first browser over `GET /queues/{q}/log` of one partition. */
  function browser(queue, info, testName) {
    const part = h("select", { "aria-label": "Partition" }, info.partitions.map((p) => h("option", { value: p.partition }, "partition " + p.partition)));
    const list = h("div", { "data-test": testName || "messages" });
    const older = h("button", { class: "ghost" }, "Older");
    const newer = h("button", { class: "ghost" }, "Newest");
    const status = h("span", { class: "muted" });
    let end = null; // exclusive upper offset of the page shown; null = the newest

    async function load() {
      const pinfo = (await api("GET", "/queues/" + enc(queue))).partitions.find((p) => p.partition === Number(part.value));
      if (!pinfo) return;
      const top = end === null ? pinfo.next_offset : Math.min(end, pinfo.next_offset);
      const from = Math.max(pinfo.first_offset, top - PAGE);
      if (top <= from) {
        list.replaceChildren(h("div", { class: "empty" }, "No messages in this partition."));
        status.textContent = "";
        older.disabled = true;
        return;
      }
      const res = await api("GET", "/queues/" + enc(queue) + "/log?partition=" + part.value + "&from=" + from + "&max=" + (top - from));
      const msgs = res.messages.filter((m) => m.offset < top).reverse();
      list.replaceChildren(...msgs.map(messageRow));
      status.textContent = "offsets " + from + "–" + (top - 1) + " of " + pinfo.first_offset + "–" + (pinfo.next_offset - 1);
      older.disabled = from <= pinfo.first_offset;
      older.onclick = () => { end = from; load().catch(failed); };
    }
    newer.addEventListener("click", () => { end = null; load().catch(failed); });
    part.addEventListener("change", () => { end = null; load().catch(failed); });
    const el = h("div", {}, h("div", { class: "toolbar" }, part, newer, older, status), list);
    return { el, load, atNewest: () => end === null };
  }

  // ----- queue page -----

  async function queueView(name) {
    setNav("overview");
    const qpath = "/queues/" + enc(name);
    let info, perms;
    try {
      [info, perms] = await Promise.all([api("GET", qpath), api("GET", qpath + "/permissions")]);
    } catch (e) {
      app().replaceChildren(h("div", { class: "panel empty" }, e.status === 404 ? "No queue named " + name + "." : e.message));
      mount({});
      return;
    }
    const dlqName = info.settings.dead_letter || name + ".dlq";
    const cards = h("div", { class: "cards" });
    const tabs = h("div", { class: "tabs", role: "tablist" });
    const body = h("div", {});
    const panes = {};
    let current = sessionStorage.getItem("qit-tab") || "messages";

    const actions = h("div", { class: "page-head" },
      h("div", {}, h("div", { class: "crumbs" }, h("a", { href: "#/" }, "Queues"), " / "), h("h1", { "data-test": "queue-title" }, name)),
      h("div", { class: "spacer" }),
      perms.manage ? h("button", { class: "danger", onclick: deleteQueue, "data-test": "delete-queue" }, "Delete queue") : null);

    async function deleteQueue() {
      if (!confirm("Delete queue " + name + " and all its messages?")) return;
      try {
        await api("DELETE", qpath);
        toast("Queue " + name + " deleted");
        location.hash = "#/";
      } catch (e) { failed(e); }
    }

    function sum(list, key) { return list.reduce((s, x) => s + (x[key] || 0), 0); }
    function renderCards(q, dlq) {
      const items = [
        ["Backlog", num(sum(q.groups, "backlog"))],
        ["In flight", num(sum(q.groups, "in_flight"))],
        ["Dead-lettered", num(sum(q.groups, "dead_lettered"))],
        ["In DLQ", dlq ? num(sum(dlq.groups.filter((g) => g.name === "default"), "backlog")) : "–"],
        ["Messages", num(q.partitions.reduce((s, p) => s + p.next_offset - p.first_offset, 0))],
        ["Stored", bytes(sum(q.partitions, "bytes"))],
      ];
      cards.replaceChildren(...items.map(([label, value]) => h("div", { class: "card" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value))));
    }

    const defs = [
      ["messages", "Messages", perms.consume],
      ["publish", "Publish", perms.publish],
      ["groups", "Groups", true],
      ["partitions", "Partitions", true],
      ["settings", "Settings", true],
      ["dlq", "Dead letters", perms.consume],
    ].filter((d) => d[2]);
    if (!defs.some((d) => d[0] === current)) current = defs[0][0];
    for (const [key, label] of defs) {
      tabs.append(h("button", { role: "tab", "data-tab": key, onclick: () => show(key) }, label));
    }
    function show(key) {
      if (key === current && body.firstChild) return;
      current = key;
      sessionStorage.setItem("qit-tab", key);
      for (const b of tabs.children) b.classList.toggle("active", b.dataset.tab === key);
      if (!panes[key]) panes[key] = builders[key]();
      body.replaceChildren(panes[key].el);
      if (panes[key].load) panes[key].load().catch(failed);
    }

    const builders = {
      messages: () => browser(name, info, "messages"),
      publish: () => publishPane(name, info),
      groups: () => groupsPane(name, info, perms),
      partitions: () => partitionsPane(),
      settings: () => settingsPane(),
      dlq: () => dlqPane(),
    };

    function partitionsPane() {
      const tbody = h("tbody");
      const el = h("div", { class: "panel table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, ["Partition", "First offset", "Next offset", "Messages", "Segments", "Bytes"].map((t, i) => h("th", { class: i ? "num" : "" }, t)))), tbody));
      return {
        el,
        async load() {
          tbody.replaceChildren(...info.partitions.map((p) => h("tr", {},
            h("td", {}, p.partition), h("td", { class: "num" }, num(p.first_offset)), h("td", { class: "num" }, num(p.next_offset)),
            h("td", { class: "num" }, num(p.next_offset - p.first_offset)), h("td", { class: "num" }, p.segments), h("td", { class: "num" }, bytes(p.bytes)))));
        },
      };
    }

    function settingsPane() {
      const s = info.settings;
      const rows = [
        ["partitions", s.partitions], ["ack_timeout", s.ack_timeout + " s"], ["max_deliveries", s.max_deliveries || "unlimited"],
        ["dead_letter", dlqName], ["backoff", s.backoff.length ? s.backoff.join(", ") + " s" : "none (at once)"],
        ["retention", JSON.stringify(s.retention)], ["compaction", s.compaction ? "on" : "off"],
        ["max_in_flight", num(s.max_in_flight)], ["ordering", s.ordering], ["dedup_window", s.dedup_window + " s"],
        ["max_message_bytes", bytes(s.max_message_bytes)], ["segment_bytes", bytes(s.segment_bytes)],
      ];
      return { el: h("div", { class: "panel" }, h("dl", { class: "kv", "data-test": "settings" }, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]))) };
    }

    function dlqPane() {
      const holder = h("div", {});
      const max = h("input", { type: "number", min: 1, placeholder: "all", style: "width:100px", "aria-label": "Most messages to redrive" });
      const canRedrive = perms.publish && perms.consume;
      const redrive = h("button", { "data-test": "redrive" }, "Redrive to " + name);
      redrive.addEventListener("click", async () => {
        try {
          const req = max.value ? { json: { max: Number(max.value) } } : {};
          const res = await api("POST", qpath + "/redrive", req);
          toast("Moved " + res.moved + " message" + (res.moved === 1 ? "" : "s") + " back to " + name);
          await pane.load();
        } catch (e) { failed(e); }
      });
      const pane = {
        el: h("div", {},
          h("div", { class: "panel" },
            h("h2", {}, "Dead-letter queue ", h("a", { href: "#/queues/" + enc(dlqName) }, dlqName)),
            h("p", { class: "muted" }, "Messages that reached max_deliveries. Redrive re-publishes them into " + name + " (headers kept, delivery count restarts) and acks them in the DLQ."),
            canRedrive ? h("div", { class: "form" }, h("label", {}, "Most messages", max), redrive) : h("p", { class: "muted" }, "You may not redrive this queue.")),
          h("div", { class: "panel" }, holder)),
        async load() {
          let dinfo;
          try { dinfo = await api("GET", "/queues/" + enc(dlqName)); } catch (e) {
            holder.replaceChildren(h("div", { class: "empty" }, e.status === 404 ? "The dead-letter queue does not exist." : e.message));
            return;
          }
          const b = browser(dlqName, dinfo, "dlq-messages");
          holder.replaceChildren(b.el);
          await b.load();
        },
      };
      return pane;
    }

    app().replaceChildren(actions, cards, tabs, body);
    show(current);

    mount({
      async refresh() {
        const q = await api("GET", qpath);
        let dlq = null;
        try { dlq = await api("GET", "/queues/" + enc(dlqName)); } catch (e) { if (e.status !== 404) throw e; }
        info = q;
        renderCards(q, dlq);
        const pane = panes[current];
        // Live panes refresh themselves; the message browser only while showing the newest page.
        if (pane && pane.live) await pane.load();
        if (current === "partitions" && pane) await pane.load();
      },
    });
  }

  function publishPane(queue) {
    const body = h("textarea", { "data-test": "publish-body", spellcheck: "false" }, '{\n  "to": "user@example.com",\n  "subject": "Hello!"\n}');
    const type = h("select", { "data-test": "publish-type", "aria-label": "Content type" },
      ["application/json", "text/plain", "application/octet-stream (base64 below)"].map((t) => h("option", { value: t }, t)));
    const key = h("input", { placeholder: "optional", "aria-label": "Key" });
    const headers = h("textarea", { placeholder: "name: value (one a line)", style: "min-height:60px", "aria-label": "Headers" });
    const result = h("div", { class: "muted", "data-test": "publish-result" });
    const form = h("form", { class: "form stack" },
      h("div", { class: "form" }, h("label", {}, "Content type", type), h("label", { class: "grow" }, "Key", key)),
      h("label", {}, "Body", body),
      h("label", {}, "Headers", headers),
      h("div", { class: "form" }, h("button", { type: "submit", "data-test": "publish" }, "Publish"), result));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const hdrs = {};
      for (const line of headers.value.split("\n")) {
        const i = line.indexOf(":");
        if (i > 0) hdrs["Qit-Header-" + line.slice(0, i).trim()] = line.slice(i + 1).trim();
      }
      let raw = body.value;
      let ctype = type.value;
      if (ctype.startsWith("application/octet-stream")) {
        ctype = "application/octet-stream";
        try { raw = Uint8Array.from(atob(body.value.trim()), (c) => c.charCodeAt(0)); } catch (e) { toast("The body is not base64", true); return; }
      } else if (ctype === "application/json") {
        try { JSON.parse(raw); } catch (e) { toast("The body is not valid JSON: " + e.message, true); return; }
      }
      hdrs["Content-Type"] = ctype;
      const q = key.value ? "?key=" + enc(key.value) : "";
      try {
        const res = await api("POST", "/queues/" + enc(queue) + "/messages" + q, { raw, headers: hdrs });
        result.textContent = "Published " + res.id;
        toast("Published " + res.id);
      } catch (e) { failed(e); }
    });
    return { el: h("div", { class: "panel" }, form) };
  }

  function groupsPane(queue, info, perms) {
    const tbody = h("tbody", { "data-test": "groups" });
    const qpath = "/queues/" + enc(queue);
    const seekGroup = h("input", { value: "default", "aria-label": "Group" });
    const seekTo = h("select", { "aria-label": "Seek to", "data-test": "seek-to" },
      h("option", { value: "earliest" }, "earliest"), h("option", { value: "latest" }, "latest"),
      h("option", { value: "offset" }, "offset"), h("option", { value: "time" }, "time"));
    const seekPart = h("input", { type: "number", min: 0, value: 0, style: "width:80px", "aria-label": "Partition" });
    const seekOffset = h("input", { type: "number", min: 0, value: 0, style: "width:110px", "aria-label": "Offset" });
    const seekTime = h("input", { type: "datetime-local", "aria-label": "Time" });
    const seekForm = h("form", { class: "form" },
      h("label", {}, "Group", seekGroup), h("label", {}, "To", seekTo),
      h("label", {}, "Partition", seekPart), h("label", {}, "Offset", seekOffset), h("label", {}, "Time", seekTime),
      h("button", { type: "submit", "data-test": "seek" }, "Seek"));
    const sync = () => {
      seekPart.parentElement.hidden = seekOffset.parentElement.hidden = seekTo.value !== "offset";
      seekTime.parentElement.hidden = seekTo.value !== "time";
    };
    seekTo.addEventListener("change", sync);
    sync();
    seekForm.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      let json;
      if (seekTo.value === "offset") json = { partition: Number(seekPart.value), offset: Number(seekOffset.value) };
      else if (seekTo.value === "time") json = { from_time: new Date(seekTime.value).getTime() };
      else json = { to: seekTo.value };
      try {
        await api("PUT", qpath + "/groups/" + enc(seekGroup.value) + "/offset", { json });
        toast("Group " + seekGroup.value + " moved");
        await pane.load();
      } catch (e) { failed(e); }
    });

    async function deleteGroup(group) {
      if (!confirm("Delete group " + group + " of " + queue + "? Its committed offsets go; a new group of that name starts at the earliest message.")) return;
      try {
        await api("DELETE", qpath + "/groups/" + enc(group));
        toast("Group " + group + " deleted");
        await pane.load();
      } catch (e) { failed(e); }
    }

    async function oldestAge(g) {
      // The oldest unfinished message of a group is the one at its ack floor.
      let oldest = null;
      for (const p of g.partitions) {
        if (p.backlog === 0) continue;
        const res = await api("GET", qpath + "/log?partition=" + p.partition + "&from=" + p.committed_offset + "&max=1");
        const m = res.messages[0];
        if (m && (oldest === null || m.timestamp < oldest)) oldest = m.timestamp;
      }
      return oldest === null ? null : Date.now() - oldest;
    }

    const pane = {
      live: true,
      el: h("div", {},
        h("div", { class: "panel table-wrap" }, h("table", {},
          h("thead", {}, h("tr", {}, ["Group", "Committed offsets", "Backlog", "In flight", "Redelivered", "Dead-lettered", "Oldest unacked", ""].map((t, i) => h("th", { class: i > 1 ? "num" : "" }, t)))),
          tbody)),
        perms.consume ? h("div", { class: "panel" }, h("h2", {}, "Seek a group"), seekForm) : null),
      async load() {
        const q = await api("GET", qpath);
        const groups = await Promise.all(q.groups.map((g) => api("GET", qpath + "/groups/" + enc(g.name))));
        const ages = perms.consume ? await Promise.all(groups.map(oldestAge)) : groups.map(() => null);
        tbody.replaceChildren(...groups.map((g, i) => h("tr", {},
          h("td", {}, g.name),
          h("td", { class: "mono" }, g.partitions.map((p) => p.partition + ": " + p.committed_offset).join("  ")),
          h("td", { class: "num" }, num(g.backlog)), h("td", { class: "num" }, num(g.in_flight)),
          h("td", { class: "num" }, num(g.redelivered)), h("td", { class: "num" }, num(g.dead_lettered)),
          h("td", { class: "num" }, ages[i] === null ? "–" : age(ages[i])),
          h("td", { class: "num" }, perms.consume
            ? h("button", { class: "danger", title: g.in_flight ? "Has messages in flight" : "", onclick: () => deleteGroup(g.name), "data-test": "delete-group", "data-group": g.name }, "Delete")
            : null))));
      },
    };
    return pane;
  }

  // ----- exchanges -----

  function exchangesView() {
    setNav("exchanges");
    const list = h("div", { "data-test": "exchanges" });
    const xname = h("input", { placeholder: "events", "aria-label": "Exchange name", required: true, "data-test": "create-exchange-name" });
    const xtype = h("select", { "aria-label": "Type" }, ["direct", "fanout", "topic", "headers"].map((t) => h("option", { value: t }, t)));
    const create = h("form", { class: "form" }, h("label", { class: "grow" }, "Name", xname), h("label", {}, "Type", xtype), h("button", { type: "submit", "data-test": "create-exchange" }, "Create exchange"));
    create.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        await api("POST", "/exchanges/" + enc(xname.value.trim()), { json: { type: xtype.value } });
        toast("Exchange " + xname.value + " created");
        xname.value = "";
        await v.refresh();
      } catch (e) { failed(e); }
    });
    app().replaceChildren(
      h("div", { class: "page-head" }, h("h1", {}, "Exchanges")),
      list,
      h("div", { class: "panel" }, h("h2", {}, "New exchange"), create));

    let lastKey = "";
    const v = {
      async refresh(force) {
        const res = await api("GET", "/exchanges");
        const key = JSON.stringify(res.exchanges);
        if (key === lastKey && !force) return; // keep forms the user is typing in
        lastKey = key;
        const perms = await Promise.all(res.exchanges.map((x) => api("GET", "/exchanges/" + enc(x.name) + "/permissions").catch(() => ({ manage: false }))));
        if (!res.exchanges.length) {
          list.replaceChildren(h("div", { class: "panel empty" }, "No exchanges yet."));
          return;
        }
        list.replaceChildren(...res.exchanges.map((x, i) => exchangePanel(x, perms[i], () => v.refresh(true))));
      },
    };
    mount(v);
  }

  function exchangePanel(x, perms, reload) {
    const xpath = "/exchanges/" + enc(x.name);
    const rows = x.bindings.map((b) => h("tr", {},
      h("td", {}, h("a", { href: "#/queues/" + enc(b.queue) }, b.queue)),
      h("td", { class: "mono" }, b.key === undefined ? "–" : b.key),
      h("td", { class: "mono" }, b.headers ? Object.entries(b.headers).map(([k, v]) => k + "=" + v).join(", ") + " (" + (b.match || "all") + ")" : "–"),
      h("td", {}, perms.manage ? h("button", { class: "danger small", onclick: () => unbind(b) }, "Unbind") : null)));
    async function unbind(b) {
      try { await api("DELETE", xpath + "/bindings", { json: b }); toast("Unbound " + b.queue); reload(); } catch (e) { failed(e); }
    }
    const bq = h("input", { placeholder: "queue", "aria-label": "Queue", required: true });
    const bk = h("input", { placeholder: x.type === "topic" ? "orders.*" : "key", "aria-label": "Binding key" });
    const bh = h("input", { placeholder: "k=v,k2=v2", "aria-label": "Headers" });
    const bm = h("select", { "aria-label": "Match" }, h("option", { value: "all" }, "all"), h("option", { value: "any" }, "any"));
    const bind = h("form", { class: "form" },
      h("label", {}, "Queue", bq),
      x.type === "headers" ? [h("label", {}, "Headers", bh), h("label", {}, "Match", bm)] : x.type === "fanout" ? null : h("label", {}, "Key", bk),
      h("button", { type: "submit" }, "Bind"));
    bind.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const b = { queue: bq.value.trim() };
      if (bk.value && x.type !== "headers") b.key = bk.value;
      if (x.type === "headers") {
        b.headers = {};
        for (const pair of bh.value.split(",")) { const i = pair.indexOf("="); if (i > 0) b.headers[pair.slice(0, i).trim()] = pair.slice(i + 1).trim(); }
        b.match = bm.value;
      }
      try { await api("POST", xpath + "/bindings", { json: b }); toast("Bound " + b.queue); reload(); } catch (e) { failed(e); }
    });
    const pkey = h("input", { placeholder: "routing key", "aria-label": "Routing key" });
    const pbody = h("input", { placeholder: '{"hello":"world"}', "aria-label": "Body", class: "mono" });
    const pub = h("form", { class: "form" }, h("label", {}, "Routing key", pkey), h("label", { class: "grow" }, "JSON body", pbody), h("button", { type: "submit", class: "ghost" }, "Publish"));
    pub.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const res = await api("POST", xpath + "/messages" + (pkey.value ? "?key=" + enc(pkey.value) : ""), { raw: pbody.value || "{}", headers: { "Content-Type": "application/json" } });
        toast(res.routed.length ? "Routed to " + res.routed.map((r) => r.queue + " (" + r.id + ")").join(", ") : "No binding matched");
      } catch (e) { failed(e); }
    });
    async function del() {
      if (!confirm("Delete exchange " + x.name + "?")) return;
      try { await api("DELETE", xpath); toast("Exchange " + x.name + " deleted"); reload(); } catch (e) { failed(e); }
    }
    return h("div", { class: "panel", "data-exchange": x.name },
      h("div", { class: "page-head" }, h("h2", { style: "margin:0" }, x.name), h("span", { class: "pill accent" }, x.type), h("div", { class: "spacer" }),
        perms.manage ? h("button", { class: "danger small", onclick: del }, "Delete") : null),
      h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, ["Queue", "Key", "Headers", ""].map((t) => h("th", {}, t)))),
        h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 4, class: "muted" }, "No bindings."))))),
      perms.manage ? h("div", { style: "margin-top:12px" }, bind) : null,
      h("div", { style: "margin-top:12px" }, pub));
  }

  // ---------- cluster ----------

  function clusterView() {
    setNav("cluster");
    const body = h("div", { "data-test": "cluster" });
    app().replaceChildren(h("div", { class: "page-head" }, h("h1", {}, "Cluster")), body);
    mount({
      async refresh() {
        let c;
        try {
          c = await api("GET", "/cluster");
        } catch (e) {
          if (e.code !== "not_clustered") throw e;
          body.replaceChildren(h("div", { class: "panel empty" }, "This node runs alone (started without --peers)."));
          return;
        }
        body.replaceChildren(clusterNodes(c), clusterPartitions(c));
      },
    });
  }

  function clusterNodes(c) {
    const leads = {};
    for (const p of c.partitions) if (p.leader != null) leads[p.leader] = (leads[p.leader] || 0) + 1;
    const rows = c.nodes.map((n) => h("tr", {},
      h("td", {}, String(n.id) + (n.id === c.node_id ? " (this node)" : "") + (n.id === c.leader ? " · metadata leader" : "")),
      h("td", {}, (n.up ? "up" : "down") + (n.fenced ? ", fenced" : "")),
      h("td", { class: "mono" }, n.cluster), h("td", { class: "mono" }, n.http || "–"), h("td", { class: "mono" }, n.grpc || "–"),
      h("td", { class: "num" }, num(leads[n.id] || 0))));
    return h("div", { class: "panel table-wrap" }, h("h2", {}, "Nodes"), h("table", { "data-test": "cluster-nodes" },
      h("thead", {}, h("tr", {}, ["Node", "State", "Cluster", "HTTP", "gRPC", "Partitions led"].map((t, i) => h("th", { class: i === 5 ? "num" : "" }, t)))),
      h("tbody", {}, rows)));
  }

  function clusterPartitions(c) {
    const rows = c.partitions.map((p) => h("tr", {},
      h("td", {}, h("a", { href: "#/queues/" + enc(p.queue) }, p.queue)), h("td", {}, p.partition),
      h("td", {}, p.leader == null ? "no leader" : String(p.leader)),
      h("td", { class: "mono" }, p.replicas.join(", ")), h("td", { class: "num" }, num(p.committed_offset))));
    return h("div", { class: "panel table-wrap" }, h("h2", {}, "Partitions"), h("table", { "data-test": "cluster-partitions" },
      h("thead", {}, h("tr", {}, ["Queue", "Partition", "Leader", "Replicas", "Committed offset"].map((t, i) => h("th", { class: i === 4 ? "num" : "" }, t)))),
      h("tbody", {}, rows)));
  }

  // ---------- router ----------

  function route() {
    clearTimeout(timer);
    const hash = location.hash || "#/";
    renderUser();
    if (hash.startsWith("#/login")) return loginView();
    const m = hash.match(/^#\/queues\/(.+)$/);
    if (m) queueView(decodeURIComponent(m[1])).catch(failed);
    else if (hash.startsWith("#/exchanges")) exchangesView();
    else if (hash.startsWith("#/cluster")) clusterView();
    else overviewView();
    schedule();
  }

  $("#theme").addEventListener("click", () => {
    const dark = getComputedStyle(document.documentElement).getPropertyValue("color-scheme").trim() === "dark";
    const next = dark ? "light" : "dark";
    document.documentElement.dataset.theme = next;
    localStorage.setItem("qit-theme", next);
    route();
  });
  $("#logout").addEventListener("click", () => {
    session.token = null;
    renderUser();
    location.hash = "#/login";
  });
  window.addEventListener("hashchange", route);
  route();
})();
