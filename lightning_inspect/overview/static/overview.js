/* lightning-inspect overview: layers x steps heatmaps, findings, a layer's histograms and curves.
 * One script for the TensorBoard tab (data over HTTP from the plugin) and the self-contained
 * HTML page (data inlined). No dependencies; every name from the data is set with textContent.
 */
(function () {
  "use strict";

  // -- data sources ------------------------------------------------------------------------

  function inlineSource(data) {
    const runs = data.runs;
    return {
      runs: async () => Object.keys(runs),
      meta: async (run) => ({ kinds: runs[run].kinds, findings: runs[run].findings }),
      matrix: async (run, kind, stat) => {
        const k = runs[run].kinds[kind];
        return { layers: k.layers, steps: k.steps, values: k.values[stat] };
      },
      histograms: async (run, kind, layer) =>
        runs[run].kinds[kind].hist[layer] || { steps: [], lo: [], hi: [], counts: [] },
    };
  }

  function httpSource(base) {
    const get = async (route, args) => {
      const query = new URLSearchParams(args || {}).toString();
      const response = await fetch(base + route + (query ? "?" + query : ""));
      if (!response.ok) throw new Error(route + ": HTTP " + response.status);
      return response.json();
    };
    return {
      runs: () => get("runs"),
      meta: (run) => get("meta", { run }),
      matrix: (run, kind, stat) => get("matrix", { run, kind, stat }),
      histograms: (run, kind, layer) => get("histograms", { run, kind, layer }),
    };
  }

  // -- colours -----------------------------------------------------------------------------

  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const DIVERGING = [[49, 54, 149], [116, 173, 209], [247, 247, 247], [244, 109, 67], [165, 0, 38]];

  function lut(anchors) {
    const out = new Uint8ClampedArray(256 * 3);
    for (let i = 0; i < 256; i++) {
      const x = (i / 255) * (anchors.length - 1);
      const j = Math.min(Math.floor(x), anchors.length - 2);
      const t = x - j;
      for (let c = 0; c < 3; c++) out[i * 3 + c] = anchors[j][c] * (1 - t) + anchors[j + 1][c] * t;
    }
    return out;
  }
  const LUTS = { seq: lut(VIRIDIS), div: lut(DIVERGING) };

  /** How values map to [0, 1]: log10 when positive values span three decades or more. */
  function scaleFor(values, diverging, mode) {
    let lo = Infinity, hi = -Infinity, minPos = Infinity;
    for (const row of values) for (const v of row) {
      if (v === null || !isFinite(v)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
      if (v > 0 && v < minPos) minPos = v;
    }
    if (lo === Infinity) return { empty: true, log: false, lo: 0, hi: 1, map: () => 0 };
    if (diverging) {
      const m = Math.max(Math.abs(lo), Math.abs(hi)) || 1;
      return { log: false, lo: -m, hi: m, map: (v) => (v + m) / (2 * m) };
    }
    const wide = lo >= 0 && minPos < Infinity && hi / minPos >= 1e3;
    const log = mode === "log" || (mode === "auto" && wide);
    if (log) {
      const a = Math.log10(minPos), b = Math.log10(hi);
      const span = b - a || 1;
      return { log: true, lo: minPos, hi, map: (v) => (v <= 0 ? 0 : (Math.log10(v) - a) / span) };
    }
    const span = hi - lo || 1;
    return { log: false, lo, hi, map: (v) => (v - lo) / span };
  }

  function fmt(v) {
    if (v === null || v === undefined) return "missing (NaN/Inf or not logged)";
    if (v === 0) return "0";
    const a = Math.abs(v);
    return a >= 1e4 || a < 1e-3 ? v.toExponential(3) : String(Number(v.toPrecision(4)));
  }

  // -- DOM helpers -------------------------------------------------------------------------

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function select(label, options, value, onChange) {
    const wrap = el("label", { class: "li-control" }, label + " ");
    const s = el("select");
    for (const [v, text] of options) {
      const o = el("option", { value: v }, text);
      if (v === value) o.selected = true;
      s.appendChild(o);
    }
    s.addEventListener("change", () => onChange(s.value));
    wrap.appendChild(s);
    return wrap;
  }

  function canvas(width, height) {
    const c = el("canvas");
    const ratio = window.devicePixelRatio || 1;
    c.width = Math.round(width * ratio);
    c.height = Math.round(height * ratio);
    c.style.width = width + "px";
    c.style.height = height + "px";
    const ctx = c.getContext("2d");
    ctx.scale(ratio, ratio);
    return [c, ctx];
  }

  /** Whether a finding about a module concerns a row: the module itself, one of its outputs
   *  (``module/0``) or one of its own parameters (``module.weight``). */
  function concerns(finding, layer) {
    const m = finding.module;
    if (layer === m || layer.startsWith(m + "/")) return true;
    return layer.startsWith(m + ".") && !layer.slice(m.length + 1).includes(".");
  }

  // -- heatmap -----------------------------------------------------------------------------

  const MARGIN = { left: 170, top: 24, right: 70, bottom: 34 };
  const SEVERITY_COLOURS = { error: "#e00000", warning: "#ff8c00", info: "#1e90ff" };

  /** Draw a layers x steps matrix on one canvas (one image of cells, scaled); returns it. */
  function heatmap(parent, m, opts) {
    const rows = m.layers.length, cols = m.steps.length;
    const cell = Math.max(2, Math.min(18, Math.floor(520 / Math.max(rows, 1))));
    const room = (opts.width || 1100) - MARGIN.left - MARGIN.right;  // fits the frame
    const plotW = Math.max(200, Math.min(room, cols * 40));
    const plotH = Math.max(rows * cell, 40);
    const [c, ctx] = canvas(MARGIN.left + plotW + MARGIN.right, MARGIN.top + plotH + MARGIN.bottom);
    c.className = "li-heatmap";
    c.dataset.rows = String(rows);
    c.dataset.cols = String(cols);
    const scale = scaleFor(m.values, opts.diverging, opts.scaleMode);
    const colours = opts.diverging ? LUTS.div : LUTS.seq;
    const image = new ImageData(Math.max(cols, 1), Math.max(rows, 1));
    let drawn = 0;
    for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) {
      const v = m.values[i][j], p = (i * cols + j) * 4;
      if (v === null || !isFinite(v)) {
        image.data.set([205, 205, 205, 255], p);
        continue;
      }
      const t = Math.max(0, Math.min(255, Math.round(scale.map(v) * 255)));
      image.data.set([colours[t * 3], colours[t * 3 + 1], colours[t * 3 + 2], 255], p);
      drawn++;
    }
    c.dataset.cells = String(drawn);
    c.dataset.log = String(scale.log);
    const tmp = document.createElement("canvas");
    tmp.width = image.width;
    tmp.height = image.height;
    tmp.getContext("2d").putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(tmp, MARGIN.left, MARGIN.top, plotW, plotH);
    const cw = plotW / Math.max(cols, 1), ch = plotH / Math.max(rows, 1);
    const colOf = new Map(m.steps.map((s, j) => [s, j]));
    let marked = 0;
    // findings: an outline on their cells; the first non-finite module: a filled marker
    for (const f of opts.findings || []) {
      const j = colOf.get(f.step);
      if (j === undefined) continue;
      m.layers.forEach((layer, i) => { if (concerns(f, layer)) mark(f, i, j); });
    }
    c.dataset.marked = String(marked);
    function mark(f, i, j) {
      marked++;
      const x = MARGIN.left + j * cw, y = MARGIN.top + i * ch;
      ctx.strokeStyle = SEVERITY_COLOURS[f.severity] || SEVERITY_COLOURS.info;
      ctx.lineWidth = 2;
      ctx.strokeRect(x + 1, y + 1, Math.max(cw - 2, 2), Math.max(ch - 2, 2));
      if (f.rule === "nonfinite") {
        ctx.fillStyle = "#e00000";
        ctx.beginPath();
        ctx.moveTo(x, y);
        ctx.lineTo(x + Math.max(cw, 6), y);
        ctx.lineTo(x, y + Math.max(ch, 6));
        ctx.fill();
      }
    }
    // labels: layers (every nth when crowded), first and last step, title, colour bar
    ctx.fillStyle = "#222";
    ctx.font = "11px sans-serif";
    ctx.textBaseline = "middle";
    const every = Math.ceil(12 / Math.max(ch, 1));
    for (let i = 0; i < rows; i += every) {
      let name = m.layers[i];
      if (name.length > 26) name = "\u2026" + name.slice(-25);
      ctx.fillText(name, 4, MARGIN.top + (i + 0.5) * ch);
    }
    ctx.textBaseline = "top";
    if (cols) {
      ctx.fillText("step " + m.steps[0], MARGIN.left, MARGIN.top + plotH + 4);
      const last = "step " + m.steps[cols - 1];
      ctx.fillText(last, MARGIN.left + plotW - ctx.measureText(last).width, MARGIN.top + plotH + 4);
    }
    ctx.fillText(opts.title || "", MARGIN.left, 6);
    const barX = MARGIN.left + plotW + 12;
    for (let y = 0; y < plotH; y++) {
      const t = Math.round((1 - y / plotH) * 255);
      ctx.fillStyle = `rgb(${colours[t * 3]},${colours[t * 3 + 1]},${colours[t * 3 + 2]})`;
      ctx.fillRect(barX, MARGIN.top + y, 12, 1);
    }
    ctx.fillStyle = "#222";
    ctx.fillText(fmt(scale.hi), barX - 4, MARGIN.top - 14);
    ctx.fillText(fmt(scale.lo) + (scale.log ? " (log)" : ""), barX - 4, MARGIN.top + plotH + 4);
    parent.appendChild(c);

    const cellAt = (event) => {
      const r = c.getBoundingClientRect();
      const x = event.clientX - r.left - MARGIN.left, y = event.clientY - r.top - MARGIN.top;
      if (x < 0 || y < 0 || x >= plotW || y >= plotH) return null;
      return { i: Math.floor(y / ch), j: Math.floor(x / cw) };
    };
    c.addEventListener("mousemove", (event) => {
      const at = cellAt(event);
      if (!at) return opts.tooltip.hide();
      const notes = (opts.findings || []).filter(
        (f) => concerns(f, m.layers[at.i]) && f.step === m.steps[at.j]);
      opts.tooltip.show(event, [
        m.layers[at.i],
        "step " + m.steps[at.j],
        (opts.valueLabel || "value") + ": " + fmt(m.values[at.i][at.j]),
        ...notes.map((f) => `${f.severity}: ${f.rule} (${f.statistic} = ${fmt(f.value)})`),
      ]);
    });
    c.addEventListener("mouseleave", () => opts.tooltip.hide());
    c.addEventListener("click", (event) => {
      const at = cellAt(event);
      if (at && opts.onCell) opts.onCell(m.layers[at.i], m.steps[at.j]);
    });
    c.cellCentre = (i, j) => [MARGIN.left + (j + 0.5) * cw, MARGIN.top + (i + 0.5) * ch];
    return c;
  }

  // -- small charts ------------------------------------------------------------------------

  /** A line chart of y over x (null values leave gaps), with an optional marked x. */
  function lineChart(parent, xs, ys, title, mark) {
    const W = 300, H = 150, L = 52, T = 18, B = 22;
    const [c, ctx] = canvas(W, H);
    c.className = "li-curve";
    const finite = ys.filter((v) => v !== null && isFinite(v));
    const lo = Math.min(...finite), hi = Math.max(...finite);
    const x0 = xs[0], x1 = xs[xs.length - 1];
    const px = (x) => L + ((x - x0) / ((x1 - x0) || 1)) * (W - L - 8);
    const py = (y) => T + (1 - (y - lo) / ((hi - lo) || 1)) * (H - T - B);
    ctx.font = "11px sans-serif";
    ctx.fillStyle = "#222";
    ctx.fillText(title, L, 12);
    if (finite.length) {
      ctx.fillText(fmt(hi), 2, T + 4);
      ctx.fillText(fmt(lo), 2, H - B);
      ctx.strokeStyle = "#1f77b4";
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      let pen = false;
      xs.forEach((x, k) => {
        const y = ys[k];
        if (y === null || !isFinite(y)) { pen = false; return; }
        if (pen) ctx.lineTo(px(x), py(y)); else ctx.moveTo(px(x), py(y));
        pen = true;
        if (xs.length < 60) ctx.fillRect(px(x) - 1.5, py(y) - 1.5, 3, 3);
      });
      ctx.stroke();
    }
    if (mark !== undefined) {
      ctx.strokeStyle = "#e00000";
      ctx.beginPath();
      ctx.moveTo(px(mark), T);
      ctx.lineTo(px(mark), H - B);
      ctx.stroke();
    }
    ctx.fillStyle = "#666";
    ctx.fillText(String(x0), L, H - 8);
    ctx.fillText(String(x1), W - 8 - ctx.measureText(String(x1)).width, H - 8);
    parent.appendChild(c);
    return c;
  }

  /** A layer's histograms over steps: value (y) by step (x), colour = log(1 + count). */
  function histogramMap(parent, h, title) {
    const W = 520, H = 220, L = 60, T = 18, B = 22, R = 10;
    const [c, ctx] = canvas(W, H);
    c.className = "li-histogram";
    const n = h.steps.length, bins = n ? h.counts[0].length : 0;
    c.dataset.steps = String(n);
    c.dataset.bins = String(bins);
    ctx.font = "11px sans-serif";
    ctx.fillStyle = "#222";
    ctx.fillText(title, L, 12);
    if (!n) {
      ctx.fillText("no histograms logged for this layer", L, H / 2);
      parent.appendChild(c);
      return c;
    }
    const lo = Math.min(...h.lo.filter((v) => v !== null));
    const hi = Math.max(...h.hi.filter((v) => v !== null));
    const grid = Array.from({ length: bins }, () => new Float64Array(n));
    let peak = 0;
    for (let j = 0; j < n; j++) {
      const a = h.lo[j], b = h.hi[j];
      if (a === null || b === null) continue;
      for (let k = 0; k < bins; k++) {
        const centre = a + ((k + 0.5) * (b - a)) / bins;
        const at = Math.floor(((centre - lo) / ((hi - lo) || 1)) * bins);
        const row = Math.min(bins - 1, Math.max(0, at));
        grid[row][j] += h.counts[j][k] || 0;
      }
    }
    for (const row of grid) for (const v of row) peak = Math.max(peak, Math.log1p(v));
    const image = new ImageData(n, bins);
    for (let k = 0; k < bins; k++) for (let j = 0; j < n; j++) {
      const t = Math.round((peak ? Math.log1p(grid[k][j]) / peak : 0) * 255);
      const p = ((bins - 1 - k) * n + j) * 4;
      image.data.set([LUTS.seq[t * 3], LUTS.seq[t * 3 + 1], LUTS.seq[t * 3 + 2], 255], p);
    }
    const tmp = document.createElement("canvas");
    tmp.width = n;
    tmp.height = bins;
    tmp.getContext("2d").putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(tmp, L, T, W - L - R, H - T - B);
    ctx.fillStyle = "#222";
    ctx.fillText(fmt(hi), 2, T + 8);
    ctx.fillText(fmt(lo), 2, H - B);
    ctx.fillText("step " + h.steps[0], L, H - 8);
    const last = "step " + h.steps[n - 1];
    ctx.fillText(last, W - R - ctx.measureText(last).width, H - 8);
    parent.appendChild(c);
    return c;
  }

  // -- the page ----------------------------------------------------------------------------

  function tooltip(root) {
    const tip = el("div", { class: "li-tooltip" });
    tip.style.display = "none";
    root.appendChild(tip);
    return {
      show(event, lines) {
        tip.replaceChildren(...lines.map((line) => el("div", {}, line)));
        tip.style.display = "block";
        tip.style.left = event.pageX + 14 + "px";
        tip.style.top = event.pageY + 10 + "px";
      },
      hide() { tip.style.display = "none"; },
    };
  }

  /** Values of two runs aligned on layer names (first run's order) and shared steps: a - b. */
  function difference(a, b) {
    const bRow = new Map(b.layers.map((n, i) => [n, i]));
    const bCol = new Map(b.steps.map((s, j) => [s, j]));
    const layers = a.layers.filter((n) => bRow.has(n));
    const steps = a.steps.filter((s) => bCol.has(s));
    const aRow = new Map(a.layers.map((n, i) => [n, i]));
    const aCol = new Map(a.steps.map((s, j) => [s, j]));
    const values = layers.map((n) => steps.map((s) => {
      const x = a.values[aRow.get(n)][aCol.get(s)], y = b.values[bRow.get(n)][bCol.get(s)];
      return x === null || y === null ? null : x - y;
    }));
    return { layers, steps, values };
  }

  async function start(root, source) {
    root.classList.add("li-root");
    const state = { run: null, kind: null, stat: null, other: "", mode: "side", scale: "auto",
                    layer: null, step: null };
    const controls = el("div", { class: "li-controls" });
    const status = el("div", { class: "li-status" });
    const maps = el("div", { class: "li-maps" });
    const detail = el("div", { class: "li-detail" });
    const findingsBox = el("div", { class: "li-findings" });
    root.replaceChildren(controls, status, maps, detail, findingsBox);
    const tip = tooltip(root);
    const metas = {};
    const matrices = {};

    const meta = async (run) => (metas[run] = metas[run] || (await source.meta(run)));
    const matrix = async (run, kind, stat) => {
      const key = JSON.stringify([run, kind, stat]);
      return (matrices[key] = matrices[key] || (await source.matrix(run, kind, stat)));
    };

    let runs;
    try {
      runs = await source.runs();
    } catch (err) {
      status.textContent = "Could not load the runs: " + err.message;
      return;
    }
    if (!runs.length) {
      status.textContent = "No lightning-inspect data yet: log some steps with the monitors.";
      return;
    }
    state.run = runs[0];

    async function render() {
      const m = await meta(state.run);
      const kinds = Object.keys(m.kinds);
      if (!kinds.includes(state.kind)) state.kind = kinds[0];
      const info = m.kinds[state.kind];
      if (!info.stats.includes(state.stat)) {
        state.stat = info.stats.includes("mean") ? "mean" : info.stats[0];
      }
      const others = runs.filter((r) => r !== state.run);
      controls.replaceChildren(
        select("run", runs.map((r) => [r, r]), state.run, (v) => { state.run = v; reset(); }),
        select("kind", kinds.map((k) => [k, m.kinds[k].label]), state.kind,
               (v) => { state.kind = v; reset(); }),
        select("statistic", info.stats.map((s) => [s, s]), state.stat,
               (v) => { state.stat = v; render(); }),
        select("compare with", [["", "(none)"], ...others.map((r) => [r, r])],
               state.other, (v) => { state.other = v; render(); }),
        select("as", [["side", "side by side"], ["diff", "difference"]], state.mode,
               (v) => { state.mode = v; render(); }),
        select("colour", [["auto", "auto"], ["linear", "linear"], ["log", "log"]], state.scale,
               (v) => { state.scale = v; render(); }),
      );
      maps.replaceChildren();
      if (!info.stats.length) {
        status.textContent = "Only histograms for this kind: pick a layer below.";
      } else {
        status.textContent = "";
        const a = await matrix(state.run, state.kind, state.stat);
        const onCell = (layer, step) => { state.layer = layer; state.step = step; renderDetail(); };
        const common = { tooltip: tip, onCell, scaleMode: state.scale,
                         width: maps.clientWidth || window.innerWidth - 30 };
        const findings = m.findings;
        let b = null;
        if (state.other) {
          const mb = await meta(state.other);
          if (mb.kinds[state.kind] && mb.kinds[state.kind].stats.includes(state.stat)) {
            b = await matrix(state.other, state.kind, state.stat);
          } else {
            status.textContent = "Run " + state.other + " has no " + state.stat + " of this kind.";
          }
        }
        const title = (run) => run + " \u2014 " + info.label + " / " + state.stat;
        if (b && state.mode === "diff") {
          heatmap(maps, difference(a, b), { ...common, diverging: true, valueLabel: "difference",
                  title: state.run + " minus " + state.other + " \u2014 " + state.stat });
        } else {
          if (b && state.mode === "side") common.width = common.width / 2 - 12;
          heatmap(maps, a, { ...common, findings, title: title(state.run) });
          if (b) {
            heatmap(maps, b, { ...common, findings: metas[state.other].findings,
                               title: title(state.other) });
          }
        }
      }
      renderFindings(m.findings);
      if (state.layer !== null) renderDetail();
      else detail.replaceChildren(el("p", { class: "li-hint" },
        "Click a cell: the layer's histograms and statistic curves, "
        + "and the step's profile across layers."));
    }

    function reset() {
      if (state.other === state.run) state.other = "";
      state.layer = null;
      state.step = null;
      render();
    }

    async function renderDetail() {
      const m = await meta(state.run);
      const info = m.kinds[state.kind];
      const layer = state.layer, step = state.step;
      const box = el("div");
      box.appendChild(el("h3", {}, "layer " + layer + " \u2014 step " + step));
      const row = el("div", { class: "li-row" });
      box.appendChild(row);
      if (info.histograms.includes(layer)) {
        const h = await source.histograms(state.run, state.kind, layer);
        histogramMap(row, h, "histograms of " + layer + " over steps");
      } else {
        row.appendChild(el("p", { class: "li-hint" }, "No histograms were logged for this layer."));
      }
      const curves = el("div", { class: "li-row" });
      box.appendChild(el("h4", {}, "statistics of " + layer));
      box.appendChild(curves);
      for (const stat of info.stats) {
        const mat = await matrix(state.run, state.kind, stat);
        const i = mat.layers.indexOf(layer);
        if (i >= 0) lineChart(curves, mat.steps, mat.values[i], stat, step);
      }
      if (info.stats.length) {
        const mat = await matrix(state.run, state.kind, state.stat);
        const j = mat.steps.indexOf(step);
        if (j >= 0) {
          box.appendChild(el("h4", {}, state.stat + " across layers at step " + step));
          const profile = el("div", { class: "li-row" });
          box.appendChild(profile);
          const c = lineChart(profile, mat.layers.map((_, i) => i), mat.values.map((r) => r[j]),
                              "layer index (model order) \u2192", mat.layers.indexOf(layer));
          c.className = "li-profile";
        }
      }
      detail.replaceChildren(box);
    }

    function renderFindings(findings) {
      if (!findings.length) {
        const none = el("p", { class: "li-hint" }, "No health findings in this run.");
        findingsBox.replaceChildren(none);
        return;
      }
      const table = el("table");
      const head = el("tr");
      for (const h of ["step", "severity", "rule", "module", "statistic", "value", "hint"]) {
        head.appendChild(el("th", {}, h));
      }
      table.appendChild(head);
      for (const f of findings) {
        const tr = el("tr", { class: "li-" + f.severity });
        for (const v of [f.step, f.severity, f.rule, f.module, f.statistic, fmt(f.value), f.hint]) {
          tr.appendChild(el("td", {}, String(v)));
        }
        tr.addEventListener("click", () => {
          state.layer = f.module;
          state.step = f.step;
          renderDetail();
        });
        table.appendChild(tr);
      }
      findingsBox.replaceChildren(el("h3", {}, "Health findings"), table);
    }

    await render();
  }

  window.LightningInspectOverview = { start, inlineSource, httpSource };
})();
