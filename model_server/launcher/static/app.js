// model-server fleet dashboard: plain JavaScript, no library, no build step.
// Polls GET /fleet (this pipeline's control API, same origin) every second and updates the page in place.
// The control key, when given, lives in this tab's sessionStorage and is sent only as "Authorization: Bearer".
"use strict";

(function () {
  const KEY_ITEM = "model-server-control-key";
  const REFRESH_MS = 1000;
  const STATES = ["READY", "STARTING", "WAITING_GPU", "DRAINING", "RESTARTING", "FAILED", "STOPPED", "UNKNOWN"];
  // Which actions a state allows (the control API checks again: launcher/steps.py command_refusal).
  const ACTIONS = {
    READY: ["drain", "restart", "stop"],
    DRAINING: ["undrain", "restart", "stop"],
    STARTING: ["stop"],
    WAITING_GPU: ["stop"],
    RESTARTING: ["stop"],
    FAILED: ["start"],
    STOPPED: ["start"],
  };
  const WHAT = {
    drain: "It takes no new requests, finishes the running ones, then stops.",
    undrain: "It takes requests again.",
    restart: "It is drained (running requests finish), then restarted with a new engine process.",
    stop: "Its engine is stopped now: requests still running on it are cut.",
    start: "Its engine is started again.",
    rollout: "Each server of this group on this host is drained, restarted and READY again before the next one.",
  };

  const $ = (id) => document.getElementById(id);
  const view = { shape: "", rows: new Map(), groups: new Map(), data: null, lastOk: 0, timer: null };

  // ---- the key ---------------------------------------------------------------------------------

  function key() {
    try { return sessionStorage.getItem(KEY_ITEM) || ""; } catch (e) { return ""; }
  }
  function setKey(value) {
    try {
      if (value) sessionStorage.setItem(KEY_ITEM, value); else sessionStorage.removeItem(KEY_ITEM);
    } catch (e) { /* storage off: the key lives until the page is left */ }
    view.shape = "";  // redraw: actions appear or go
    refreshNow();
  }
  function authHeaders() {
    const k = key();
    return k ? { Authorization: "Bearer " + k } : {};
  }

  // ---- small helpers ---------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  function setText(node, text) {
    const value = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== value) node.textContent = value;
  }
  function duration(s) {
    if (s === null || s === undefined) return "";
    s = Math.max(0, Math.floor(s));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + (s % 60) + "s";
    return s + "s";
  }
  function number(v, digits) {
    if (v === null || v === undefined) return "–";
    return Number(v).toFixed(digits === undefined ? 0 : digits);
  }
  function gib(mib) { return mib === null || mib === undefined ? "?" : (mib / 1024).toFixed(1); }
  function clock(t) { return new Date(t * 1000).toLocaleTimeString([], { hour12: false }); }
  function bar(fraction) {
    const inner = el("span");
    const outer = el("div", { class: "bar" }, inner);
    setBar(outer, fraction);
    return outer;
  }
  function setBar(outer, fraction) {
    const f = fraction === null || fraction === undefined || isNaN(fraction) ? 0 : Math.min(1, Math.max(0, fraction));
    outer.firstChild.style.width = (f * 100).toFixed(1) + "%";  // CSSOM: allowed by the page's CSP
    outer.classList.toggle("high", f >= 0.9);
  }

  // ---- messages --------------------------------------------------------------------------------

  function banner(text) {
    const b = $("banner");
    b.hidden = !text;
    setText(b, text || "");
  }
  function notice(text, refused) {
    const n = $("notice");
    n.hidden = false;
    n.classList.toggle("refused", !!refused);
    setText(n, text);
  }

  // ---- drawing ---------------------------------------------------------------------------------

  function shapeOf(data) {
    const hosts = data.hosts.map((h) => [h.host, h.reachable, h.groups.map((g) => [g.group, g.servers.map((s) => s.name)])]);
    return JSON.stringify([hosts, data.writable, !!key()]);
  }

  function canAct(data) { return data.writable && !!key(); }

  function build(data) {
    const root = $("hosts");
    root.replaceChildren();
    view.rows.clear();
    view.groups.clear();
    const acting = canAct(data);
    for (const h of data.hosts) {
      const hostHead = el("div", { class: "head" },
        el("span", { class: "name", text: "host " + h.host }),
        el("span", { class: "muted host-info" }));
      const card = el("div", { class: "host" + (h.reachable ? "" : " unreachable"), "data-host": h.host }, hostHead);
      for (const g of h.groups) {
        const rolloutText = el("span", { class: "rollout muted" });
        const head = el("div", { class: "head" }, el("span", { class: "name", text: "group " + g.group }), rolloutText);
        if (acting) {
          head.append(el("button", {
            type: "button", class: "danger", "data-action": "rollout", "data-group": g.group, "data-host": h.host,
            text: "Rolling restart",
            onclick: () => ask("rollout", { group: g.group, host: h.host }),
          }));
        }
        const headers = ["server", "state", "pid", "restarts", "uptime", "GPU memory", "running", "queued",
          "token usage", "gen tok/s", "last error"];
        if (acting) headers.push("actions");
        const tbody = el("tbody");
        const table = el("table", { class: "grid servers" },
          el("thead", null, el("tr", null, ...headers.map((t) => el("th", { text: t })))), tbody);
        for (const s of g.servers) {
          const cells = {
            name: el("td", { class: "name" }, el("strong", { text: s.name }), el("div", { class: "muted addr" })),
            state: el("span", { class: "state" }),
            pid: el("td", { class: "num pid" }),
            restarts: el("td", { class: "num restarts" }),
            since: el("td", { class: "num since" }),
            gpus: el("div", { class: "gpus" }),
            running: el("td", { class: "num running" }),
            queued: el("td", { class: "num queued" }),
            usage: el("div", { class: "usage" }, bar(0), el("span")),
            throughput: el("td", { class: "num throughput" }),
            error: el("td", { class: "error" }, el("div", { class: "clamp" })),
            actions: acting ? el("td", { class: "actions" }) : null,
          };
          const tr = el("tr", { "data-server": s.name, "data-host": h.host },
            cells.name, el("td", null, cells.state), cells.pid, cells.restarts, cells.since, el("td", null, cells.gpus),
            cells.running, cells.queued, el("td", null, cells.usage), cells.throughput, cells.error, cells.actions);
          tbody.append(tr);
          view.rows.set(h.host + "/" + s.name, { tr, cells, actionsFor: "" });
        }
        view.groups.set(h.host + "/" + g.group, { rolloutText });
        card.append(el("div", { class: "group", "data-group": g.group }, head, table));
      }
      root.append(card);
    }
  }

  function update(data) {
    const hostCards = $("hosts").querySelectorAll(".host");
    data.hosts.forEach((h, i) => {
      const info = hostCards[i] && hostCards[i].querySelector(".host-info");
      if (info) {
        setText(info, h.reachable
          ? (h.here ? "this pipeline" : "control API") + (h.uptime_s !== null ? " · up " + duration(h.uptime_s) : "")
            + (h.gpu_error ? " · GPUs: " + h.gpu_error : "")
          : "no control API answer: " + h.problem);
      }
      for (const g of h.groups) {
        const group = view.groups.get(h.host + "/" + g.group);
        if (group) setText(group.rolloutText, rolloutText(g.rollout));
        for (const s of g.servers) {
          const row = view.rows.get(h.host + "/" + s.name);
          if (row) updateRow(row, s, data);
        }
      }
    });
  }

  function rolloutText(r) {
    if (!r) return "";
    const done = (r.done || []).length, all = (r.servers || []).length;
    const state = String(r.state).toLowerCase();
    let text = "rollout " + r.id + ": " + state + " (" + done + "/" + all + " done";
    if (state === "running" && r.current) text += ", " + (r.phase === "restarting" ? "restarting " : "next: ") + r.current;
    text += ", " + duration(r.elapsed_s) + ")";
    if (r.why) text += ": " + r.why;
    return text;
  }

  function updateRow(row, s, data) {
    const c = row.cells;
    row.tr.dataset.state = s.state;
    row.tr.dataset.pid = s.pid === null ? "" : String(s.pid);
    row.tr.dataset.restarts = String(s.restarts);
    setText(c.name.querySelector(".addr"), s.host + ":" + s.port);
    setText(c.state, s.state);
    c.state.className = "state s-" + (STATES.includes(s.state) ? s.state : "UNKNOWN");
    setText(c.pid, s.pid === null ? "–" : s.pid);
    setText(c.restarts, s.restarts);
    setText(c.since, duration(s.in_state_s));
    c.since.title = s.state === "READY" ? "READY for this long" : "in " + s.state + " for this long";
    c.since.classList.toggle("muted", s.state !== "READY");
    updateGpus(c.gpus, s.gpus);
    const load = s.load;
    setText(c.running, load ? number(load.running) : "–");
    setText(c.queued, load ? number(load.queued) : "–");
    setBar(c.usage.firstChild, load ? load.token_usage : 0);
    setText(c.usage.lastChild, load && load.token_usage !== null ? (load.token_usage * 100).toFixed(1) + "%" : "–");
    setText(c.throughput, load ? number(load.gen_throughput, 1) : "–");
    const error = s.last_error || (s.load_problem && s.state !== "UNKNOWN" ? s.load_problem : "");
    setText(c.error.firstChild, error);
    c.error.title = error;
    if (c.actions) {
      const allowed = ACTIONS[s.state] || [];
      const sig = allowed.join(",");
      if (row.actionsFor !== sig) {
        row.actionsFor = sig;
        c.actions.replaceChildren(...allowed.map((verb) => el("button", {
          type: "button", "data-action": verb, class: verb === "stop" || verb === "restart" ? "danger" : "",
          text: verb, onclick: () => ask(verb, { server: s.name, host: row.tr.dataset.host, group: s.group }),
        })));
      }
    }
  }

  function updateGpus(box, gpus) {
    if (box.childElementCount !== gpus.length) {
      box.replaceChildren(...gpus.map(() => el("div", { class: "gpu" }, el("span", { class: "idx" }), bar(0), el("span", { class: "val" }))));
    }
    gpus.forEach((g, i) => {
      const line = box.children[i];
      setText(line.querySelector(".idx"), "GPU " + g.index);
      const frac = g.total_mib ? g.used_mib / g.total_mib : 0;
      setBar(line.querySelector(".bar"), frac);
      setText(line.querySelector(".val"), gib(g.used_mib) + "/" + gib(g.total_mib) + " GiB");
    });
  }

  function drawSummary(data) {
    const box = $("summary");
    box.replaceChildren(...Object.entries(data.states).map(([state, n]) =>
      el("span", { class: "chip s-" + (STATES.includes(state) ? state : "UNKNOWN"), "data-state": state, text: n + " " + state })));
    setText($("table"), data.table.split("/").pop());
    $("table").title = data.table;
    let mode;
    if (!data.writable) mode = "read-only: this pipeline has no control key (launch.control_key_env)";
    else if (!key()) mode = "read-only: enter the control key to act";
    else mode = "actions on";
    setText($("mode"), mode);
    setText($("key-button"), key() ? "Control key ✓" : "Enter control key");
  }

  function drawEvents(events) {
    const body = $("events").tBodies[0];
    body.replaceChildren(...events.map((e) => el("tr", { "data-server": e.server, "data-to": e.to },
      el("td", { class: "num", text: clock(e.time) }),
      el("td", { text: e.host }),
      el("td", { text: e.server }),
      el("td", null, el("span", { class: "t-" + e.from, text: e.from }), " → ", el("span", { class: "to t-" + e.to, text: e.to })),
      el("td", { class: "reason", text: e.reason }))));
  }

  function drawClients(clients) {
    $("clients-section").hidden = clients.length === 0;
    const box = $("clients");
    box.replaceChildren(...clients.map((c) => {
      const extra = c.replicas.some((r) => r.breaker !== null || r.smoothed_latency_s !== null);
      const cols = ["group", "replica", "requests", "failures", "failovers", "resumes", "stalls", "mean latency"];
      if (extra) cols.push("breaker", "smoothed latency");
      const rows = c.replicas.map((r) => {
        const cells = [el("td", { text: r.group }), el("td", { text: r.replica }),
          ...["requests", "failures", "failovers", "resumes", "stalls"].map((k) => el("td", { class: "num " + k, text: number(r[k]) })),
          el("td", { class: "num", text: r.mean_latency_s === null ? "–" : (r.mean_latency_s * 1000).toFixed(1) + " ms" })];
        if (extra) {
          cells.push(el("td", { text: r.breaker || "–" }),
            el("td", { class: "num", text: r.smoothed_latency_s === null ? "–" : (r.smoothed_latency_s * 1000).toFixed(1) + " ms" }));
        }
        return el("tr", { "data-replica": r.replica, "data-group": r.group }, ...cells);
      });
      return el("div", { class: "client", "data-url": c.url },
        el("h3", null, "client ", el("code", { text: c.url })),
        c.problem ? el("p", { class: "muted", text: c.problem }) : null,
        rows.length ? el("table", { class: "grid" }, el("thead", null, el("tr", null, ...cols.map((t) => el("th", { text: t })))), el("tbody", null, ...rows)) : null);
    }));
  }

  function draw(data) {
    view.data = data;
    const shape = shapeOf(data);
    if (shape !== view.shape) {
      build(data);
      view.shape = shape;
    }
    update(data);
    drawSummary(data);
    drawEvents(data.events);
    drawClients(data.clients);
    banner(data.problem || "");
  }

  // ---- polling ---------------------------------------------------------------------------------

  async function poll() {
    clearTimeout(view.timer);
    try {
      const answer = await fetch("/fleet", { headers: authHeaders(), cache: "no-store" });
      const body = await answer.json().catch(() => ({}));
      if (!answer.ok) {
        banner("GET /fleet answered " + answer.status + ": " + (body.error || "no reason given")
          + (answer.status === 401 || answer.status === 403 ? " (enter the control key)" : ""));
      } else {
        draw(body);
        view.lastOk = Date.now();
        document.body.dataset.loaded = "1";
      }
    } catch (err) {
      banner("lost contact with the pipeline's control API (" + err + "); retrying every second");
    }
    setText($("updated"), view.lastOk ? "updated " + new Date(view.lastOk).toLocaleTimeString([], { hour12: false }) : "no data yet");
    view.timer = setTimeout(poll, REFRESH_MS);
  }
  function refreshNow() { clearTimeout(view.timer); view.timer = setTimeout(poll, 0); }

  // ---- actions ---------------------------------------------------------------------------------

  let pending = null;

  function ask(verb, target) {
    pending = { verb, target };
    const what = verb === "rollout"
      ? "Rolling restart of group " + target.group + " on " + target.host + "?"
      : verb.charAt(0).toUpperCase() + verb.slice(1) + " " + target.server + " (" + target.host + ", group " + target.group + ")?";
    setText($("confirm-title"), what);
    setText($("confirm-text"), WHAT[verb] || "");
    $("confirm").showModal();
  }

  async function act() {
    const p = pending;
    pending = null;
    $("confirm").close();
    if (!p) return;
    const url = p.verb === "rollout"
      ? "/fleet/groups/" + encodeURIComponent(p.target.group) + "/rollout?host=" + encodeURIComponent(p.target.host)
      : "/fleet/servers/" + encodeURIComponent(p.target.server) + "/" + p.verb;
    const name = p.verb === "rollout" ? "group " + p.target.group : p.target.server;
    try {
      const answer = await fetch(url, { method: "POST", headers: authHeaders(), cache: "no-store" });
      const body = await answer.json().catch(() => ({}));
      if (answer.ok) notice(p.verb + " of " + name + ": accepted (" + answer.status + ")", false);
      else notice(p.verb + " of " + name + " refused (" + answer.status + "): " + (body.error || "no reason given"), true);
    } catch (err) {
      notice(p.verb + " of " + name + " not sent: " + err, true);
    }
    refreshNow();
  }

  function openKeyDialog() {
    $("key-input").value = "";
    $("key-dialog").showModal();
    $("key-input").focus();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("confirm-ok").addEventListener("click", act);
    $("confirm-cancel").addEventListener("click", () => { pending = null; $("confirm").close(); });
    $("key-button").addEventListener("click", openKeyDialog);
    $("key-cancel").addEventListener("click", () => $("key-dialog").close());
    $("key-forget").addEventListener("click", () => { $("key-dialog").close(); setKey(""); });
    const save = () => { const v = $("key-input").value.trim(); $("key-input").value = ""; $("key-dialog").close(); setKey(v); };
    $("key-form").addEventListener("submit", (e) => { e.preventDefault(); save(); });  // never sent anywhere
    poll();
  });
})();
