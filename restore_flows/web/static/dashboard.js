/* The dashboard's only script: poll api/status.json on the same server every 2 s and redraw.
   Values from the ledger are user text (host names, errors): they only ever go into textContent,
   never into innerHTML. Every URL here is relative: the page talks to the server that served it. */
"use strict";

const POLL_MS = 2000;
const STALE_MS = 10000;
const BUCKETS = ["online", "in_progress", "waiting", "failed", "blocked"];
const query = window.location.search;
let lastGood = 0;
let lastAt = null;

function el(name, attrs, ...children) {
  const node = document.createElement(name);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clock(iso, withSeconds) {
  if (!iso) return "-";
  const at = new Date(iso);
  /* A 24-hour clock: at 3:30 a.m. nobody should have to think about AM and PM. */
  const options = { hour: "2-digit", minute: "2-digit", hourCycle: "h23" };
  if (withSeconds) options.second = "2-digit";
  const sameDay = at.toDateString() === new Date().toDateString();
  if (!sameDay) options.weekday = "short";
  return at.toLocaleTimeString([], options);
}

function minutes(value) {
  if (value === null || value === undefined) return "not until an operator acts";
  if (value * 60 < 90) return Math.round(value * 60) + " s";
  if (value < 90) return Math.round(value) + " min";
  return (value / 60).toFixed(1) + " h";
}

function bar(counts, extraClass) {
  const node = el("div", { class: "bar " + (extraClass || "") });
  for (const key of BUCKETS) {
    if (!counts.total || !counts[key]) continue;
    const part = el("span", { class: key, title: key.replace("_", " ") + ": " + counts[key] });
    /* Set through the style object: the page's CSP forbids inline style attributes. */
    part.style.width = (100 * counts[key] / counts.total) + "%";
    node.append(part);
  }
  return node;
}

function countsLine(c) {
  return c.online + " of " + c.total + " online · " + c.in_progress + " in progress · " +
    c.waiting + " waiting · " + c.failed + " need an operator · " + c.blocked + " blocked";
}

function waveEta(wave) {
  if (wave.finished_at) return { text: "all back " + clock(wave.finished_at), bad: false };
  if (wave.eta_at) return { text: "ETA " + clock(wave.eta_at) + " (in " + minutes(wave.eta_minutes) + ")", bad: false };
  return {
    text: wave.will_not_finish + " cannot finish without an operator; the others by " + clock(wave.eta_others_at),
    bad: true,
  };
}

function groupTable(title, groups, key, open) {
  const rows = Object.entries(groups).map(([name, c]) =>
    el("tr", {},
      el("td", {}, name),
      el("td", { class: "barcell" }, bar(c)),
      el("td", { class: "n" }, c.percent + " %"),
      el("td", { class: "n" }, c.online + "/" + c.total),
      el("td", { class: "n" }, c.in_progress),
      el("td", { class: "n" }, c.waiting),
      el("td", { class: "n" + (c.failed ? " bad" : "") }, c.failed),
      el("td", { class: "n" }, c.blocked)));
  const head = el("tr", {}, ...["", "", "online", "", "in progress", "waiting", "operator", "blocked"]
    .map((h) => el("th", {}, h)));
  const details = el("details", { "data-key": key },
    el("summary", {}, title + " (" + rows.length + ")"),
    el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)));
  if (open.has(key)) details.open = true;
  return details;
}

function renderWaves(waves) {
  const box = document.getElementById("waves");
  /* Keep open whatever a person opened: the redraw must not fold it back every 2 s. */
  const open = new Set([...box.querySelectorAll("details[open]")].map((d) => d.dataset.key));
  const cards = waves.filter((w) => w.total > 0).map((w) => {
    const eta = waveEta(w);
    const state = w.finished_at ? " done" : (eta.bad ? " stuck" : "");
    return el("article", { class: "wave" + state },
      el("div", { class: "wave-head" },
        el("span", { class: "wave-name" }, w.name),
        el("span", { class: "wave-percent" }, w.percent + " %"),
        el("div", { class: "wave-bar" }, bar(w)),
        el("span", { class: "wave-eta" + (eta.bad ? " bad" : "") }, eta.text)),
      el("p", { class: "wave-counts" }, countsLine(w),
        w.planned_finish_at ? " · plan: all back " + clock(w.planned_finish_at) : null),
      groupTable("per site", w.sites, w.name + ":sites", open),
      groupTable("per department", w.departments, w.name + ":departments", open));
  });
  box.replaceChildren(...cards);
}

function renderBlockers(id, countId, items, total, people) {
  const list = document.getElementById(id);
  document.getElementById(countId).textContent = "(" + total + ")";
  if (!items.length) {
    list.replaceChildren(el("li", {}, people ? "nothing: no host is stuck" : "nothing right now"));
    return;
  }
  list.replaceChildren(...items.map((b) => {
    const held = b.holds_back ? " · holds back " + b.holds_back + " host(s)" : "";
    const when = b.since ? " · since " + clock(b.since) + (b.actor ? " by " + b.actor : "") : "";
    const eta = !people && b.eta_minutes !== null ? " · online in " + minutes(b.eta_minutes) : "";
    return el("li", { class: people ? "people" : "dependency" },
      el("span", { class: "host" }, b.host), " (" + b.wave + ", " + b.site + " / " + b.department + ", ",
      b.state + "): ", el("span", { class: "reason" + (people ? " bad" : "") }, b.reason),
      held + when + eta);
  }));
  if (total > items.length) list.append(el("li", {}, "... and " + (total - items.length) + " more"));
}

function render(data) {
  const ledger = document.getElementById("ledger");
  ledger.textContent = data.ledger === "rehearsal" ? "REHEARSAL ledger" : "LIVE ledger";
  ledger.className = "ledger " + data.ledger;
  document.title = "Restore " + data.estate.percent + " % online (" + data.ledger + ")";
  document.getElementById("estate-percent").textContent = data.estate.percent;
  document.getElementById("estate-bar").replaceChildren(...bar(data.estate, "").childNodes);
  document.getElementById("estate-counts").textContent = countsLine(data.estate);
  const eta = document.getElementById("estate-eta");
  if (data.done) {
    eta.textContent = "Every host is back online.";
    eta.className = "eta";
  } else if (data.estate.eta_at) {
    eta.textContent = "Everything back at " + clock(data.estate.eta_at) +
      " (in " + minutes(data.estate.eta_minutes) + ", forecast from the ledger)";
    eta.className = "eta";
  } else {
    eta.textContent = "Not every host comes back without an operator: see 'Needs an operator'.";
    eta.className = "eta bad";
  }
  renderWaves(data.waves);
  renderBlockers("needs", "needs-count", data.needs_people, data.needs_people_total, true);
  renderBlockers("waiting", "waiting-count", data.waiting_for, data.waiting_for_total, false);
  if (data.at !== lastAt) {
    lastAt = data.at;
    const sep = query ? "&" : "?";
    document.getElementById("timeline").src = "timeline.svg" + query + sep + "at=" + encodeURIComponent(data.at);
  }
}

function showProblem(text) {
  const problem = document.getElementById("problem");
  problem.textContent = text;
  problem.hidden = !text;
}

async function poll() {
  try {
    const response = await fetch("api/status.json" + query, { cache: "no-store" });
    const data = await response.json();
    if (!response.ok) {
      showProblem("The ledger cannot be read: " + (data.error || response.status));
    } else {
      showProblem("");
      render(data);
      lastGood = Date.now();
    }
  } catch (error) {
    showProblem("No answer from the dashboard server (is 'restore up' still running?): " + error);
  }
  const freshness = document.getElementById("freshness");
  if (lastGood) {
    const stale = Date.now() - lastGood > STALE_MS;
    freshness.textContent = (stale ? "NOT UPDATED since " : "updated ") + clock(new Date(lastGood).toISOString(), true) +
      (lastAt ? " · ledger read at " + clock(lastAt, true) : "");
    freshness.className = "freshness" + (stale ? " stale" : "");
  }
  window.setTimeout(poll, POLL_MS);
}

poll();
