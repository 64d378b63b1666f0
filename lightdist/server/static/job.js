// A job's page: its facts, a live chart per logged scalar, the event log, its error and artifacts.
// The charts and the log are built from the job's event stream, which replays from the first event
// on every page load: a reload, or a finished job after a server restart, shows the whole run.
import { ACTIVE, api, el, fmtDuration, fmtNumber, fmtTime, showServer, stateBadge } from "./common.js";
import { LineChart } from "./chart.js";

const EVENT_TYPES = [
  "queued", "started", "run_start", "epoch_start", "train_batch", "validation", "epoch_end",
  "checkpoint", "run_end", "log", "interrupted", "finished",
];
// Sent for the client's progress bar (lightdist/lightning/events.py): counted with the job's events,
// not listed one row each (a validation run would fill the log with one row per batch).
const BAR_EVENTS = ["sanity_check", "train", "validation", "test", "predict"].flatMap((stage) =>
  [`${stage}_start`, `${stage}_end`, ...(stage === "train" || stage === "sanity_check" ? [] : [`${stage}_batch_start`, `${stage}_batch`])]);
const MAX_LOG_ROWS = 400; // the newest rows stay in the page; the count of the others is shown
const FILE_ARTIFACTS = new Set(["last_checkpoint", "best_checkpoint", "predictions_file"]);
const jobId = Number(window.location.pathname.split("/").filter(Boolean).pop());
const charts = new Map();
let job = null;
let info = null;
let events = 0;
let hiddenRows = 0;
let state = null;

function byId(id) {
  return document.getElementById(id);
}

// --- charts: "train_loss" and "val_loss" are the train and val curves of one chart, "loss" --------
const PREFIX = /^(train|val|valid|validation|test)[_/]/;

function chartFor(metric) {
  let chart = charts.get(metric);
  if (!chart) {
    chart = new LineChart(byId("charts"), metric);
    charts.set(metric, chart);
    byId("charts-empty").hidden = true;
  }
  return chart;
}

function plot(kind, data) {
  for (const [name, value] of Object.entries(data.metrics || {})) {
    if (name === "epoch" || name === "step") continue;
    const match = name.match(PREFIX);
    const stage = match ? (match[1] === "train" ? "train" : match[1] === "test" ? "test" : "val") : null;
    // A train_batch event repeats the last validation's metrics (they stay logged): plot each
    // metric from the event of its own stage only.
    if (kind === "train_batch" ? stage === "val" || stage === "test" : stage !== "val") continue;
    const base = match ? name.slice(match[0].length) : name;
    chartFor(base.replace(/_(step|epoch)$/, "")).add(stage || "train", data.step, value);
  }
}

// --- the page -------------------------------------------------------------------------------------
function setState(next) {
  state = next;
  stateBadge(next, byId("job-state"));
  byId("cancel").hidden = !ACTIVE.has(next);
  document.body.dataset.state = next;
}

function renderJob() {
  const title = job.name || job.command;
  byId("job-title").textContent = `#${job.id} ${title}`;
  document.title = `${title} · lightdist`;
  setState(job.state);
  const facts = [
    ["command", `lightdist ${job.command} ${job.args.join(" ")}`],
    ["directory", job.cwd],
    ["submitted", fmtTime(job.created_at)],
    ["started", fmtTime(job.started_at)],
    ["elapsed", fmtDuration(job.started_at ? (job.finished_at || Date.now() / 1000) - job.started_at : null)],
    ["attempt", job.restarts ? `${job.attempt} of ${job.restarts + 1}` : String(job.attempt)],
    ["exit code", job.exit_code ?? ""],
  ];
  byId("job-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
  renderError(job.error);
  renderArtifacts(job.artifacts || {});
  const final = Object.entries(job.metrics || {});
  byId("final-metrics").hidden = final.length === 0;
  byId("final-metrics").tBodies[0].replaceChildren(
    ...final.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, fmtNumber(v)))));
}

function renderError(error) {
  byId("error-panel").hidden = !error;
  if (!error) return;
  const where = error.rank !== null && error.rank !== undefined ? ` (rank ${error.rank})` : "";
  byId("error-message").textContent = `${error.type}${where}: ${error.message}`;
  byId("traceback").textContent = error.traceback || "(no traceback)";
}

function renderArtifacts(artifacts) {
  const entries = Object.entries(artifacts);
  byId("artifacts-panel").hidden = entries.length === 0;
  byId("artifacts").replaceChildren(...entries.map(([key, path]) => {
    const shown = FILE_ARTIFACTS.has(key)
      ? el("a", { href: `/v1/jobs/${job.id}/artifacts/${encodeURIComponent(key)}`, download: "" }, path)
      : el("code", {}, path);
    return el("li", {}, el("span", { class: "muted" }, `${key}: `), shown);
  }));
  const logDir = artifacts.log_dir;
  byId("tensorboard").hidden = !logDir;
  if (!logDir) return;
  const parent = logDir.replace(/\/[^/]+\/?$/, ""); // every version of the experiment side by side
  byId("tensorboard-command").textContent = `lightdist tensorboard --logdir ${parent}`;
  const link = byId("tensorboard-link");
  const url = info && info.tensorboard_url;
  link.hidden = !(url && /^https?:\/\//.test(url)); // never a javascript: URL
  if (!link.hidden) link.href = url;
}

function summary(kind, data) {
  const metrics = (m) => Object.entries(m || {}).filter(([k]) => k !== "epoch").map(([k, v]) => `${k}=${fmtNumber(v)}`).join(" ");
  switch (kind) {
    case "train_batch": return `step ${data.step}${data.total_steps ? `/${data.total_steps}` : ""} ${metrics(data.metrics)}`;
    case "validation": case "epoch_end": return `epoch ${data.epoch} step ${data.step} ${metrics(data.metrics)}`;
    case "log": return data.message;
    case "checkpoint": return data.checkpoint_path;
    case "finished": return `${data.state} (exit code ${data.exit_code})${data.error ? `: ${data.error.message}` : ""}`;
    default: {
      const { type, job_id, time, ...rest } = data;
      return JSON.stringify(rest).slice(0, 300);
    }
  }
}

function logEvent(id, kind, data) {
  const log = byId("event-log");
  if (BAR_EVENTS.includes(kind)) {
    countEvent(log);
    return;
  }
  log.append(el("li", { dataset: { id, type: kind } },
    el("span", { class: "muted" }, fmtTime(data.time)), " ", el("span", { class: `kind kind-${kind}` }, kind), " ",
    summary(kind, data)));
  if (log.childElementCount > MAX_LOG_ROWS) {
    log.firstElementChild.remove();
    hiddenRows += 1;
    byId("events-hidden").hidden = false;
    byId("events-hidden").textContent = `${hiddenRows} earlier events not shown`;
  }
  countEvent(log);
}

function countEvent(log) {
  events += 1;
  log.dataset.events = String(events);
  byId("events-count").textContent = `(${events})`;
}

function showProgress(data) {
  if (!data.total_steps) return;
  const bar = byId("progress");
  bar.hidden = false;
  bar.querySelector(".progress-fill").style.width = `${Math.min(100, (100 * data.step) / data.total_steps).toFixed(1)}%`;
  bar.querySelector(".progress-text").textContent = `step ${data.step} of ${data.total_steps} · epoch ${data.epoch}`;
}

function follow() {
  const source = new EventSource(`/v1/jobs/${jobId}/events`); // the login cookie authenticates it
  const status = byId("stream-status");
  const handle = (kind) => (message) => {
    const data = JSON.parse(message.data);
    logEvent(message.lastEventId, kind, data);
    if (kind === "train_batch") {
      plot(kind, data);
      showProgress(data);
    } else if (kind === "validation") {
      plot(kind, data);
    } else if (kind === "started") {
      setState("running");
    } else if (kind === "finished") {
      source.close(); // the stream is over; without this EventSource would reconnect and wait forever
      status.textContent = "";
      setState(data.state);
      loadJob();
    }
  };
  for (const kind of [...EVENT_TYPES, ...BAR_EVENTS]) source.addEventListener(kind, handle(kind));
  source.onopen = () => { status.textContent = ACTIVE.has(state) ? "live" : ""; };
  // A dropped stream reconnects by itself, with Last-Event-ID: nothing is lost or repeated.
  source.onerror = () => {
    status.textContent = source.readyState === EventSource.CLOSED ? "stream closed" : "reconnecting…";
  };
}

async function loadJob() {
  try {
    job = await api(`/v1/jobs/${jobId}`);
    renderJob();
  } catch (error) {
    byId("job-title").textContent = `job ${jobId}: ${error.message}`;
    throw error;
  }
}

byId("cancel").addEventListener("click", async () => {
  const failure = byId("cancel-error");
  byId("cancel").disabled = true;
  failure.hidden = true;
  try {
    await api(`/v1/jobs/${jobId}/cancel`, { method: "POST", body: {} });
  } catch (error) {
    failure.textContent = error.message;
    failure.hidden = false;
  } finally {
    byId("cancel").disabled = false;
  }
});

async function main() {
  info = await showServer();
  await loadJob();
  follow();
  setInterval(() => {
    if (ACTIVE.has(state)) loadJob(); // elapsed time, position in the queue
  }, 2000);
}

main();
