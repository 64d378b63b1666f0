// A line chart on a <canvas>, drawn by hand: a few kB instead of a charting library, and one
// polyline per series per frame however many points arrive (redraws are batched to animation
// frames). Points past MAX_POINTS per series are thinned to every other one, so a long job keeps
// a bounded chart in memory and the curve keeps its shape.
import { el, fmtNumber } from "./common.js";

const MAX_POINTS = 4000;
const HEIGHT = 180;
const PAD = { left: 52, right: 12, top: 10, bottom: 24 };
const COLORS = { train: "#2563eb", val: "#dc2626", test: "#7c3aed" };
const OTHER_COLORS = ["#059669", "#d97706", "#0891b2", "#be185d"];

export class LineChart {
  constructor(parent, metric) {
    this.metric = metric;
    this.series = new Map();
    this.points = 0;
    this.legend = el("span", { class: "legend" });
    this.canvas = el("canvas", { role: "img" });
    this.root = el("figure", { class: "chart", dataset: { metric, points: "0" } },
      el("figcaption", {}, el("strong", {}, metric), " ", this.legend), this.canvas);
    parent.append(this.root);
    this.pending = false;
    new ResizeObserver(() => this.schedule()).observe(this.root);
  }

  add(seriesName, x, y) {
    if (typeof x !== "number" || typeof y !== "number" || !Number.isFinite(y)) return;
    let series = this.series.get(seriesName);
    if (!series) {
      const color = COLORS[seriesName] || OTHER_COLORS[this.series.size % OTHER_COLORS.length];
      series = { xs: [], ys: [], color, stride: 1, skipped: 0 };
      this.series.set(seriesName, series);
    }
    this.points += 1;
    this.root.dataset.points = String(this.points);
    // Thinned series keep one point in `stride`, but always the newest one as its last.
    if (series.stride > 1 && series.xs.length && series.skipped < series.stride - 1) {
      series.skipped += 1;
      series.xs[series.xs.length - 1] = x;
      series.ys[series.ys.length - 1] = y;
    } else {
      series.skipped = 0;
      series.xs.push(x);
      series.ys.push(y);
    }
    if (series.xs.length > MAX_POINTS) {
      series.xs = series.xs.filter((_, i) => i % 2 === 0);
      series.ys = series.ys.filter((_, i) => i % 2 === 0);
      series.stride *= 2;
    }
    this.schedule();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    const width = Math.max(200, this.root.clientWidth);
    const ratio = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(width * ratio);
    this.canvas.height = Math.round(HEIGHT * ratio);
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${HEIGHT}px`;
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, HEIGHT);
    const all = [...this.series.values()];
    const xs = all.flatMap((s) => [s.xs[0], s.xs[s.xs.length - 1]]).filter((v) => v !== undefined);
    const ys = all.flatMap((s) => s.ys);
    this.updateLegend();
    if (!ys.length) return;
    const [x0, x1] = span(Math.min(...xs), Math.max(...xs));
    const [y0, y1] = span(minOf(ys), maxOf(ys));
    const plotW = width - PAD.left - PAD.right;
    const plotH = HEIGHT - PAD.top - PAD.bottom;
    const px = (x) => PAD.left + ((x - x0) / (x1 - x0)) * plotW;
    const py = (y) => PAD.top + (1 - (y - y0) / (y1 - y0)) * plotH;
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#6b7280";
    ctx.strokeStyle = "#e5e7eb";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const t of ticks(y0, y1, 4)) {
      ctx.beginPath();
      ctx.moveTo(PAD.left, py(t));
      ctx.lineTo(width - PAD.right, py(t));
      ctx.stroke();
      ctx.fillText(fmtNumber(t), PAD.left - 6, py(t));
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const t of ticks(x0, x1, Math.max(2, Math.floor(plotW / 90)), 1)) { // steps are whole numbers
      ctx.fillText(fmtNumber(t), px(t), HEIGHT - PAD.bottom + 6);
    }
    for (const s of all) {
      ctx.strokeStyle = s.color;
      ctx.fillStyle = s.color;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      s.xs.forEach((x, i) => (i ? ctx.lineTo(px(x), py(s.ys[i])) : ctx.moveTo(px(x), py(s.ys[i]))));
      ctx.stroke();
      if (s.xs.length < 40) {
        s.xs.forEach((x, i) => ctx.fillRect(px(x) - 2, py(s.ys[i]) - 2, 4, 4)); // sparse (val) points show
      }
    }
  }

  updateLegend() {
    const parts = [];
    for (const [name, s] of this.series) {
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = s.color; // the CSSOM, not a style attribute: the CSP allows it
      parts.push(el("span", { class: "entry", dataset: { series: name } }, swatch, `${name} ${fmtNumber(s.ys[s.ys.length - 1])}`));
    }
    this.legend.replaceChildren(...parts);
    this.canvas.setAttribute("aria-label", `${this.metric}: ${this.points} points`);
  }
}

function minOf(values) {
  return values.reduce((a, b) => (b < a ? b : a), Infinity);
}

function maxOf(values) {
  return values.reduce((a, b) => (b > a ? b : a), -Infinity);
}

function span(lo, hi) {
  if (lo === hi) return [lo - (Math.abs(lo) || 1) * 0.5, hi + (Math.abs(hi) || 1) * 0.5];
  const pad = (hi - lo) * 0.05;
  return [lo - pad, hi + pad];
}

// Round tick values ("nice numbers": 1, 2, 5 times a power of ten) inside [lo, hi].
function ticks(lo, hi, count, smallest = 0) {
  const raw = Math.max((hi - lo) / count, smallest);
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const scaled = raw / magnitude;
  const step = (scaled >= 5 ? 10 : scaled >= 2 ? 5 : scaled >= 1 ? 2 : 1) * magnitude;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Number(t.toPrecision(12)));
  return out;
}
