// The Sluice dashboard: a client of the admin API, nothing else. The token is kept in
// sessionStorage (this tab only) and sent in the Authorization header; it is never put in
// a URL. Live figures come from GET /v1/admin/stats/stream (server-sent events) read with
// fetch(), since EventSource cannot send a header.
"use strict";

const API = "/v1/admin";
const TOKEN_KEY = "sluice.token";
const HISTORY = 120; // points (seconds) in the charts
const RECONNECT_MS = 2000;

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));
const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = { allowed: "#15803d", limited: "#b91c1c", shadow: "#b45309" };

const session = {
  token: null,
  role: null,
  version: null,
  stream: null, // AbortController of the open stream
  history: [], // {allowed, limited, shadow}
  ruleHistory: new Map(), // rule -> [{allowed, limited}]
};

// --- The API ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${session.token}` };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(API + path, init);
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch (_) {
    json = null;
  }
  if (!response.ok) throw new ApiError(response.status, json);
  return json;
}

// --- Small DOM helpers ------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attributes = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function fillBody(table, rows) {
  const body = $("tbody", table);
  body.replaceChildren(...rows);
}

function num(value) {
  return el("td", { class: "num", text: String(value) });
}

// --- Sign in ----------------------------------------------------------------------------

async function signIn(token) {
  session.token = token;
  const who = await api("GET", "/whoami");
  session.role = who.role;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#who").textContent = `${who.name} (${who.role})`;
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#logout").hidden = false;
  applyRole();
  await loadConfiguration();
  openStream();
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  session.token = null;
  session.role = null;
  if (session.stream) session.stream.abort();
  session.stream = null;
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#logout").hidden = true;
  $("#who").textContent = "";
  setConnection("not connected", "");
}

/// The read role sees everything and changes nothing: every form and button that changes
/// something is disabled.
function applyRole() {
  const readOnly = session.role !== "admin";
  document.body.dataset.role = session.role || "";
  for (const fieldset of $$("#manage form fieldset")) fieldset.disabled = readOnly;
  for (const button of $$(".admin-only")) button.disabled = readOnly;
  $(".read-only-note").hidden = !readOnly;
}

// --- Errors next to their fields --------------------------------------------------------

function clearErrors(form) {
  for (const slot of $$(".field-error", form)) slot.textContent = "";
  for (const input of $$("[aria-invalid]", form)) input.removeAttribute("aria-invalid");
}

/// Shows an API error next to the field it names (`window`, `match.path_prefix`), or under
/// the form when no field of the form has that name.
function showError(form, error) {
  const field = (error.body && error.body.field) || "";
  const message = error.body && error.body.message ? error.body.message : error.message;
  let slot = field ? $(`.field-error[data-error-for="${CSS.escape(field)}"]`, form) : null;
  // `match.methods[1]` is about the methods field.
  if (!slot && field) {
    const base = field.replace(/\[\d+\]$/, "");
    slot = $(`.field-error[data-error-for="${CSS.escape(base)}"]`, form);
  }
  const input = slot ? $(`[data-field="${CSS.escape(slot.dataset.errorFor)}"]`, form) : null;
  if (!slot) slot = $('.field-error[data-error-for=""]', form);
  slot.textContent = field && !input ? `${field}: ${message}` : message;
  slot.dataset.errorCode = (error.body && error.body.error) || "";
  if (input) input.setAttribute("aria-invalid", "true");
}

// --- Forms ------------------------------------------------------------------------------

/// The body a form stands for: fields by their `data-field` (dots make nested objects),
/// empty ones left out. An integer field whose text is not a number is sent as the text,
/// so that the API says what is wrong with it, as it does for every other client.
function formBody(form) {
  const body = {};
  for (const input of $$("[data-field]", form)) {
    const path = input.dataset.field.split(".");
    let value;
    switch (input.dataset.type) {
      case "bool":
        if (!input.checked) continue;
        value = true;
        break;
      case "integer": {
        const text = input.value.trim();
        if (text === "") continue;
        value = /^-?\d+$/.test(text) ? Number(text) : text;
        break;
      }
      case "list": {
        const items = input.value.split(",").map((s) => s.trim()).filter((s) => s !== "");
        if (items.length === 0) continue;
        value = items;
        break;
      }
      default:
        value = input.value.trim();
        if (value === "") continue;
    }
    let target = body;
    for (const key of path.slice(0, -1)) target = target[key] = target[key] || {};
    target[path[path.length - 1]] = value;
  }
  return body;
}

function fillForm(form, entity) {
  for (const input of $$("[data-field]", form)) {
    let value = entity;
    for (const key of input.dataset.field.split(".")) value = value == null ? undefined : value[key];
    if (input.dataset.type === "bool") input.checked = Boolean(value);
    else if (input.dataset.type === "list") input.value = Array.isArray(value) ? value.join(", ") : "";
    else if (input.tagName === "SELECT") input.value = value == null ? input.options[0].value : String(value);
    else input.value = value == null ? "" : String(value);
  }
}

/// What an edit sends: the entity as it was, with every field the form shows replaced by
/// the form's value (or removed, when the form leaves it empty). Fields the form does not
/// show (a rule's penalty, lease, cost, failure mode, other match fields) are kept: the API
/// replaces the whole entity.
function editedBody(form, original, body) {
  const result = structuredClone(original);
  for (const input of $$("[data-field]", form)) {
    const path = input.dataset.field.split(".");
    let parent = result;
    for (const key of path.slice(0, -1)) parent = parent == null ? undefined : parent[key];
    if (parent != null) delete parent[path[path.length - 1]];
  }
  for (const [key, value] of Object.entries(body)) {
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      result[key] = { ...(result[key] || {}), ...value };
    } else {
      result[key] = value;
    }
  }
  // A match left with no field at all is no match.
  if (result.match && Object.keys(result.match).length === 0) delete result.match;
  return result;
}

function resetForm(form) {
  form.reset();
  delete form.dataset.editing;
  form.editingEntity = undefined;
  const name = $('[data-field="name"]', form);
  if (name) name.readOnly = false;
  const mode = $(".mode", form);
  if (mode) mode.textContent = "(new)";
  clearErrors(form);
}

function editInForm(form, entity, key) {
  resetForm(form);
  fillForm(form, entity);
  form.dataset.editing = key;
  // Rules and tiers are read and written whole; an API key's edit is its form's fields.
  if (form.id !== "key-form") form.editingEntity = entity;
  const name = $('[data-field="name"]', form);
  // Rules and tiers are renamed by delete and create; a key's name is only a label.
  if (name && form.id !== "key-form") name.readOnly = true;
  $(".mode", form).textContent = `(editing ${key})`;
  form.scrollIntoView({ block: "nearest" });
}

/// A button that asks once more before it deletes.
function deleteButton(label, onConfirmed) {
  const button = el("button", { type: "button", class: "admin-only delete", text: "delete", "data-target": label });
  button.disabled = session.role !== "admin";
  button.addEventListener("click", async () => {
    if (button.dataset.armed !== "1") {
      button.dataset.armed = "1";
      button.textContent = "really delete?";
      return;
    }
    try {
      await onConfirmed();
      await loadConfiguration();
    } catch (error) {
      button.textContent = error.message;
    }
  });
  return button;
}

function editButton(onClick) {
  const button = el("button", { type: "button", class: "admin-only edit", text: "edit", onclick: onClick });
  button.disabled = session.role !== "admin";
  return button;
}

function wireForm(form, submit) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    form.dataset.state = "sending";
    try {
      const body = formBody(form);
      const editing = form.dataset.editing;
      await submit(editing && form.editingEntity ? editedBody(form, form.editingEntity, body) : body, editing);
      resetForm(form);
      form.dataset.state = "saved";
      await loadConfiguration();
    } catch (error) {
      form.dataset.state = "refused";
      if (error instanceof ApiError) showError(form, error);
      else showError(form, new ApiError(0, { message: String(error) }));
    }
  });
  const cancel = $(".cancel", form);
  if (cancel) cancel.addEventListener("click", () => resetForm(form));
}

// --- The configuration ------------------------------------------------------------------

function describeMatch(match) {
  if (!match) return "";
  return Object.entries(match)
    .map(([key, value]) => `${key}=${Array.isArray(value) ? value.map((v) => (typeof v === "object" ? JSON.stringify(v) : v)).join(",") : value}`)
    .join(" ");
}

async function loadConfiguration() {
  const [rules, tiers, keys, denylist, safelist, version] = await Promise.all([
    api("GET", "/rules"),
    api("GET", "/tiers"),
    api("GET", "/api-keys"),
    api("GET", "/lists/denylist"),
    api("GET", "/lists/safelist"),
    api("GET", "/version"),
  ]);
  session.version = version.version;
  $("#version").textContent = `version ${version.version}`;
  fillBody(
    $("#rules"),
    rules.map((rule) =>
      el(
        "tr",
        { "data-rule": rule.name },
        el("td", { text: rule.name }),
        el("td", { text: rule.strategy || "fixed_window" }),
        el("td", { text: rule.scope || "client" }),
        num(rule.limit),
        el("td", { text: rule.window || "" }),
        el("td", { text: describeMatch(rule.match) }),
        el(
          "td",
          {},
          editButton(() => editInForm($("#rule-form"), rule, rule.name)),
          deleteButton(rule.name, () => api("DELETE", `/rules/${encodeURIComponent(rule.name)}`)),
        ),
      ),
    ),
  );
  fillBody(
    $("#tiers"),
    tiers.map((tier) =>
      el(
        "tr",
        { "data-tier": tier.name },
        el("td", { text: tier.name }),
        num(tier.limit),
        el("td", { text: tier.window || "" }),
        el("td", { text: tier.burst == null ? "" : String(tier.burst) }),
        el("td", { text: tier.description || "" }),
        el(
          "td",
          {},
          editButton(() => editInForm($("#tier-form"), tier, tier.name)),
          deleteButton(tier.name, () => api("DELETE", `/tiers/${encodeURIComponent(tier.name)}`)),
        ),
      ),
    ),
  );
  fillBody(
    $("#api-keys"),
    keys.map((key) =>
      el(
        "tr",
        { "data-key": key.sha256 },
        el("td", { text: key.name || "" }),
        el("td", { text: key.user || "" }),
        el("td", { text: key.tier || "" }),
        el("td", {}, el("code", { text: key.sha256 })),
        el("td", { text: key.created_at || "" }),
        el(
          "td",
          {},
          editButton(() => editInForm($("#key-form"), key, key.sha256)),
          deleteButton(key.sha256, () => api("DELETE", `/api-keys/${key.sha256}`)),
        ),
      ),
    ),
  );
  const entries = [...denylist, ...safelist];
  fillBody(
    $("#list-entries"),
    entries.map((item) =>
      el(
        "tr",
        { "data-entry": item.id },
        el("td", { text: item.list }),
        el("td", { text: item.entry.kind }),
        el("td", { text: item.entry.value }),
        el("td", { text: item.entry.expires_at || "never" }),
        el("td", { text: item.entry.reason || "" }),
        el("td", {}, deleteButton(item.id, () => api("DELETE", `/lists/${item.list}/${item.id}`))),
      ),
    ),
  );
  await loadAudit();
}

async function loadAudit() {
  try {
    const audit = await api("GET", "/audit?limit=15");
    fillBody(
      $("#audit"),
      audit.entries.map((entry) =>
        el(
          "tr",
          {},
          el("td", { text: entry.at }),
          el("td", { text: entry.actor }),
          el("td", { text: entry.action }),
          el("td", {}, el("code", { text: entry.target })),
          el("td", { text: `${entry.version_before} → ${entry.version_after}` }),
        ),
      ),
    );
  } catch (error) {
    fillBody($("#audit"), [el("tr", {}, el("td", { colspan: "5", text: error.message }))]);
  }
}

// --- Live: the stream -------------------------------------------------------------------

function setConnection(text, kind) {
  const badge = $("#connection");
  badge.textContent = text;
  badge.className = `badge ${kind}`;
}

/// Reads the stats stream until it ends, then opens it again after a pause (the controller
/// restarted, the network went away); stops for good when the token is refused.
async function openStream() {
  if (session.stream) session.stream.abort();
  const controller = new AbortController();
  session.stream = controller;
  while (!controller.signal.aborted) {
    try {
      const response = await fetch(`${API}/stats/stream`, {
        headers: { Authorization: `Bearer ${session.token}`, Accept: "text/event-stream" },
        cache: "no-store",
        signal: controller.signal,
      });
      if (response.status === 401) {
        signOut();
        return;
      }
      if (!response.ok || !response.body) {
        let message = `HTTP ${response.status}`;
        try {
          message = (await response.json()).message || message;
        } catch (_) {
          /* not JSON */
        }
        setConnection(`no stream: ${message}`, "down");
      } else {
        setConnection("live", "live");
        await readEvents(response.body, controller.signal);
        if (!controller.signal.aborted) setConnection("reconnecting", "down");
      }
    } catch (error) {
      if (controller.signal.aborted) return;
      setConnection("reconnecting", "down");
    }
    await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
  }
}

async function readEvents(body, signal) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (!signal.aborted) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
      if (name === "stats" && data.length > 0) {
        try {
          onStats(JSON.parse(data.join("\n")));
        } catch (error) {
          console.error("a stats event could not be shown", error);
        }
      }
    }
  }
}

function onStats(event) {
  const seconds = Math.max(event.rates.interval_ms, 1) / 1000;
  const point = {
    allowed: event.rates.allowed / seconds,
    limited: event.rates.limited / seconds,
    shadow: event.rates.shadow_limited / seconds,
    raw: event.rates,
  };
  session.history.push(point);
  if (session.history.length > HISTORY) session.history.shift();
  for (const rule of event.stats.rules) {
    if (!session.ruleHistory.has(rule.rule)) session.ruleHistory.set(rule.rule, []);
  }
  for (const [rule, history] of session.ruleHistory) {
    const rate = event.rates.rules.find((r) => r.rule === rule);
    history.push({ allowed: rate ? rate.allowed / seconds : 0, limited: rate ? rate.limited / seconds : 0 });
    if (history.length > HISTORY) history.shift();
  }
  $("#rate-allowed").textContent = point.allowed.toFixed(1);
  $("#rate-limited").textContent = point.limited.toFixed(1);
  $("#rate-shadow").textContent = point.shadow.toFixed(1);
  drawChart($("#chart-overall"), session.history, [
    ["allowed", COLORS.allowed],
    ["limited", COLORS.limited],
    ["shadow", COLORS.shadow],
  ]);
  // The decisions the chart covers, as counted (not per second): for whoever reads the page.
  const chart = $("#chart-overall");
  for (const [key, field] of [["Allowed", "allowed"], ["Limited", "limited"], ["Shadow", "shadow_limited"]]) {
    chart.dataset[`count${key}`] = String(session.history.reduce((sum, p) => sum + p.raw[field], 0));
  }
  showRules(event);
  showTop($("#top-limited"), event.stats.top_limited);
  showTiers(event.stats.tiers);
  showUsage(event.stats);
  showState(event.state);
  showHints(event.hints);
  if (session.version !== null && event.version !== session.version) {
    session.version = event.version;
    loadConfiguration().catch((error) => console.error(error));
  }
}

/// A line per series over the points, scaled to the largest value shown; the sums of what
/// is shown are kept on the element (`data-sum-allowed`…) for whoever reads the page.
function drawChart(node, points, series, width = 600, height = 160) {
  const max = Math.max(1, ...points.flatMap((p) => series.map(([key]) => p[key])));
  const step = width / Math.max(HISTORY - 1, 1);
  const offset = (HISTORY - points.length) * step;
  const children = [];
  if (!node.classList.contains("spark")) {
    for (const fraction of [0.25, 0.5, 0.75, 1]) {
      const y = height - fraction * (height - 12);
      children.push(svg("line", { x1: 0, x2: width, y1: y, y2: y, stroke: "#e4e4e7", "stroke-width": 1 }));
    }
    const label = svg("text", { x: 4, y: 11, "font-size": 10, fill: "#52525b" });
    label.textContent = `${max.toFixed(max < 10 ? 1 : 0)}/s`;
    children.push(label);
  }
  for (const [key, color] of series) {
    const coordinates = points
      .map((p, i) => `${(offset + i * step).toFixed(1)},${(height - (p[key] / max) * (height - 12)).toFixed(1)}`)
      .join(" ");
    children.push(
      svg("polyline", { points: coordinates, fill: "none", stroke: color, "stroke-width": 2, "data-series": key }),
    );
    node.dataset[`sum${key[0].toUpperCase()}${key.slice(1)}`] = String(points.reduce((sum, p) => sum + p[key], 0));
  }
  node.dataset.points = String(points.length);
  node.replaceChildren(...children);
}

function showRules(event) {
  const rows = [];
  const names = new Set([...event.stats.rules.map((r) => r.rule), ...event.rates.rules.map((r) => r.rule)]);
  const seconds = Math.max(event.rates.interval_ms, 1) / 1000;
  for (const name of [...names].sort()) {
    const stats = event.stats.rules.find((r) => r.rule === name) || {};
    const rate = event.rates.rules.find((r) => r.rule === name) || { allowed: 0, limited: 0 };
    const spark = svg("svg", { viewBox: "0 0 120 24", preserveAspectRatio: "none", class: "spark" });
    drawChart(spark, session.ruleHistory.get(name) || [], [["allowed", COLORS.allowed], ["limited", COLORS.limited]], 120, 24);
    rows.push(
      el(
        "tr",
        { "data-rule": name },
        el("td", { text: name }),
        num((rate.allowed / seconds).toFixed(1)),
        num((rate.limited / seconds).toFixed(1)),
        el("td", {}, spark),
        num(stats.allowed || 0),
        num(stats.limited || 0),
        num(stats.shadow_limited || 0),
        num(stats.clients || 0),
        num(`${Math.round((stats.max_used_ratio || 0) * 100)} %`),
      ),
    );
  }
  fillBody($("#rules-live"), rows);
}

function showTop(list, top) {
  list.replaceChildren(
    ...top.map((hit) =>
      el(
        "li",
        { "data-client": `${hit.client.kind}:${hit.client.value}` },
        el("code", { text: `${hit.client.kind} ${hit.client.value}` }),
        ` ${hit.count}${hit.error ? ` (±${hit.error})` : ""}`,
      ),
    ),
  );
}

function showTiers(tiers) {
  fillBody(
    $("#tiers-live"),
    tiers.map((tier) => {
      const all = tier.allowed + tier.limited + tier.refused;
      return el(
        "tr",
        { "data-tier": tier.tier },
        el("td", { text: tier.tier }),
        num(tier.allowed),
        num(tier.limited),
        num(tier.refused),
        num(all ? `${Math.round((tier.limited / all) * 100)} %` : "–"),
      );
    }),
  );
}

/// Usage rules' units, per rule and per tier, and the clients that used most; the panel
/// shows only while some usage rule reserved or settled in the window.
function showUsage(stats) {
  const rows = [
    ...stats.rules.filter((r) => r.usage).map((r) => ["rule", r.rule, r.usage]),
    ...stats.tiers.filter((t) => t.usage).map((t) => ["tier", t.tier, t.usage]),
  ];
  $("#usage-panel").hidden = rows.length === 0;
  fillBody(
    $("#usage-live"),
    rows.map(([kind, name, usage]) =>
      el(
        "tr",
        { [`data-${kind}`]: name },
        el("td", { text: `${kind} ${name}` }),
        num(usage.reserved),
        num(usage.settlements),
        num(usage.returned),
        num(usage.overshoot),
        num(usage.charged),
      ),
    ),
  );
  showTop($("#top-usage"), stats.top_usage || []);
}

function showState(state) {
  const value = $("#state-value");
  value.textContent = state.state;
  value.className = state.state;
  $("#state-detail").textContent =
    `${state.automatic ? "automatic" : "pinned"}${state.state_since ? ` since ${state.state_since}` : ""}` +
    `${state.enforce ? "" : " · enforcement OFF"}`;
}

function showHints(hints) {
  const items = hints.map((hint) =>
    el("li", { "data-rule": hint.rule, "data-kind": hint.kind }, el("b", { text: hint.rule }), `: ${hint.message}`),
  );
  $("#hints").replaceChildren(...(items.length ? items : [el("li", { text: "none" })]));
}

// --- Start ------------------------------------------------------------------------------

function wire() {
  const login = $("#login-form");
  login.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(login);
    const token = login.elements.token.value.trim();
    if (!token) {
      showError(login, new ApiError(0, { field: "token", message: "give a token" }));
      return;
    }
    try {
      await signIn(token);
      login.reset();
    } catch (error) {
      session.token = null;
      showError(login, new ApiError(0, { field: "token", message: error.message }));
    }
  });
  $("#logout").addEventListener("click", signOut);

  wireForm($("#rule-form"), (body, editing) =>
    editing ? api("PUT", `/rules/${encodeURIComponent(editing)}`, body) : api("POST", "/rules", body),
  );
  wireForm($("#tier-form"), (body, editing) =>
    editing ? api("PUT", `/tiers/${encodeURIComponent(editing)}`, body) : api("POST", "/tiers", body),
  );
  wireForm($("#key-form"), async (body, editing) => {
    if (editing) return api("PUT", `/api-keys/${editing}`, body);
    const made = await api("POST", "/api-keys", body);
    if (made.key) {
      $("#new-key-value").textContent = made.key;
      $("#new-key").hidden = false;
    }
    return made;
  });
  $("#new-key-dismiss").addEventListener("click", () => {
    $("#new-key-value").textContent = "";
    $("#new-key").hidden = true;
  });
  wireForm($("#list-form"), (body) => {
    const list = body.list;
    delete body.list;
    return api("POST", `/lists/${encodeURIComponent(list)}`, body);
  });

  for (const button of [$("#state-normal"), $("#state-degraded"), $("#state-automatic")]) {
    button.addEventListener("click", async () => {
      $("#state-error").textContent = "";
      const body = button.dataset.state ? { state: button.dataset.state } : { automatic: true };
      try {
        showState(await api("PUT", "/state", body));
        await loadAudit();
      } catch (error) {
        $("#state-error").textContent = error.message;
      }
    });
  }

  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved).catch(() => signOut());
}

wire();
