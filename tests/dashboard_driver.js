// Runs api/static/app.js under node against a live `bertstream serve`, with a minimal DOM
// of its own, one refresh at a time: after each refresh it prints the chart's bars as a
// JSON line; a line on stdin runs the next refresh. Usage: node dashboard_driver.js APP_JS URL
"use strict";
const fs = require("fs");
const readline = require("readline");
const [APP, BASE] = process.argv.slice(2);

function node(tag) {
  return { tag, children: [], attrs: {}, style: {}, hidden: false, value: "", textContent: "",
    options: [], tBodies: [null], dataset: {},
    setAttribute(k, v) { this.attrs[k] = v; }, getAttribute(k) { return this.attrs[k]; },
    appendChild(c) { this.children.push(c); if (this.tag === "select") this.options.push(c); return c; },
    replaceChildren(...cs) { this.children = cs; if (this.tag === "select") this.options = cs.slice(); },
    addEventListener() {}, showModal() {} };
}
const els = {};
global.document = {
  getElementById(id) {
    if (!els[id]) {
      els[id] = node(["source", "range", "label"].includes(id) ? "select" : "x");
      if (id === "results") els[id].tBodies = [node("tbody")];
      if (id === "range") els[id].value = "1h";
    }
    return els[id];
  },
  createElement: node, createElementNS: (_, t) => node(t), createTextNode: (t) => ({ text: t }),
  querySelectorAll: () => [], documentElement: {}, body: node("body"), hidden: false,
  addEventListener() {},
};
global.localStorage = { getItem: () => null, setItem() {}, removeItem() {} };
global.navigator = { language: "en" };
global.location = { search: "" };
const realFetch = fetch;
global.fetch = (u, o) => realFetch(BASE + u, o);

// The page's timer is the test's to fire: one refresh per line on stdin.
const timers = [];
(function () {
  // eslint-disable-next-line no-unused-vars
  const setTimeout = (f) => { timers.push(f); return timers.length; };
  // eslint-disable-next-line no-unused-vars
  const clearTimeout = () => {};
  eval(fs.readFileSync(APP, "utf8"));
})();

function report() {
  const bars = els.chart.children.filter((c) => c.attrs["class"] === "bar").map((c) => (
    { bucket: c.attrs["data-bucket"], label: c.attrs["data-label"], count: c.attrs["data-count"] }));
  console.log(JSON.stringify({ bars, error: els.error ? els.error.textContent : "" }));
}
function whenScheduled(then) {  // a refresh ends by scheduling the next one
  if (timers.length) then(); else setTimeout(() => whenScheduled(then), 20);
}
whenScheduled(report);
readline.createInterface({ input: process.stdin }).on("line", () => {
  timers.pop()();
  whenScheduled(report);
});
