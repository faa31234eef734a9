// Runs api/static/app.js under node against a live `bertstream serve`, with a minimal DOM
// of its own. The page's timers, clock and events are the test's: each line on stdin is a
// command (`next`, or a JSON object, below); once no request is in flight it prints what
// the page shows as one JSON line. Usage: node dashboard_driver.js APP_JS URL
// Env: DRIVER_CLOCK_MS, this "browser's" clock minus the real one (a skewed clock);
// DRIVER_VALUES, a JSON object of the form's values at load by element id.
//
// Commands: `next` or {"do": "tick"} fires every pending timer; {"do": "event", "id",
// "type", "value"?, "key"?} sets an element's value and calls its listeners ("document"
// for the document's); {"do": "set", "id", "value"} sets a value only; {"do": "advance",
// "ms"} moves the clock on; {"do": "batch", "steps": [...]} runs commands one after the
// other without waiting between them (an event while a refresh is in flight).
"use strict";
const fs = require("fs");
const readline = require("readline");
const [APP, BASE] = process.argv.slice(2);
const VALUES = JSON.parse(process.env.DRIVER_VALUES || "{}");

function node(tag) {
  return { tag, children: [], attrs: {}, style: {}, hidden: false, value: "", textContent: "",
    options: [], tBodies: [null], dataset: {}, listeners: {},
    setAttribute(k, v) { this.attrs[k] = String(v); }, getAttribute(k) { return k in this.attrs ? this.attrs[k] : null; },
    removeAttribute(k) { delete this.attrs[k]; }, hasAttribute(k) { return k in this.attrs; },
    appendChild(c) { this.children.push(c); if (this.tag === "select") this.options.push(c); return c; },
    replaceChildren(...cs) { this.children = cs; if (this.tag === "select") this.options = cs.slice(); },
    addEventListener(type, f) { (this.listeners[type] = this.listeners[type] || []).push(f); },
    showModal() {} };
}
const els = {};
const doc = node("document");
Object.assign(doc, {
  getElementById(id) {
    if (!els[id]) {
      els[id] = node(id === "range" ? "select" : "x");
      if (id === "results") els[id].tBodies = [node("tbody")];
      if (id === "range") els[id].value = "1h";
      if (id in VALUES) els[id].value = VALUES[id];
    }
    return els[id];
  },
  createElement: node, createElementNS: (_, t) => node(t), createTextNode: (t) => ({ text: t }),
  querySelectorAll: () => [], documentElement: {}, body: node("body"), hidden: false,
});
global.document = doc;
global.localStorage = { getItem: () => null, setItem() {}, removeItem() {} };
global.navigator = { language: "en" };
global.location = { search: process.env.DRIVER_SEARCH || "" };

// Every request is logged; its body is read before the page sees the answer, so "no
// request in flight" means the page has every answer it asked for.
let inflight = 0;
let requests = [];
const realFetch = fetch;
global.fetch = (u, o) => {
  inflight++;
  requests.push(u);
  return realFetch(BASE + u, o)
    .then((r) => r.arrayBuffer().then((buf) => new Response(buf, {
      status: r.status, statusText: r.statusText, headers: r.headers })))
    .finally(() => { inflight--; });
};

// The clock: DRIVER_CLOCK_MS off the real one, moved on by `advance`.
let offset = Number(process.env.DRIVER_CLOCK_MS || 0);
let advanced = 0;
const RealDate = Date;
class FakeDate extends RealDate {
  constructor(...args) { if (args.length) super(...args); else super(RealDate.now() + offset + advanced); }
  static now() { return RealDate.now() + offset + advanced; }
}
const fakePerformance = { now: () => performance.now() + advanced };

// The page's timers are the test's to fire.
const timers = new Map();
const delays = new Map();  // each pending timer's delay, as the page asked
let nextTimer = 1;
(function () {
  /* eslint-disable no-unused-vars */
  const setTimeout = (f, ms) => { timers.set(nextTimer, f); delays.set(nextTimer, ms); return nextTimer++; };
  const clearTimeout = (id) => { timers.delete(id); delays.delete(id); };
  const Date = FakeDate;
  const performance = fakePerformance;
  /* eslint-enable no-unused-vars */
  eval(fs.readFileSync(APP, "utf8"));
})();

function textOf(n) {
  if (!n) return "";
  if (n.text !== undefined) return n.text;
  return n.children.length ? n.children.map(textOf).join("") : String(n.textContent);
}
function all(n, pred, out = []) {
  if (n && n.children) n.children.forEach((c) => { if (pred(c)) out.push(c); all(c, pred, out); });
  return out;
}
const el = (id) => doc.getElementById(id);

function report() {
  const chart = el("chart");
  const bars = all(chart, (c) => c.attrs["class"] === "bar").map((c) => (
    { bucket: c.attrs["data-bucket"], label: c.attrs["data-label"], count: c.attrs["data-count"],
      other: c.attrs["data-other"], fill: c.attrs.fill, title: textOf(c) }));
  const texts = all(chart, (c) => c.tag === "text").map((c) => ({ attrs: c.attrs, text: textOf(c) }));
  const legend = el("legend").children.map((li) => ({ attrs: li.attrs, text: textOf(li),
    color: (li.children.find((c) => c.tag === "i") || { style: {} }).style.background }));
  const rows = el("results").tBodies[0].children.map((tr) => ({ attrs: tr.attrs,
    cells: tr.children.map((td) => ({ attrs: td.attrs, text: textOf(td),
      inner: all(td, () => true).map((c) => ({ tag: c.tag, attrs: c.attrs || {}, style: c.style || {} })) })) }));
  const state = (id) => ({ attrs: el(id).attrs, hidden: el(id).hidden, text: textOf(el(id)) });
  console.log(JSON.stringify({
    bars, texts, legend, rows,
    // The label and source fields are text fields: the values they offer are their
    // datalists' options.
    labels: el("label-options").children.map((o) => o.attrs.value),
    sources: el("source-options").children.map((o) => o.attrs.value),
    // Lines of words with a count in them, as the page shows them.
    words: { finished: textOf(el("finished")) + " " + textOf(el("finished-words")),
      page: textOf(el("page")), "scan-note": el("scan-note").hidden ? "" : textOf(el("scan-note")) },
    error: el("error").hidden ? "" : el("error").textContent,
    results: state("results"), chart: { attrs: chart.attrs }, stale: state("stale"),
    empty: state("empty"), timers: timers.size, requests,
    delays: [...timers.keys()].map((id) => delays.get(id)),
  }));
  requests = [];
}

// Settled: no request in flight for a few turns of the event loop.
function settle(then) {
  let quiet = 0;
  (function poll() {
    quiet = inflight === 0 ? quiet + 1 : 0;
    if (quiet >= 3) then(); else setTimeout(poll, 20);
  })();
}

function run(cmd) {
  if (cmd.do === "tick") {
    const pending = [...timers.entries()];
    timers.clear();
    pending.forEach(([, f]) => f());
  } else if (cmd.do === "set" || cmd.do === "event") {
    const target = cmd.id === "document" ? doc : el(cmd.id);
    if (cmd.value !== undefined) target.value = cmd.value;
    if (cmd.do === "event") {
      const event = { type: cmd.type, key: cmd.key, currentTarget: target, target,
        preventDefault() {} };
      (target.listeners[cmd.type] || []).forEach((f) => f(event));
    }
  } else if (cmd.do === "advance") {
    advanced += cmd.ms;
  } else if (cmd.do === "batch") {
    cmd.steps.forEach(run);
  } else {
    throw new Error("unknown command " + JSON.stringify(cmd));
  }
}

settle(report);
readline.createInterface({ input: process.stdin }).on("line", (line) => {
  run(line.trim() === "next" ? { do: "tick" } : JSON.parse(line));
  settle(report);
});
