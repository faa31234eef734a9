// bertstream dashboard: polls /v1/live, /v1/stats and /v1/search; draws plain SVG.
// Labels, sources and ids are the data's own names: they key Maps and Sets, never plain
// objects, so a label called `constructor` or `__proto__` is a label like any other.
(function () {
  "use strict";

  // ?refresh=<ms>: the refresh interval, held to 0.25 s .. 1 h (5 s when absent or not a
  // number), so a typo cannot make the page poll without pause.
  var REFRESH_MS = (function (asked) {
    var ms = Number(asked);
    if (asked === null || asked === "" || !isFinite(ms)) return 5000;
    return Math.min(3600000, Math.max(250, ms));
  })(new URLSearchParams(location.search).get("refresh"));
  var TOKEN_KEY = "bertstream.token";
  var LANG_KEY = "bertstream.lang";
  // Range -> [seconds, stats bucket, bucket seconds]: at most ~170 bars.
  var RANGES = {
    "15m": [900, "1m", 60], "1h": [3600, "1m", 60], "24h": [86400, "1h", 3600],
    "7d": [604800, "1h", 3600], "30d": [2592000, "1d", 86400]
  };
  var COLORS = new Map([["positive", "#2f9e44"], ["negative", "#d9480f"], ["neutral", "#868e96"]]);
  var PALETTE = ["#1c7ed6", "#ae3ec9", "#f59f00", "#0ca678", "#e64980", "#5c940d"];
  var NO_LABEL_COLOR = "#495057";
  var OTHER_COLOR = "#ced4da";
  // The series of the labels past STATS_LIMIT, summed by /v1/stats as `other`: a key no
  // label can equal (a label is a string; this is an object).
  var OTHER = { other: true };
  var STATS_LIMIT = 100;
  // Label and source filters as the API takes them: at most 64 and 256 characters (code
  // points, not the UTF-16 units an input's maxlength counts), no NUL.
  var FIELD_MAX = new Map([["label", 64], ["source", 256]]);
  // The sources the source field offers (the first in code point order); any other is typed.
  var SOURCES_OFFERED = 200;
  // The filters the page's URL carries (a reload or a shared link shows the same rows).
  var FILTERS = ["source", "range", "label", "q", "id"];
  var DEFAULT_RANGE = "1h";
  // The filters as last applied (a change, Enter, Search): the refreshes read these, not
  // a field still being typed in.
  var applied = new Map();
  var DAY_MS = 86400000;
  // Reason phrases for an answer without one (HTTP/2 has none).
  var REASONS = new Map([[400, "Bad Request"], [401, "Unauthorized"], [403, "Forbidden"],
    [404, "Not Found"], [408, "Request Timeout"], [413, "Content Too Large"],
    [422, "Unprocessable Content"], [429, "Too Many Requests"], [500, "Internal Server Error"],
    [502, "Bad Gateway"], [503, "Service Unavailable"], [504, "Gateway Timeout"]]);
  var SVG = "http://www.w3.org/2000/svg";

  var TEXT = {
    en: {
      token: "Token", token_help: "This server needs a bearer token (kept in this browser only).",
      save: "Save", clear: "Clear", throughput: "Throughput", rows_per_s: "rows/s",
      in_last_minute: "rows in the last minute", in_last_minute_one: "row in the last minute",
      per_minute_30: "rows per minute, last 30 min",
      queue_depth: "Queue depth", interactive: "interactive", bulk: "bulk",
      messages_waiting: "messages waiting in Redis", workers: "Workers", alive: "alive",
      label_mix: "Label mix over time", source: "Source", range: "Range",
      all_sources: "all sources", r15m: "15 minutes", r1h: "1 hour", r24h: "24 hours",
      r7d: "7 days", r30d: "30 days", latest: "Latest results", search_text: "text contains…",
      search_id: "id or prefix", all_labels: "all labels", search: "Search",
      search_note: "Text search reads the newest 5,000 rows of the chosen source and range (on each page, those older than the page before).",
      finished_at: "finished", label: "label", score: "score", text: "text", no_rows: "No rows.",
      close: "Close", updated: "updated", unauthorized: "A valid bearer token is required.",
      no_data: "No rows in this range.", redis_down: "Redis unreachable",
      search_text_name: "Text contains", search_id_name: "Id or id prefix",
      label_name: "Label", other_labels: "other labels", n_other_labels: "{n} other labels",
      n_other_labels_one: "{n} other label",
      no_label: "no label", utc_days: "days in UTC", not_json: "the answer is not JSON",
      unreachable: "The server cannot be reached",
      stale: "Could not refresh: these rows are from {t}.",
      label_long: "A label has at most {n} characters.",
      label_nul: "A label cannot hold the NUL character.",
      source_long: "A source has at most {n} characters.",
      source_nul: "A source cannot hold the NUL character.",
      newer: "← Newer", older: "Older →", page_rows: "rows {a}–{b}", page_row: "row {a}",
      page_linked: "{n} rows from the linked position",
      page_linked_one: "{n} row from the linked position",
      scan_ended: "{n} matches among the {scan} rows read; Older reads the {scan} rows before them.",
      scan_ended_one: "{n} match among the {scan} rows read; Older reads the {scan} rows before them.",
      scan_ended_zero: "No matches among the {scan} rows read; Older reads the {scan} rows before them."
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
      search_note: "文本搜索只读取所选来源和时间范围内最新的 5,000 行(翻页时为上一页之前的)。",
      finished_at: "完成时间", label: "标签", score: "分数", text: "文本", no_rows: "没有结果。",
      close: "关闭", updated: "更新于", unauthorized: "需要有效的 Bearer 令牌。",
      no_data: "此时间范围内没有数据。", redis_down: "无法连接 Redis",
      search_text_name: "文本包含", search_id_name: "id 或 id 前缀", label_name: "标签",
      other_labels: "其他标签", n_other_labels: "其他 {n} 个标签", no_label: "无标签",
      utc_days: "按 UTC 日期", not_json: "应答不是 JSON", unreachable: "无法连接服务器",
      stale: "无法刷新:以下是 {t} 的结果。",
      label_long: "标签最多 {n} 个字符。", label_nul: "标签不能包含 NUL 字符。",
      source_long: "来源最多 {n} 个字符。", source_nul: "来源不能包含 NUL 字符。",
      newer: "← 较新", older: "较旧 →", page_rows: "第 {a}–{b} 行", page_row: "第 {a} 行",
      page_linked: "自链接位置起 {n} 行",
      scan_ended: "在读取的 {scan} 行中有 {n} 条匹配;“较旧”读取之前的 {scan} 行。"
    }
  };

  var $ = function (id) { return document.getElementById(id); };
  var lang = localStorage.getItem(LANG_KEY) ||
    ((navigator.language || "").toLowerCase().indexOf("zh") === 0 ? "zh" : "en");
  var labelsSeen = new Map();
  // Server clock - this browser's clock: from /v1/live's `now`, until then from the Date
  // header. Time ranges are the server's: a browser clock off by an hour shows the same rows.
  var skew = 0;
  var skewKnown = false;
  var drawn = new Map();  // what each part last drew: an unchanged answer is not redrawn
  var openTexts = new Set();  // the ids whose whole text is shown
  // What the page shows in words of its language, kept to redraw at once on a switch:
  // the last answers drawn, the last good refresh, the error shown.
  var lastChart = null;
  var lastTable = null;
  var updatedAt = null;
  var shownError = null;

  // One refresh at a time and one timer: a refresh started while another is in flight
  // aborts it, and only the latest refresh draws and schedules the next.
  var timer = null;
  var runs = 0;
  var inflight = null;

  function changed(part, data) {
    var key = lang + JSON.stringify(data);
    if (drawn.get(part) === key) return false;
    drawn.set(part, key);
    return true;
  }

  function own(obj, key) { return Object.prototype.hasOwnProperty.call(obj, key); }

  function t(key) {
    var texts = own(TEXT, lang) ? TEXT[lang] : TEXT.en;
    return own(texts, key) ? texts[key] : own(TEXT.en, key) ? TEXT.en[key] : key;
  }

  // The string `key` for the count `n` (`{n}` replaced): its form for one or none in the
  // page's language where that language has one (English `<key>_one`, `<key>_zero`;
  // Chinese has no plural), never another language's.
  function tn(key, n) {
    var texts = own(TEXT, lang) ? TEXT[lang] : TEXT.en;
    var form = n === 0 && own(texts, key + "_zero") ? key + "_zero"
      : n === 1 && own(texts, key + "_one") ? key + "_one" : key;
    return t(form).split("{n}").join(String(n));
  }

  // Dates in the page's language (English dates in the browser's own English locale).
  function locale() {
    var nav = navigator.language || "en";
    if (lang === "zh") return "zh-CN";
    return nav.toLowerCase().indexOf("zh") === 0 ? "en" : nav;
  }

  // A clock for "how long ago", immune to the wall clock's skew and jumps.
  function monotonic() {
    return typeof performance !== "undefined" && performance.now ? performance.now() : Date.now();
  }

  function serverNow() { return Date.now() + skew; }

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

  // An error whose message is in the page's language: `render` words it again after a switch.
  function localized(render) {
    var e = new Error(render());
    e.render = render;
    return e;
  }

  function errorText(e) { return e ? (e.render ? e.render() : e.message) : ""; }

  function showError(e) {
    shownError = e || null;
    var message = errorText(e);
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  // "HTTP 502 Bad Gateway", and the API's own message when the body is its JSON error.
  function httpError(r, body) {
    var reason = r.statusText || REASONS.get(r.status) || "";
    var text = "HTTP " + r.status + (reason ? " " + reason : "");
    var error = body && typeof body === "object" ? body.error : null;
    if (error && typeof error.message === "string" && error.message) text += ": " + error.message;
    return text;
  }

  // GET a JSON route with the saved token; a 401 opens the token form. Any body may come
  // back (a reverse proxy's HTML error page): an error names the HTTP status.
  function api(path, params, signal) {
    var query = new URLSearchParams();
    Object.keys(params || {}).forEach(function (k) {
      if (params[k] !== "" && params[k] !== null && params[k] !== undefined) query.set(k, params[k]);
    });
    var url = path + (query.toString() ? "?" + query : "");
    var headers = { Accept: "application/json" };
    var sent = token();
    if (sent) headers.Authorization = "Bearer " + sent;
    return fetch(url, { headers: headers, signal: signal }).catch(function (e) {
      if (e && e.name === "AbortError") throw e;
      var why = e && e.message;
      throw localized(function () { return t("unreachable") + " (" + why + ")"; });
    }).then(function (r) {
      if (!skewKnown) {
        var date = Date.parse(r.headers.get("Date"));
        if (!isNaN(date)) skew = date - Date.now();
      }
      if (r.status === 401) {
        // An answer to a token replaced meanwhile says nothing about the new one.
        if (sent === token()) $("token-form").hidden = false;
        throw localized(function () { return t("unauthorized"); });
      }
      return r.text().then(function (raw) {
        var body;
        try { body = JSON.parse(raw); } catch (e) { body = undefined; }
        if (!r.ok) throw new Error(httpError(r, body));
        if (body === undefined) {
          var status = httpError(r, null);
          throw localized(function () { return status + ": " + t("not_json"); });
        }
        return body;
      });
    });
  }

  // " @<first 12 characters>" of a worker's model revision, so two models of one name
  // differ; a "+int8" or "+neutral0.6" suffix is kept (it changes the results too).
  function shortRevision(revision) {
    if (typeof revision !== "string" || !revision) return "";
    var plus = revision.indexOf("+");
    var hash = plus < 0 ? revision : revision.slice(0, plus);
    return " @" + hash.slice(0, 12) + (plus < 0 ? "" : revision.slice(plus));
  }

  function el(tag, attrs, text) {
    var node = tag.indexOf("svg:") === 0 ? document.createElementNS(SVG, tag.slice(4))
      : document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function colorOf(label) {
    if (label === OTHER) return OTHER_COLOR;
    if (label === null) return NO_LABEL_COLOR;
    if (COLORS.has(label)) return COLORS.get(label);
    if (!labelsSeen.has(label)) labelsSeen.set(label, labelsSeen.size);
    return PALETTE[labelsSeen.get(label) % PALETTE.length];
  }

  // Mark a part of the page as showing an older read (its refresh failed), or as current.
  function markStale(part, stale) {
    (part === "table" ? ["results"] : part === "chart" ? ["chart", "legend"] : ["cards"])
      .forEach(function (id) {
        if (stale) $(id).setAttribute("data-stale", "true"); else $(id).removeAttribute("data-stale");
      });
  }

  function range() {
    var key = applied.get("range");
    var spec = own(RANGES, key) ? RANGES[key] : RANGES["1h"];
    var until = serverNow();
    var since = Math.floor((until - spec[0] * 1000) / (spec[2] * 1000)) * spec[2] * 1000;
    return { since: new Date(since).toISOString(), sinceMs: since, untilMs: until,
      bucket: spec[1], step: spec[2] * 1000, spanMs: spec[0] * 1000 };
  }

  // A bucket's start for the axis (short) or a bar's title (long). Day buckets start at
  // UTC midnight: they are named by their UTC date, which west of UTC is not the local one.
  function bucketText(ms, r, long) {
    var d = new Date(ms);
    if (r.step >= DAY_MS) {
      var day = { timeZone: "UTC", month: "short", day: "numeric" };
      if (long) day.year = "numeric";
      return d.toLocaleDateString(locale(), day) + (long ? " UTC" : "");
    }
    if (long) return d.toLocaleString(locale());
    var hm = { hour: "2-digit", minute: "2-digit" };
    if (r.spanMs > DAY_MS) { hm.month = "short"; hm.day = "numeric"; }  // a week: which day
    return d.toLocaleString(locale(), hm);
  }

  // ---- live figures -------------------------------------------------------
  var lastFinished = null;  // rows finished in the last minute, as last read
  function drawFinished() {
    $("finished-words").textContent = tn("in_last_minute", lastFinished === null ? 2 : lastFinished);
  }

  function drawTrend(perMinute) {
    var svg = $("trend");
    svg.replaceChildren();
    var now = Math.floor(serverNow() / 60000) * 60000;
    var counts = new Map();
    perMinute.forEach(function (p) { counts.set(Date.parse(p.bucket), p.count); });
    var max = Math.max.apply(null, [1].concat(perMinute.map(function (p) { return p.count; })));
    for (var i = 0; i < 30; i++) {
      var c = counts.get(now - (29 - i) * 60000) || 0;
      var h = (c / max) * 48;
      svg.appendChild(el("svg:rect", { x: i * 10 + 1, y: 50 - h, width: 8, height: h,
        "data-count": c }));
    }
  }

  function refreshLive(run) {
    return api("/v1/live", { window: 60 }, run.signal).then(function (live) {
      if (!run.current()) return;
      var at = Date.parse(live.now);
      if (!isNaN(at)) { skew = at - Date.now(); skewKnown = true; }
      $("per-s").textContent = live.per_s.toFixed(live.per_s < 10 ? 2 : 0);
      $("finished").textContent = live.finished;
      lastFinished = live.finished;
      drawFinished();
      var depth = live.queue_depth;
      $("q-interactive").textContent = depth ? depth.interactive : "?";
      $("q-bulk").textContent = depth ? depth.bulk : "?";
      $("workers-alive").textContent = live.workers_alive === null ? "?" : live.workers_alive;
      var list = $("workers");
      list.replaceChildren();
      if (live.workers === null) list.appendChild(el("li", {}, t("redis_down")));
      (live.workers || []).forEach(function (w) {
        var model = w.model ? w.model + shortRevision(w.revision) : w.model;
        list.appendChild(el("li", {}, [w.hostname, w.device, model].filter(Boolean).join(" · ")));
      });
      drawTrend(live.per_minute || []);
    });
  }

  // ---- label mix chart ----------------------------------------------------
  // Series order: labels by code unit, then no label, then the other labels' sum.
  function seriesOrder(a, b) {
    var ra = a === OTHER ? 2 : a === null ? 1 : 0, rb = b === OTHER ? 2 : b === null ? 1 : 0;
    if (ra !== rb) return ra - rb;
    return a === b ? 0 : a < b ? -1 : 1;
  }

  function seriesName(key, values) {
    if (key === OTHER) return values ? tn("n_other_labels", values) : t("other_labels");
    return key === null ? t("no_label") : key;
  }

  function seriesAttrs(key, attrs) {
    if (key === OTHER) attrs["data-other"] = "true";
    else if (key === null) attrs["data-none"] = "true";
    else attrs["data-label"] = key;
    return attrs;
  }

  // groups: /v1/stats's groups (one label in one bucket); other: its per-bucket sums of
  // the labels past the limit.
  function drawChart(groups, other, r) {
    var svg = $("chart");
    svg.replaceChildren();
    // Day buckets leave room at the top for their note, clear of the tallest bar.
    var W = 800, H = 260, left = 44, bottom = 22, top = r.step >= DAY_MS ? 20 : 8;
    var buckets = [];
    for (var b = r.sinceMs; b <= r.untilMs; b += r.step) buckets.push(b);
    var byBucket = new Map(), totals = new Map(), keys = [];
    function add(bucket, key, count, values) {
      var at = Date.parse(bucket);
      if (!byBucket.has(at)) byBucket.set(at, []);
      byBucket.get(at).push({ key: key, count: count, values: values });
      if (!totals.has(key)) { totals.set(key, 0); keys.push(key); }
      totals.set(key, totals.get(key) + count);
    }
    groups.forEach(function (g) { add(g.bucket, g.label, g.count); });
    other.forEach(function (g) { add(g.bucket, OTHER, g.count, g.values); });
    keys.sort(seriesOrder);
    var max = 1;
    buckets.forEach(function (k) {
      var sum = (byBucket.get(k) || []).reduce(function (a, p) { return a + p.count; }, 0);
      max = Math.max(max, sum);
    });
    var plotH = H - bottom - top, slot = (W - left) / buckets.length;
    svg.appendChild(el("svg:line", { x1: left, y1: H - bottom, x2: W, y2: H - bottom, "class": "axis" }));
    // Lines at 0, half and the top; half of an odd top is no count: that line is unnamed.
    [0, 0.5, 1].forEach(function (f) {
      var y = H - bottom - f * plotH;
      svg.appendChild(el("svg:line", { x1: left, y1: y, x2: W, y2: y, "class": "axis" }));
      if (f * max !== Math.floor(f * max)) return;
      svg.appendChild(el("svg:text", { x: left - 4, y: y + 4, "text-anchor": "end" }, f * max));
    });
    buckets.forEach(function (k, i) {
      var y = H - bottom;
      var parts = (byBucket.get(k) || []).slice().sort(function (a, c) { return seriesOrder(a.key, c.key); });
      parts.forEach(function (p) {
        var h = (p.count / max) * plotH;
        y -= h;
        var rect = el("svg:rect", seriesAttrs(p.key, { x: left + i * slot + slot * 0.1, y: y,
          width: Math.max(slot * 0.8, 1), height: h, fill: colorOf(p.key), "class": "bar",
          "data-count": p.count, "data-bucket": new Date(k).toISOString() }));
        rect.appendChild(el("svg:title", {}, bucketText(k, r, true) + " · " +
          seriesName(p.key, p.values) + ": " + p.count));
        svg.appendChild(rect);
      });
    });
    var ticks = Math.min(6, buckets.length);
    for (var j = 0; j < ticks; j++) {
      var idx = Math.floor(j * (buckets.length - 1) / Math.max(ticks - 1, 1));
      // The last tick ends at the chart's edge rather than running past it.
      var last = j === ticks - 1 && ticks > 1;
      svg.appendChild(el("svg:text", { x: last ? W : left + idx * slot + slot / 2, y: H - 6,
        "text-anchor": last ? "end" : "middle", "class": "tick" }, bucketText(buckets[idx], r, false)));
    }
    if (r.step >= DAY_MS) {
      svg.appendChild(el("svg:text", { x: W, y: 12, "text-anchor": "end", "class": "note" },
        t("utc_days")));
    }
    if (!keys.length) {
      svg.appendChild(el("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, t("no_data")));
    }
    var legend = $("legend");
    legend.replaceChildren();
    var all = keys.reduce(function (a, l) { return a + totals.get(l); }, 0);
    keys.forEach(function (l) {
      var item = el("li", seriesAttrs(l, { "data-count": totals.get(l) }));
      var swatch = el("i");
      swatch.style.background = colorOf(l);
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(seriesName(l) + " " + totals.get(l) + " (" +
        Math.round(100 * totals.get(l) / all) + "%)"));
      legend.appendChild(item);
    });
  }

  // The label and source fields offer the values known (a datalist: the chart's top 100
  // labels of its range, the first sources) and take any other typed: a label summed in
  // "other labels", a source past the list, are still ones to filter on.
  var offered = new Map();
  function keepOffered(id, values) {
    var key = values.join("\n");
    if (offered.get(id) === key) return;
    offered.set(id, key);
    var list = $(id + "-options");
    list.replaceChildren.apply(list, values.map(function (v) { return el("option", { value: v }); }));
  }

  // The field's value as a filter, or why the API would refuse it (`problem`, a function
  // that words it in the page's language); the field is marked invalid meanwhile.
  function filterValue(id) {
    var value = applied.get(id), max = FIELD_MAX.get(id), problem = null;
    if (value.indexOf("\u0000") >= 0) {
      problem = function () { return t(id + "_nul"); };
    } else if (Array.from(value).length > max) {
      problem = function () { return t(id + "_long").replace("{n}", max); };
    }
    if ($(id).setCustomValidity) $(id).setCustomValidity(problem ? problem() : "");
    return { value: value, problem: problem };
  }

  // The first refused filter among `ids`, as an error to throw (null when all are good).
  function refused(ids) {
    for (var i = 0; i < ids.length; i++) {
      var got = filterValue(ids[i]);
      if (got.problem) return localized(got.problem);
    }
    return null;
  }

  // Every chart read covers the whole range: an ended bucket can still change (a re-score
  // moves a task's latest row to a later bucket, a retried failure turns done, `db delete`
  // removes rows), so counts kept from an earlier read would be counted twice or stale.
  // A range in hourly or daily buckets is a larger aggregate, read at most every SLOW_MS.
  var SLOW_MS = 60 * 1000;
  var mixRead = null;

  // The age of a read is measured on the monotonic clock: a browser clock ahead of the
  // server's must not make the last read look younger than it is.
  function refreshChart(force, run) {
    var r = range();
    var source = applied.get("source");
    var sources = api("/v1/sources", { limit: SOURCES_OFFERED }, run.signal).then(function (s) {
      if (run.current()) keepOffered("source", s.sources);
    });
    var bad = refused(["source"]);
    if (bad) return Promise.all([sources, Promise.reject(bad)]);
    var key = [source, r.bucket, r.step].join("|");
    var asked = monotonic();
    var age = mixRead ? asked - mixRead.at : Infinity;
    if (!force && mixRead && mixRead.key === key && r.step > 60000 && age >= 0 && age < SLOW_MS) {
      return sources;
    }
    var mix = api("/v1/stats", { by: "label", bucket: r.bucket, since: r.since, source: source,
      limit: STATS_LIMIT }, run.signal)
      .then(function (s) {
        if (!run.current()) return;
        mixRead = { key: key, at: asked };
        var groups = s.groups, other = s.other || [];
        lastChart = { key: [groups, other, r.sinceMs], args: [groups, other, r] };
        if (changed("chart", lastChart.key)) drawChart(groups, other, r);
        var labels = new Set();
        groups.forEach(function (g) { if (g.label !== null) labels.add(g.label); });
        keepOffered("label", Array.from(labels).sort());
      }, function (e) {
        if (run.current()) mixRead = null;  // the next refresh reads the chart again
        throw e;
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
    }).catch(function (e) { showError(e); });
  }

  // A text is clamped to a few lines; a click (or Enter) shows it whole, across refreshes.
  function toggleText(event) {
    if (event.type === "keydown" && event.key !== "Enter" && event.key !== " ") return;
    if (event.type === "keydown") event.preventDefault();
    var box = event.currentTarget, id = box.getAttribute("data-for");
    var open = box.getAttribute("aria-expanded") !== "true";
    box.setAttribute("aria-expanded", String(open));
    if (open) openTexts.add(id); else openTexts.delete(id);
  }

  function textCell(row) {
    var text = row.text === null ? (row.reason || "") : row.text;
    var td = el("td", { "data-th": t("text"), "class": "text", dir: "auto" });
    var box = el("div", { "class": "clamp", dir: "auto", title: text, role: "button", tabindex: "0",
      "aria-expanded": String(openTexts.has(row.id)), "data-for": row.id }, text);
    box.addEventListener("click", toggleText);
    box.addEventListener("keydown", toggleText);
    td.appendChild(box);
    return td;
  }

  function drawTable(items) {
    var tbody = $("results").tBodies[0];
    tbody.replaceChildren();
    var shown = new Set();
    items.forEach(function (row) {
      shown.add(row.id);
      var tr = el("tr", { "data-id": row.id });
      tr.appendChild(el("td", { "data-th": t("finished_at"), "class": "time" },
        new Date(row.finished_at).toLocaleString(locale())));
      var idCell = el("td", { "data-th": "id", "class": "id" });
      var link = el("a", { href: "/v1/tasks/" + encodeURIComponent(row.id), target: "_blank",
        rel: "noopener" }, row.id);
      link.addEventListener("click", showJson);
      idCell.appendChild(link);
      tr.appendChild(idCell);
      var sourceCell = el("td", { "data-th": t("source"), "class": "source" });
      if (row.source) {
        sourceCell.appendChild(el("div", { "class": "clamp short", dir: "auto", title: row.source },
          row.source));
      }
      tr.appendChild(sourceCell);
      var labelCell = el("td", { "data-th": t("label"), "class": "label" });
      var tag = el("span", { "class": "tag", dir: "auto", title: row.label || row.status },
        row.label || row.status);
      tag.style.background = row.label ? colorOf(row.label) : NO_LABEL_COLOR;
      labelCell.appendChild(tag);
      tr.appendChild(labelCell);
      tr.appendChild(el("td", { "data-th": t("score"), "class": "num" },
        row.score === null ? "" : row.score.toFixed(3)));
      tr.appendChild(textCell(row));
      tbody.appendChild(tr);
    });
    openTexts.forEach(function (id) { if (!shown.has(id)) openTexts.delete(id); });
    $("empty").hidden = items.length > 0;
  }

  var tableReadAt = null;
  // Paging: the cursors of the pages past the first that Older opened (the last one is
  // shown), the rows shown before each of them (null: not known, a page opened from a
  // link), and the cursor of the page after the one shown (null: none). Each is a keyset
  // position, so a page stays put while new rows arrive; a filter applied goes back to
  // the first page. A text search's page may hold fewer rows than PAGE_ROWS (or none):
  // its next page then reads the rows older than those it read (`scan_ended`).
  var PAGE_ROWS = 50;
  var cursors = [];
  var shownBefore = [];
  var nextCursor = null;
  var pageRows = 0;
  var scanEnded = false;
  var scanRead = 0;

  function rowsBefore() { return cursors.length ? shownBefore[shownBefore.length - 1] : 0; }

  function drawPager() {
    var before = rowsBefore();
    var focused = document.activeElement === $("older");
    $("newer").hidden = cursors.length === 0;
    $("older").hidden = !nextCursor;
    $("page").textContent = !pageRows ? "" : before === null ? tn("page_linked", pageRows)
      : pageRows === 1 ? t("page_row").replace("{a}", before + 1)
        : t("page_rows").replace("{a}", before + 1).replace("{b}", before + pageRows);
    $("pager").hidden = $("newer").hidden && $("older").hidden;
    // A text search that ran out of rows to read before the page filled says so: Older
    // reads on from there (no Older: the rows read were all the range holds).
    $("scan-note").textContent = scanEnded ? tn("scan_ended", pageRows).split("{scan}")
      .join(Number(scanRead).toLocaleString(locale())) : "";
    $("scan-note").hidden = !scanEnded;
    // A keyboard user on the last page keeps a focus: from Older (gone) to Newer.
    if (focused && $("older").hidden && !$("newer").hidden) {
      $("newer").focus();
    }
  }

  function refreshTable(run) {
    var r = range();
    var id = applied.get("id");
    var label = applied.get("label");
    // A filter the API would refuse is refused here, saying why, with no request.
    var bad = refused(["source", "label"]);
    if (bad) return Promise.reject(bad);
    // An id is looked up whatever the time range.
    return api("/v1/search", { q: applied.get("q"), id: id, label: label,
      source: applied.get("source"), since: id ? "" : r.since, limit: PAGE_ROWS,
      cursor: cursors.length ? cursors[cursors.length - 1] : "" }, run.signal)
      .then(function (body) {
        if (!run.current()) return;
        tableReadAt = new Date();
        lastTable = body.items;
        nextCursor = body.next_cursor || null;
        pageRows = body.items.length;
        scanEnded = !!body.scan_ended && !!nextCursor;
        scanRead = body.scan;
        drawPager();
        if (changed("table", body.items)) drawTable(body.items);
      });
  }

  // ---- polling ------------------------------------------------------------
  // A part's read: on success it is current again; on failure what it shows is marked
  // stale (the table says since when) and the error goes on.
  function part(name, run, read) {
    return read.then(function () {
      if (!run.current()) return;
      markStale(name, false);
      if (name === "table") drawStale(false);
    }, function (e) {
      if (run.current()) {
        markStale(name, true);
        if (name === "table") drawStale($("results").tBodies[0].children.length > 0 && !!tableReadAt);
      }
      throw e;
    });
  }

  // The note over rows a failed refresh left on screen: since when they are.
  function drawStale(shown) {
    $("stale").textContent = shown ? t("stale").replace("{t}",
      tableReadAt.toLocaleTimeString(locale())) : "";
    $("stale").hidden = !shown;
  }

  function drawUpdated() {
    if (updatedAt) $("updated").textContent = t("updated") + " " + updatedAt.toLocaleTimeString(locale());
  }

  // A switch of language words at once what the page shows from its last answers: it does
  // not wait for the next refresh, which may fail or hang.
  function redrawInLanguage() {
    if (lastChart && changed("chart", lastChart.key)) drawChart.apply(null, lastChart.args);
    if (lastTable && changed("table", lastTable)) drawTable(lastTable);
    drawStale(!$("stale").hidden);
    drawUpdated();
    drawFinished();
    drawPager();
    if (shownError) showError(shownError);
  }

  // ---- the URL ------------------------------------------------------------
  // The filters live in the page's URL: a reload and a shared link show the same rows.
  // A URL naming any filter (or a page) sets them all (the ones it leaves out to their
  // defaults); one naming none leaves the form as the browser restored it.
  // The page shown past the first is there too, as its cursor, not a page number: a
  // number would show other rows once new ones arrive, the cursor (a keyset position)
  // the same rows. The way back (Newer, the rows' numbers) is the history entry's state:
  // a reload keeps it; a link opened elsewhere has none, so Newer goes to the newest.
  function readUrl() {
    var params = new URLSearchParams(location.search);
    var cursor = params.get("cursor");
    if (!FILTERS.some(function (k) { return params.has(k); }) && !cursor) return;
    FILTERS.forEach(function (k) {
      var value = params.get(k) || "";
      if (k === "range") value = own(RANGES, value) ? value : DEFAULT_RANGE;
      $(k).value = value;
    });
    if (!cursor) return;
    var state = typeof history !== "undefined" ? history.state : null;
    var kept = state && Array.isArray(state.cursors) && Array.isArray(state.before) &&
      state.cursors.length > 0 && state.cursors.length === state.before.length &&
      state.cursors[state.cursors.length - 1] === cursor;
    cursors = kept ? state.cursors.slice() : [cursor];
    shownBefore = kept ? state.before.slice() : [null];
  }

  function applyForm() {
    FILTERS.forEach(function (k) {
      var value = $(k).value || "";
      applied.set(k, k === "q" || k === "id" ? value.trim() : value);
    });
  }

  function writeUrl() {
    if (typeof history === "undefined" || !history.replaceState || !location.pathname) return;
    var params = new URLSearchParams(location.search);
    FILTERS.forEach(function (k) {
      var value = applied.get(k);
      if (value && !(k === "range" && value === DEFAULT_RANGE)) params.set(k, value);
      else params.delete(k);
    });
    if (cursors.length) params.set("cursor", cursors[cursors.length - 1]);
    else params.delete("cursor");
    var query = params.toString();
    var url = location.pathname + (query ? "?" + query : "") + (location.hash || "");
    var state = { cursors: cursors.slice(), before: shownBefore.slice() };
    if (url !== location.pathname + location.search + (location.hash || "") ||
        JSON.stringify(state) !== JSON.stringify(history.state)) {
      history.replaceState(state, "", url);
    }
  }

  function schedule(run) {
    if (!run.current()) return;
    clearTimeout(timer);
    timer = setTimeout(tick, REFRESH_MS);
  }

  function refresh(force) {
    var mine = ++runs;
    clearTimeout(timer);
    timer = null;
    if (inflight) inflight.abort();
    inflight = typeof AbortController === "function" ? new AbortController() : null;
    var run = { signal: inflight ? inflight.signal : undefined,
      current: function () { return mine === runs; } };
    var errors = [];
    function settled(read) { return read.catch(function (e) { errors.push(e); }); }
    var live = settled(part("live", run, refreshLive(run)));
    // The chart and the table read a time range of the server's clock: the first refresh
    // learns it from /v1/live before it asks.
    var rest = (skewKnown ? Promise.resolve() : live).then(function () {
      if (!run.current()) return null;
      return Promise.all([settled(part("chart", run, refreshChart(force === true, run))),
        settled(part("table", run, refreshTable(run)))]);
    });
    return Promise.all([live, rest]).then(function () {
      if (!run.current()) return;
      if (errors.length) {
        showError(errors[0]);
      } else {
        showError(null);
        updatedAt = new Date();
        drawUpdated();
        document.body.setAttribute("data-refreshed", String(Date.now()));
      }
      schedule(run);
    });
  }

  function tick() {
    timer = null;
    if (document.hidden) { timer = setTimeout(tick, REFRESH_MS); } else { refresh(false); }
  }
  function now() { writeUrl(); refresh(true); }
  // A filter applied: its rows from the newest.
  function applyFilters() {
    applyForm();
    cursors = [];
    shownBefore = [];
    now();
  }

  $("lang").addEventListener("click", function () {
    lang = lang === "zh" ? "en" : "zh";
    localStorage.setItem(LANG_KEY, lang);
    applyLang();
    redrawInLanguage();
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
  $("search").addEventListener("submit", function (e) { e.preventDefault(); applyFilters(); });
  ["source", "range", "label"].forEach(function (id) { $(id).addEventListener("change", applyFilters); });
  $("older").addEventListener("click", function () {
    if (!nextCursor) return;
    var before = rowsBefore();
    shownBefore.push(before === null ? null : before + pageRows);
    cursors.push(nextCursor);
    nextCursor = null;  // a second click before the answer opens no page past it
    now();
  });
  $("newer").addEventListener("click", function () {
    cursors.pop();
    shownBefore.pop();
    now();
  });
  // Enter applies the source typed (the label's is the search form's submit).
  $("source").addEventListener("keydown", function (e) {
    if (e.key !== "Enter") return;
    e.preventDefault();
    applyFilters();
  });
  document.addEventListener("visibilitychange", function () { if (!document.hidden) now(); });

  readUrl();
  applyForm();
  applyLang();
  drawFinished();
  now();
})();
