// The jobs page: the list (polled every second while the tab is visible) and the submit form.
import { ACTIVE, api, el, fmtDuration, fmtNumber, mainMetric, showServer, stateBadge } from "./common.js";

const POLL_MS = 1000;
let clockOffset = 0; // the server's clock minus this browser's: elapsed times use the server's

async function refresh() {
  try {
    const { jobs, now } = await api("/v1/jobs?limit=100");
    clockOffset = now - Date.now() / 1000;
    render(jobs);
  } catch (error) {
    document.getElementById("server-status").textContent = `jobs: ${error.message}`;
  }
}

function render(jobs) {
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren(...jobs.map(row));
  document.getElementById("jobs-empty").hidden = jobs.length > 0;
}

function row(job) {
  const link = el("a", { href: `/jobs/${job.id}` }, job.name || `${job.command} ${job.args.join(" ")}`.slice(0, 80));
  const metrics = job.progress ? job.progress.metrics : job.metrics;
  const main = mainMetric(metrics);
  const cancel = ACTIVE.has(job.state) ? el("button", { type: "button", class: "danger small" }, "cancel") : "";
  if (cancel) cancel.addEventListener("click", () => cancelJob(job.id, cancel));
  return el(
    "tr",
    { dataset: { jobId: job.id, state: job.state } },
    el("td", {}, el("a", { href: `/jobs/${job.id}` }, String(job.id))),
    el("td", { class: "name" }, link),
    el("td", {}, stateBadge(job.state)),
    el("td", {}, progressCell(job)),
    el("td", { class: "wide" }, fmtDuration(elapsed(job))),
    el("td", { class: "metric" }, main ? `${main[0]} ${fmtNumber(main[1])}` : ""),
    el("td", {}, cancel),
  );
}

function elapsed(job) {
  if (!job.started_at) return null;
  return (job.finished_at || Date.now() / 1000 + clockOffset) - job.started_at;
}

function progressCell(job) {
  if (job.state === "queued") return `queued #${job.position ?? ""}`;
  const p = job.progress;
  if (!p || !p.total_steps) return p ? `step ${p.step}` : "";
  const fraction = Math.min(1, p.step / p.total_steps);
  const fill = el("div", { class: "progress-fill" });
  fill.style.width = `${(fraction * 100).toFixed(1)}%`;
  return el("div", { class: "progress mini", title: `step ${p.step} of ${p.total_steps}` }, fill,
    el("span", { class: "progress-text" }, `${p.step}/${p.total_steps}`));
}

async function cancelJob(id, button) {
  button.disabled = true;
  try {
    await api(`/v1/jobs/${id}/cancel`, { method: "POST", body: {} });
  } catch (error) {
    button.title = error.message;
  }
  refresh();
}

// --- the submit form ----------------------------------------------------------------------------
// One override a line: "--trainer.max_epochs=2", or "--trainer.max_epochs 2" (flag, then value).
export function parseOverrides(text) {
  const args = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const split = line.match(/^(--[^\s=]+)\s+(.+)$/);
    if (split) args.push(split[1], split[2]);
    else args.push(line);
  }
  return args;
}

async function setUpForm() {
  const [{ configs }, info] = await Promise.all([api("/v1/configs"), showServer()]);
  const select = document.getElementById("config");
  select.replaceChildren(...configs.map((c) => el("option", { value: c.name, dataset: { command: c.command } }, c.name)));
  const describe = () => {
    const chosen = configs.find((c) => c.name === select.value);
    document.getElementById("config-description").textContent = chosen ? chosen.description : "";
    if (chosen) document.getElementById("command").value = chosen.command;
  };
  // The quickstart's first step needs nothing else (the finetune configs need its checkpoint).
  if (configs.some((c) => c.name === "digits/pretrain-cpu")) select.value = "digits/pretrain-cpu";
  select.addEventListener("change", describe);
  describe();
  const cwd = document.getElementById("cwd");
  if (info && !cwd.value) cwd.value = info.runs_dir || "";
  document.getElementById("submit-form").addEventListener("submit", submit);
}

async function submit(event) {
  event.preventDefault();
  const error = document.getElementById("submit-error");
  const button = document.getElementById("submit");
  error.hidden = true;
  button.disabled = true;
  const value = (id) => document.getElementById(id).value;
  const body = {
    command: value("command"),
    args: ["--config", value("config"), ...parseOverrides(value("overrides"))],
    cwd: value("cwd").trim(),
    name: value("name").trim() || null,
  };
  try {
    const job = await api("/v1/jobs", { method: "POST", body });
    window.location.assign(`/jobs/${job.id}`);
  } catch (failure) {
    error.textContent = failure.message; // the server's one line: what to change
    error.hidden = false;
  } finally {
    button.disabled = false;
  }
}

async function poll() {
  if (!document.hidden) {
    await refresh();
    showServer();
  }
  setTimeout(poll, POLL_MS);
}

setUpForm();
poll();
