// Shared by the dashboard's pages: API calls, DOM building and formatting.
// Every string from the server goes into the page as text (el() uses textContent), never as markup:
// job names, metric names and tracebacks cannot become elements or scripts.

const CSRF = { "X-Lightdist-CSRF": "1" }; // cookie-authenticated writes must carry it (see _auth.py)

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function api(path, { method = "GET", body } = {}) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (method !== "GET") Object.assign(init.headers, CSRF);
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    answer = null;
  }
  if (!response.ok) {
    const message = answer && answer.message ? answer.message : `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message);
  }
  return answer;
}

// el("td", {class: "x", dataset: {id: 3}}, "text", child) — children are strings (text) or nodes.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
  const s = Math.max(0, seconds);
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

export function fmtNumber(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return String(value);
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e5)) return value.toExponential(3);
  return String(Number(value.toPrecision(4)));
}

export function fmtTime(epochSeconds) {
  if (!epochSeconds) return "";
  return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

// The metric a job is judged by: a validation accuracy, else a validation loss, else any
// validation metric, else a loss, else the first one.
export function mainMetric(metrics) {
  const names = Object.keys(metrics || {}).filter((n) => n !== "epoch" && n !== "step");
  const order = [/^val.*acc/, /^val.*loss/, /^val/, /loss/, /./];
  for (const pattern of order) {
    const name = names.find((n) => pattern.test(n));
    if (name !== undefined) return [name, metrics[name]];
  }
  return null;
}

export function stateBadge(state, node = el("span")) {
  node.className = `state state-${state}`;
  node.textContent = state;
  return node;
}

export const ACTIVE = new Set(["queued", "running"]);

// The header line: the server's layout and queue, refreshed by the page's own timer.
export async function showServer() {
  const node = document.getElementById("server-status");
  try {
    const info = await api("/v1/server");
    node.textContent = `v${info.version} · ${info.world_size} ${info.accelerator} rank(s) · pool ${info.state} · ${info.queued} queued`;
    return info;
  } catch (error) {
    node.textContent = error.status === 401 ? "not logged in: open the link lightdist serve printed" : `server: ${error.message}`;
    return null;
  }
}
