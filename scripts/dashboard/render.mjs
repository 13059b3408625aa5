// Renders a preview of the Grafana dashboard's panels as a static HTML page: every panel's
// PromQL (from the dashboard JSON) is evaluated by Prometheus's HTTP API over the time span
// the Prometheus holds, and drawn with uPlot on a 24-column grid laid out from gridPos.
// This is not Grafana; it shows what the dashboard's queries return.
//
//   node render.mjs <prometheus url> <dashboard.json> <out.html>
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const [prom, dashFile, out] = process.argv.slice(2);
if (!out) {
  console.error('usage: node render.mjs <prometheus url> <dashboard.json> <out.html>');
  process.exit(2);
}
const dashboard = JSON.parse(readFileSync(dashFile, 'utf8'));
const SCRAPE_S = 5; // preview.sh's scrape_interval

async function api(path, params) {
  const url = `${prom}/api/v1/${path}?${new URLSearchParams(params)}`;
  const res = await fetch(url);
  const body = await res.json();
  if (body.status !== 'success') throw new Error(`${url}: ${body.error}`);
  return body.data.result;
}

// The span of the recorded run: from the first to the last scrape that found the daemon up
// (the run ends with the daemon stopped; the stat panels show the last moment it ran).
async function span() {
  const now = Date.now() / 1000;
  const data = await api('query_range', {
    query: 'up{job="optout-sync"}',
    start: now - 6 * 3600,
    end: now,
    step: SCRAPE_S,
  });
  const ts = data.flatMap((s) => s.values.filter(([, v]) => v === '1').map(([t]) => t));
  if (!ts.length) throw new Error('Prometheus holds no scrape of the daemon');
  return { start: Math.min(...ts), end: Math.max(...ts) };
}

// Grafana's variables as they resolve for one instance over the whole span.
function expand(expr, step) {
  const rateInterval = Math.max(step + SCRAPE_S, 4 * SCRAPE_S);
  return expr
    .replaceAll('$__rate_interval', `${rateInterval}s`)
    .replaceAll('$instance', '.*');
}

const legend = (fmt, metric) =>
  fmt ? fmt.replace(/\{\{\s*(\w+)\s*\}\}/g, (_, k) => metric[k] ?? '') : JSON.stringify(metric);

async function timeseries(panel, { start, end }) {
  const step = Math.max(SCRAPE_S, Math.ceil((end - start) / 240));
  const xs = [];
  for (let t = start; t <= end; t += step) xs.push(t);
  const series = [];
  for (const target of panel.targets ?? []) {
    const query = expand(target.expr, step);
    const data = await api('query_range', { query, start, end, step });
    for (const s of data) {
      const byT = new Map(s.values.map(([t, v]) => [t, Number(v)]));
      const ys = xs.map((t) => (byT.has(t) && Number.isFinite(byT.get(t)) ? byT.get(t) : null));
      series.push({ label: legend(target.legendFormat, s.metric), ys });
    }
  }
  series.sort((a, b) => a.label.localeCompare(b.label));
  return { xs, series };
}

async function stat(panel, { end }) {
  const target = panel.targets[0];
  const data = await api('query', { query: expand(target.expr, SCRAPE_S), time: end });
  const v = data.length ? data.reduce((a, s) => a + Number(s.value[1]), 0) : null;
  return { value: v };
}

const { start, end } = await span();
const panels = [];
for (const p of dashboard.panels ?? []) {
  const base = { title: p.title, type: p.type, grid: p.gridPos, unit: p.fieldConfig?.defaults?.unit };
  if (p.type === 'row') panels.push(base);
  else if (p.type === 'stat') panels.push({ ...base, ...(await stat(p, { end })) });
  else if (p.type === 'timeseries') panels.push({ ...base, ...(await timeseries(p, { start, end })) });
  else throw new Error(`panel type ${p.type} is not rendered here`);
}
const withData = panels.filter((p) => p.series?.some((s) => s.ys.some((y) => y !== null && y !== 0)));
console.log(
  `rendered ${panels.length} panels over ${Math.round((end - start) / 60)} min; ` +
    `${withData.length} time series panels show non-zero data`,
);

const uplot = join(here, 'node_modules/uplot/dist');
const page = `<!doctype html>
<html><head><meta charset="utf-8"><title>${dashboard.title} (preview)</title>
<style>${readFileSync(join(uplot, 'uPlot.min.css'), 'utf8')}
body { margin: 0; padding: 12px 16px; background: #111217; color: #ccccdc; font: 13px/1.35 Inter, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 18px; margin: 0 0 2px; font-weight: 500; }
.note { color: #8e8e9a; margin-bottom: 10px; }
.grid { display: grid; grid-template-columns: repeat(24, 1fr); grid-auto-rows: 28px; gap: 6px; }
.panel { background: #181b1f; border: 1px solid #2c3235; border-radius: 3px; padding: 4px 8px; overflow: hidden; }
.panel h2 { font-size: 13px; font-weight: 500; margin: 0 0 2px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.row { font-size: 15px; font-weight: 500; align-self: end; border-bottom: 1px solid #2c3235; padding-bottom: 2px; }
.stat { font-size: 38px; font-weight: 500; color: #73bf69; text-align: center; margin-top: 8px; }
.stat.bad { color: #f2495c; }
.u-legend { font-size: 11px; color: #ccccdc; } .u-legend .u-marker { width: 10px; height: 3px; }
</style>
<script>${readFileSync(join(uplot, 'uPlot.iife.min.js'), 'utf8')}</script>
</head><body>
<h1>${dashboard.title}: preview of the dashboard's queries</h1>
<div class="note">Not Grafana: each panel's PromQL from config/grafana/optout-sync.json, evaluated by a local
Prometheus over a ${Math.round((end - start) / 60)}-minute demo run (the daemon against the fakes, signed STOP and
START webhooks), drawn with uPlot. ${new Date(start * 1000).toISOString().slice(0, 16)}Z to
${new Date(end * 1000).toISOString().slice(11, 16)}Z.</div>
<div class="grid" id="grid"></div>
<script>
const panels = ${JSON.stringify(panels)};
const colors = ['#73bf69', '#f2cc0c', '#5794f2', '#ff9830', '#f2495c', '#b877d9', '#8ab8ff', '#96d98d', '#ffcb7d', '#ca95e5'];
const fmt = (unit, v) => v == null ? '' : unit === 's' ? (v < 1 ? (v * 1000).toFixed(0) + ' ms' : v.toFixed(1) + ' s') : (Math.abs(v) < 10 && v % 1 ? v.toFixed(2) : String(+v.toFixed(1)));
const grid = document.getElementById('grid');
for (const p of panels) {
  const el = document.createElement('div');
  const g = p.grid;
  el.style.gridColumn = (g.x + 1) + ' / span ' + g.w;
  el.style.gridRow = (g.y + 1) + ' / span ' + g.h;
  grid.appendChild(el);
  if (p.type === 'row') { el.className = 'row'; el.textContent = p.title; continue; }
  el.className = 'panel';
  el.innerHTML = '<h2></h2>';
  el.firstChild.textContent = p.title;
  if (p.type === 'stat') {
    const v = document.createElement('div');
    const bad = p.title === 'Daemon up' ? p.value !== 1 : p.value > 0;
    v.className = 'stat' + (bad ? ' bad' : '');
    v.textContent = p.value == null ? 'No data' : fmt(p.unit, p.value);
    el.appendChild(v);
    continue;
  }
  const width = el.clientWidth - 16, height = g.h * 34 - 6 - 30 - 18 * Math.ceil(p.series.length / 4);
  const axis = { stroke: '#ccccdc', grid: { stroke: '#2c3235', width: 1 }, ticks: { stroke: '#2c3235' }, font: '11px Arial' };
  new uPlot({
    width, height: Math.max(height, 120),
    legend: { live: false },
    cursor: { show: false },
    scales: { y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
    axes: [axis, { ...axis, size: 56, values: (u, vs) => vs.map(v => fmt(p.unit, v)) }],
    series: [{}, ...p.series.map((s, i) => ({ label: s.label, stroke: colors[i % colors.length], width: 1.5, spanGaps: false, points: { show: false } }))],
  }, [p.xs, ...p.series.map(s => s.ys)], el);
  if (!p.series.length) { const n = document.createElement('div'); n.className = 'note'; n.textContent = 'No data'; el.appendChild(n); }
}
</script></body></html>`;
writeFileSync(out, page);
// The page's height for the screenshot's window: the grid's rows plus the heading.
const rows = Math.max(...panels.map((p) => p.grid.y + p.grid.h));
console.log(`wrote ${out}`);
console.log(`height=${rows * 34 + 90}`);
