// bertstream dashboard: polls /v1/live, /v1/stats and /v1/search; draws plain SVG.
(function () {
  "use strict";

  var REFRESH_MS = Number(new URLSearchParams(location.search).get("refresh")) || 5000;
  var TOKEN_KEY = "bertstream.token";
  var LANG_KEY = "bertstream.lang";
  // Range -> [seconds, stats bucket, bucket seconds]: at most ~170 bars.
  var RANGES = {
    "15m": [900, "1m", 60], "1h": [3600, "1m", 60], "24h": [86400, "1h", 3600],
    "7d": [604800, "1h", 3600], "30d": [2592000, "1d", 86400]
  };
  var COLORS = { positive: "#2f9e44", negative: "#d9480f", neutral: "#868e96" };
  var PALETTE = ["#1c7ed6", "#ae3ec9", "#f59f00", "#0ca678", "#e64980", "#5c940d"];
  var SVG = "http://www.w3.org/2000/svg";

  var TEXT = {
    en: {
      token: "Token", token_help: "This server needs a bearer token (kept in this browser only).",
      save: "Save", clear: "Clear", throughput: "Throughput", rows_per_s: "rows/s",
      in_last_minute: "rows in the last minute", per_minute_30: "rows per minute, last 30 min",
      queue_depth: "Queue depth", interactive: "interactive", bulk: "bulk",
      messages_waiting: "messages waiting in Redis", workers: "Workers", alive: "alive",
      label_mix: "Label mix over time", source: "Source", range: "Range",
      all_sources: "all sources", r15m: "15 minutes", r1h: "1 hour", r24h: "24 hours",
      r7d: "7 days", r30d: "30 days", latest: "Latest results", search_text: "text contains…",
      search_id: "id or prefix", all_labels: "all labels", search: "Search",
      search_note: "Text search reads the newest 5,000 rows of the chosen source and range.",
      finished_at: "finished", label: "label", score: "score", text: "text", no_rows: "No rows.",
      close: "Close", updated: "updated", unauthorized: "A valid bearer token is required.",
      no_data: "No rows in this range.", redis_down: "Redis unreachable"
    },
    zh: {
      token: "令牌", token_help: "此服务器需要 Bearer 令牌(仅保存在本浏览器中)。",
      save: "保存", clear: "清除", throughput: "吞吐量", rows_per_s: "行/秒",
      in_last_minute: "行(最近一分钟)", per_minute_30: "每分钟行数,最近 30 分钟",
      queue_depth: "队列深度", interactive: "交互", bulk: "批量",
      messages_waiting: "Redis 中等待的消息", workers: "工作进程", alive: "在线",
      label_mix: "标签分布随时间变化", source: "来源", range: "时间范围",
      all_sources: "全部来源", r15m: "15 分钟", r1h: "1 小时", r24h: "24 小时",
      r7d: "7 天", r30d: "30 天", latest: "最新结果", search_text: "文本包含…",
      search_id: "id 或前缀", all_labels: "全部标签", search: "搜索",
      search_note: "文本搜索只读取所选来源和时间范围内最新的 5,000 行。",
      finished_at: "完成时间", label: "标签", score: "分数", text: "文本", no_rows: "没有结果。",
      close: "关闭", updated: "更新于", unauthorized: "需要有效的 Bearer 令牌。",
      no_data: "此时间范围内没有数据。", redis_down: "无法连接 Redis"
    }
  };

  var $ = function (id) { return document.getElementById(id); };
  var lang = localStorage.getItem(LANG_KEY) ||
    ((navigator.language || "").toLowerCase().indexOf("zh") === 0 ? "zh" : "en");
  var timer = null;
  var labelsSeen = {};
  var skew = 0;  // server clock - this browser's clock, from /v1/live
  var drawn = {};  // what each part last drew: an unchanged answer is not redrawn
  var asked = { chart: 0, table: 0 };  // the latest request of each part: older answers are dropped

  function changed(part, data) {
    var key = lang + JSON.stringify(data);
    if (drawn[part] === key) return false;
    drawn[part] = key;
    return true;
  }

  function t(key) { return (TEXT[lang] && TEXT[lang][key]) || TEXT.en[key] || key; }

  function applyLang() {
    document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
    $("lang").textContent = lang === "zh" ? "English" : "中文";
    document.querySelectorAll("[data-i18n]").forEach(function (el) {
      el.textContent = t(el.getAttribute("data-i18n"));
    });
    document.querySelectorAll("[data-i18n-ph]").forEach(function (el) {
      el.placeholder = t(el.getAttribute("data-i18n-ph"));
    });
  }

  function token() { return localStorage.getItem(TOKEN_KEY) || ""; }

  function showError(message) {
    $("error").textContent = message || "";
    $("error").hidden = !message;
  }

  // GET a JSON route with the saved token; a 401 opens the token form.
  function api(path, params) {
    var query = new URLSearchParams();
    Object.keys(params || {}).forEach(function (k) {
      if (params[k] !== "" && params[k] !== null && params[k] !== undefined) query.set(k, params[k]);
    });
    var url = path + (query.toString() ? "?" + query : "");
    var headers = { Accept: "application/json" };
    var sent = token();
    if (sent) headers.Authorization = "Bearer " + sent;
    return fetch(url, { headers: headers }).then(function (r) {
      if (r.status === 401) {
        // An answer to a token replaced meanwhile says nothing about the new one.
        if (sent === token()) $("token-form").hidden = false;
        throw new Error(t("unauthorized"));
      }
      return r.json().then(function (body) {
        if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
        return body;
      });
    });
  }

  function el(tag, attrs, text) {
    var node = tag.indexOf("svg:") === 0 ? document.createElementNS(SVG, tag.slice(4))
      : document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function colorOf(label) {
    if (COLORS[label]) return COLORS[label];
    if (!(label in labelsSeen)) labelsSeen[label] = Object.keys(labelsSeen).length;
    return PALETTE[labelsSeen[label] % PALETTE.length];
  }

  function range() {
    var spec = RANGES[$("range").value] || RANGES["1h"];
    var until = Date.now() + skew;
    var since = Math.floor((until - spec[0] * 1000) / (spec[2] * 1000)) * spec[2] * 1000;
    return { since: new Date(since).toISOString(), sinceMs: since, untilMs: until,
      bucket: spec[1], step: spec[2] * 1000 };
  }

  // ---- live figures -------------------------------------------------------
  function drawTrend(perMinute) {
    var svg = $("trend");
    svg.replaceChildren();
    var now = Math.floor((Date.now() + skew) / 60000) * 60000;
    var counts = {};
    perMinute.forEach(function (p) { counts[Date.parse(p.bucket)] = p.count; });
    var max = Math.max.apply(null, [1].concat(perMinute.map(function (p) { return p.count; })));
    for (var i = 0; i < 30; i++) {
      var c = counts[now - (29 - i) * 60000] || 0;
      var h = (c / max) * 48;
      svg.appendChild(el("svg:rect", { x: i * 10 + 1, y: 50 - h, width: 8, height: h,
        "data-count": c }));
    }
  }

  function refreshLive() {
    return api("/v1/live", { window: 60 }).then(function (live) {
      skew = Date.parse(live.now) - Date.now();
      $("per-s").textContent = live.per_s.toFixed(live.per_s < 10 ? 2 : 0);
      $("finished").textContent = live.finished;
      var depth = live.queue_depth;
      $("q-interactive").textContent = depth ? depth.interactive : "?";
      $("q-bulk").textContent = depth ? depth.bulk : "?";
      $("workers-alive").textContent = live.workers_alive === null ? "?" : live.workers_alive;
      var list = $("workers");
      list.replaceChildren();
      if (live.workers === null) list.appendChild(el("li", {}, t("redis_down")));
      (live.workers || []).forEach(function (w) {
        list.appendChild(el("li", {}, [w.hostname, w.device, w.model].filter(Boolean).join(" · ")));
      });
      drawTrend(live.per_minute || []);
    });
  }

  // ---- label mix chart ----------------------------------------------------
  function drawChart(groups, r) {
    var svg = $("chart");
    svg.replaceChildren();
    var W = 800, H = 260, left = 44, bottom = 22, top = 8;
    var buckets = [];
    for (var b = r.sinceMs; b <= r.untilMs; b += r.step) buckets.push(b);
    var byBucket = {}, totals = {}, labels = [];
    groups.forEach(function (g) {
      var key = Date.parse(g.bucket), label = g.label === null ? "–" : g.label;
      (byBucket[key] = byBucket[key] || []).push([label, g.count]);
      if (!(label in totals)) { totals[label] = 0; labels.push(label); }
      totals[label] += g.count;
    });
    labels.sort();
    var max = 1;
    buckets.forEach(function (k) {
      var sum = (byBucket[k] || []).reduce(function (a, p) { return a + p[1]; }, 0);
      max = Math.max(max, sum);
    });
    var plotH = H - bottom - top, slot = (W - left) / buckets.length;
    svg.appendChild(el("svg:line", { x1: left, y1: H - bottom, x2: W, y2: H - bottom, "class": "axis" }));
    [0, 0.5, 1].forEach(function (f) {
      var y = H - bottom - f * plotH;
      svg.appendChild(el("svg:line", { x1: left, y1: y, x2: W, y2: y, "class": "axis" }));
      svg.appendChild(el("svg:text", { x: left - 4, y: y + 4, "text-anchor": "end" }, Math.round(f * max)));
    });
    buckets.forEach(function (k, i) {
      var y = H - bottom;
      var parts = (byBucket[k] || []).slice().sort(function (a, c) { return a[0] < c[0] ? -1 : 1; });
      parts.forEach(function (p) {
        var h = (p[1] / max) * plotH;
        y -= h;
        var rect = el("svg:rect", { x: left + i * slot + slot * 0.1, y: y, width: Math.max(slot * 0.8, 1),
          height: h, fill: colorOf(p[0]), "class": "bar", "data-label": p[0], "data-count": p[1],
          "data-bucket": new Date(k).toISOString() });
        rect.appendChild(el("svg:title", {}, new Date(k).toLocaleString() + " · " + p[0] + ": " + p[1]));
        svg.appendChild(rect);
      });
    });
    var ticks = Math.min(6, buckets.length);
    for (var j = 0; j < ticks; j++) {
      var idx = Math.floor(j * (buckets.length - 1) / Math.max(ticks - 1, 1));
      var d = new Date(buckets[idx]);
      var txt = r.step >= 86400000 ? d.toLocaleDateString() :
        d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      svg.appendChild(el("svg:text", { x: left + idx * slot + slot / 2, y: H - 6,
        "text-anchor": "middle" }, txt));
    }
    if (!labels.length) {
      svg.appendChild(el("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, t("no_data")));
    }
    var legend = $("legend");
    legend.replaceChildren();
    var all = labels.reduce(function (a, l) { return a + totals[l]; }, 0);
    labels.forEach(function (l) {
      var item = el("li", { "data-label": l, "data-count": totals[l] });
      var swatch = el("i");
      swatch.style.background = colorOf(l);
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(l + " " + totals[l] + " (" +
        Math.round(100 * totals[l] / all) + "%)"));
      legend.appendChild(item);
    });
  }

  function keepOptions(select, values, firstKey) {
    var current = select.value;
    var have = Array.prototype.slice.call(select.options, 1).map(function (o) { return o.value; });
    if (have.join("\n") === values.join("\n")) return;
    select.replaceChildren(el("option", { value: "", "data-i18n": firstKey }, t(firstKey)));
    values.forEach(function (v) { select.appendChild(el("option", { value: v }, v)); });
    if (current && values.indexOf(current) < 0) select.appendChild(el("option", { value: current }, current));
    select.value = current;
  }

  // Every chart read covers the whole range: an ended bucket can still change (a re-score
  // moves a task's latest row to a later bucket, a retried failure turns done, `db delete`
  // removes rows), so counts kept from an earlier read would be counted twice or stale.
  // A range in hourly or daily buckets is a larger aggregate, read at most every SLOW_MS.
  var SLOW_MS = 60 * 1000;
  var mixRead = null;

  function refreshChart(force) {
    var r = range();
    var source = $("source").value;
    var sources = api("/v1/sources", { limit: 200 }).then(function (s) {
      keepOptions($("source"), s.sources, "all_sources");
    });
    var key = [source, r.bucket, r.step].join("|");
    if (!force && mixRead && mixRead.key === key && r.step > 60000 &&
        r.untilMs - mixRead.at < SLOW_MS) return sources;
    var mine = ++asked.chart;
    var mix = api("/v1/stats", { by: "label", bucket: r.bucket, since: r.since, source: source })
      .then(function (s) {
        if (mine !== asked.chart) return;  // a filter changed meanwhile
        mixRead = { key: key, at: r.untilMs };
        var groups = s.groups;
        if (changed("chart", [groups, r.sinceMs])) drawChart(groups, r);
        var labels = {};
        groups.forEach(function (g) { if (g.label !== null) labels[g.label] = 1; });
        keepOptions($("label"), Object.keys(labels).sort(), "all_labels");
      });
    return Promise.all([sources, mix]);
  }

  // ---- latest results -----------------------------------------------------
  function showJson(event) {
    if (!token()) return; // the plain link works without a token
    event.preventDefault();
    var href = event.currentTarget.getAttribute("href");
    api(href).then(function (body) {
      $("json-body").textContent = JSON.stringify(body, null, 2);
      $("json-view").showModal();
    }).catch(function (e) { showError(e.message); });
  }

  function refreshTable() {
    var r = range();
    var id = $("id").value.trim();
    var mine = ++asked.table;
    // An id is looked up whatever the time range.
    return api("/v1/search", { q: $("q").value.trim(), id: id, label: $("label").value,
      source: $("source").value, since: id ? "" : r.since, limit: 50 })
      .then(function (body) {
        if (mine !== asked.table || !changed("table", body.items)) return;
        var tbody = $("results").tBodies[0];
        tbody.replaceChildren();
        body.items.forEach(function (row) {
          var tr = el("tr", { "data-id": row.id });
          tr.appendChild(el("td", { "data-th": t("finished_at"), "class": "num" },
            new Date(row.finished_at).toLocaleString()));
          var idCell = el("td", { "data-th": "id", "class": "id" });
          var link = el("a", { href: "/v1/tasks/" + encodeURIComponent(row.id), target: "_blank",
            rel: "noopener" }, row.id);
          link.addEventListener("click", showJson);
          idCell.appendChild(link);
          tr.appendChild(idCell);
          tr.appendChild(el("td", { "data-th": t("source") }, row.source || ""));
          var labelCell = el("td", { "data-th": t("label") });
          var tag = el("span", { "class": "tag" }, row.label || row.status);
          tag.style.background = row.label ? colorOf(row.label) : "#868e96";
          labelCell.appendChild(tag);
          tr.appendChild(labelCell);
          tr.appendChild(el("td", { "data-th": t("score"), "class": "num" },
            row.score === null ? "" : row.score.toFixed(3)));
          tr.appendChild(el("td", { "data-th": t("text"), "class": "text" },
            row.text === null ? (row.reason || "") : row.text));
          tbody.appendChild(tr);
        });
        $("empty").hidden = body.items.length > 0;
      });
  }

  // ---- polling ------------------------------------------------------------
  function refresh(force) {
    clearTimeout(timer);
    return Promise.all([refreshLive(), refreshChart(force === true), refreshTable()]).then(function () {
      showError("");
      $("updated").textContent = t("updated") + " " + new Date().toLocaleTimeString();
      document.body.setAttribute("data-refreshed", String(Date.now()));
    }).catch(function (e) { showError(e.message); }).then(function () {
      timer = setTimeout(tick, REFRESH_MS);
    });
  }

  function tick() { if (document.hidden) { timer = setTimeout(tick, REFRESH_MS); } else { refresh(false); } }
  function now() { refresh(true); }

  $("lang").addEventListener("click", function () {
    lang = lang === "zh" ? "en" : "zh";
    localStorage.setItem(LANG_KEY, lang);
    applyLang();
    now();
  });
  $("token-toggle").addEventListener("click", function () {
    $("token-form").hidden = !$("token-form").hidden;
  });
  $("token-form").addEventListener("submit", function (e) {
    e.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    $("token-input").value = "";
    $("token-form").hidden = true;
    now();
  });
  $("token-clear").addEventListener("click", function () { localStorage.removeItem(TOKEN_KEY); now(); });
  $("search").addEventListener("submit", function (e) { e.preventDefault(); now(); });
  ["source", "range", "label"].forEach(function (id) { $(id).addEventListener("change", now); });
  document.addEventListener("visibilitychange", function () { if (!document.hidden) now(); });

  applyLang();
  now();
})();
