// After each sampling run, the RFC Cache node that drove it shows the run:
// a strip with one cell per model evaluation (dark: computed, light:
// predicted), the accumulated forecast error as a line (the sigma where the
// run made no decisions), and a summary line. The server sends
// "rfc-cache.summary" with the node's id when the run ends: its execution
// id, which for a node inside subgraphs is a path (see nodeByExecutionId).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPES = new Set(["RFCCache", "RFCCacheAdvanced"]);
const WIDGET_NAME = "rfc_last_run";
const STRIP_HEIGHT = 28;
const COLORS = { computed: "#3b82f6", predicted: "#cbd5e1", line: "#f97316" };
const SVG = "http://www.w3.org/2000/svg";

function formatBytes(bytes) {
  if (bytes >= 2 ** 30) return `${(bytes / 2 ** 30).toFixed(2)} GB`;
  if (bytes >= 2 ** 20) return `${(bytes / 2 ** 20).toFixed(1)} MB`;
  return `${Math.round(bytes / 2 ** 10)} KB`;
}

function summaryLine(run) {
  const ratio = run.computed ? (run.total / run.computed).toFixed(1) : "1.0";
  const target = run.target_speedup ? ` (target ${run.target_speedup}x)` : "";
  return `${run.computed} of ${run.total} computed, ${ratio}x fewer${target}, cache ${formatBytes(run.peak_bytes)}`;
}

// The accumulated error where the run decided on it, else the sigma, scaled to 0..1.
function lineValues(evaluations) {
  const decided = evaluations.some((e) => e.accumulated != null);
  const values = evaluations.map((e) => (decided ? e.accumulated ?? 0 : e.sigma));
  const top = Math.max(...values, 1e-12);
  return { values: values.map((v) => v / top), label: decided ? "accumulated error" : "sigma" };
}

function drawStrip(svg, evaluations) {
  svg.replaceChildren();
  const count = evaluations.length;
  svg.setAttribute("viewBox", `0 0 ${count} 1`);
  svg.setAttribute("preserveAspectRatio", "none");
  evaluations.forEach((e, i) => {
    const cell = document.createElementNS(SVG, "rect");
    cell.setAttribute("x", i + 0.06);
    cell.setAttribute("y", 0);
    cell.setAttribute("width", 0.88);
    cell.setAttribute("height", 1);
    cell.setAttribute("fill", e.computed ? COLORS.computed : COLORS.predicted);
    cell.setAttribute("class", e.computed ? "rfc-computed" : "rfc-predicted");
    const title = document.createElementNS(SVG, "title");
    title.textContent = `#${i + 1} sigma ${e.sigma.toFixed(4)}: ${e.computed ? "computed" : "predicted"}` +
      (e.reason ? ` (${e.reason})` : "");
    cell.appendChild(title);
    svg.appendChild(cell);
  });
  const { values, label } = lineValues(evaluations);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", values.map((v, i) => `${i + 0.5},${0.95 - 0.9 * v}`).join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", COLORS.line);
  line.setAttribute("stroke-width", 1.5);
  line.setAttribute("vector-effect", "non-scaling-stroke");
  line.setAttribute("class", "rfc-line");
  line.dataset.label = label;
  svg.appendChild(line);
}

function runView(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (widget) return widget.rfcView;
  const root = document.createElement("div");
  root.className = "rfc-run";
  root.style.cssText = "display:flex;flex-direction:column;gap:2px;font:11px sans-serif;color:#ddd;";
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "rfc-strip");
  svg.style.cssText = `width:100%;height:${STRIP_HEIGHT}px;background:#1f2937;`;
  const text = document.createElement("div");
  text.className = "rfc-summary";
  root.append(svg, text);
  widget = node.addDOMWidget(WIDGET_NAME, "rfc-run", root, {
    serialize: false,
    getMinHeight: () => STRIP_HEIGHT + 18,
  });
  widget.rfcView = { root, svg, text };
  node.setSize([node.size[0], node.computeSize()[1]]);
  return widget.rfcView;
}

function showRun(node, run) {
  if (typeof node.addDOMWidget !== "function") {
    // A front-end without DOM widgets: the summary as a plain text widget.
    const widget = node.widgets?.find((w) => w.name === WIDGET_NAME) ??
      node.addWidget("text", WIDGET_NAME, "", () => {}, { serialize: false });
    widget.value = run.summary;
    node.setDirtyCanvas(true, true);
    return;
  }
  const view = runView(node);
  drawStrip(view.svg, run.evaluations ?? []);
  // When the threshold let nothing be predicted, say why and what to do instead.
  view.text.textContent = run.advice ? `${summaryLine(run)}. ${run.advice}` : summaryLine(run);
  view.text.title = run.summary;
  view.root.dataset.computed = run.computed;
  view.root.dataset.total = run.total;
  node.setDirtyCanvas(true, true);
}

// A node inside subgraphs runs under a path of ids, "6:3": each subgraph
// instance from the root graph down, then the node's own id in the subgraph
// it sits in. A node of the root graph has its plain id.
function nodeByExecutionId(executionId) {
  let graph = app.rootGraph ?? app.graph;
  const ids = String(executionId).split(":");
  for (const [depth, id] of ids.entries()) {
    const node = graph?.getNodeById(Number(id)) ?? graph?.getNodeById(id);
    if (depth === ids.length - 1) return node ?? null;
    graph = node?.subgraph;
  }
  return null;
}

app.registerExtension({
  name: "ComfyUI-RFC.lastRun",
  setup() {
    api.addEventListener("rfc-cache.summary", ({ detail }) => {
      const node = detail?.node == null ? null : nodeByExecutionId(detail.node);
      if (node && NODE_TYPES.has(node.comfyClass ?? node.type)) {
        showRun(node, detail);
      }
    });
  },
});
