// LoRA-X canvas extension: shows each run's verdict on the node that produced it, and never an outdated one.
// The Python nodes return {"ui": {"lorax": [summary]}}; summary.lines are short text lines and summary.verdict is
// "good" | "weak" | "none" | "off" (see nodes/ui_summary.py for how it is decided; docs/method.md for users).
//
// A verdict belongs to the run it came from (PRODUCT 9):
// - it is stamped with that run's prompt id and time;
// - when a new run starts, every verdict on the canvas is marked "from an earlier run" until the run replaces it
//   (the node ran) or confirms it (ComfyUI reused the node's cached output: same inputs, same verdict);
// - a node that fails shows the failure instead;
// - a workflow loaded later (page reload, file, template, a shared workflow) keeps a verdict only if this server
//   ran that prompt (its /history knows the id), marked "from an earlier run"; any other verdict is removed, so a
//   shared workflow shows no stranger's verdict.
//
// The summary is kept in node.properties, which the workflow JSON carries. It is shown in a read-only DOM widget:
// both the classic LiteGraph canvas (which overlays DOM widgets on the canvas) and the Vue "Nodes 2.0" renderer
// (which mounts DOM widgets inside the node) display it. The title-box colour is a LiteGraph-only extra.
import { app } from "../../scripts/app.js";

const PREFIX = "LoRAX_";
const SUMMARY_PROPERTY = "lorax_summary";
const WIDGET_NAME = "lorax_verdict";

// Colours chosen to read on both the dark and the light theme.
const VERDICT_COLOURS = {
  good: { box: "#3fae5a", text: "#8fe0a0" },
  weak: { box: "#d9a520", text: "#f0cd6e" },
  none: { box: "#d04a4a", text: "#f08a8a" },
  failed: { box: "#d04a4a", text: "#f08a8a" },
  off: { box: "#808080", text: "#bbbbbb" },
};
const STALE = { box: "#606060", text: "#9a9a9a" };
const LINE_HEIGHT = 15;
const CHAR_WIDTH = 7.3; // 12px monospace
const MARGIN = 6;
const WRAP = 72; // characters per line of a failure message (the canvas does not wrap)

let runningPrompt = null; // id of the prompt this page queued that runs now

function coloursOf(summary) {
  if (summary.stale) return STALE;
  return VERDICT_COLOURS[summary.verdict] ?? VERDICT_COLOURS.weak;
}

function shownLines(summary) {
  const lines = summary.lines ?? [];
  if (!summary.stale) return lines;
  const at = summary.run?.at ? new Date(summary.run.at) : null;
  const when = at && !Number.isNaN(at.getTime()) ? `, ${at.toLocaleString()}` : "";
  return [`from an earlier run${when}:`, ...lines];
}

function verdictWidget(node) {
  const existing = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (existing) return existing;
  const element = document.createElement("div");
  element.className = "lorax-verdict";
  Object.assign(element.style, {
    font: "12px monospace",
    lineHeight: `${LINE_HEIGHT}px`,
    whiteSpace: "pre",
    overflow: "hidden",
    paddingLeft: "6px",
    borderLeft: "4px solid transparent",
    pointerEvents: "none", // the text is read-only: let clicks and drags reach the canvas/node
  });
  const lineCount = () => {
    const summary = node.properties?.[SUMMARY_PROPERTY];
    return summary ? shownLines(summary).length : 0;
  };
  const height = () => lineCount() * LINE_HEIGHT + 2 * MARGIN + 4;
  const widget = node.addDOMWidget(WIDGET_NAME, "lorax_verdict", element, {
    serialize: false, // not an input: keep it out of the prompt and of widgets_values
    hideOnZoom: false,
    margin: MARGIN,
    getValue: () => element.textContent,
    setValue: () => {},
    getMinHeight: height,
    getMaxHeight: height,
  });
  widget.serialize = false;
  return widget;
}

function showSummary(node) {
  const summary = node.properties?.[SUMMARY_PROPERTY];
  const existing = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!summary) {
    if (existing) existing.element.replaceChildren();
    node.boxcolor = undefined;
    node.setDirtyCanvas?.(true, true);
    return;
  }
  const colours = coloursOf(summary);
  const lines = shownLines(summary);
  const first = summary.stale ? 1 : 0; // the verdict line, after the stale marker
  const element = verdictWidget(node).element;
  element.style.borderLeftColor = colours.box;
  element.replaceChildren(
    ...lines.map((line, i) => {
      const div = document.createElement("div");
      div.textContent = line;
      div.style.color = i === first ? colours.text : "#bbbbbb";
      if (i === first) div.style.fontWeight = "bold";
      if (i < first) div.style.fontStyle = "italic";
      return div;
    }),
  );
  node.boxcolor = colours.box;
  const longest = Math.max(0, ...lines.map((l) => l.length));
  const [minW, minH] = node.computeSize();
  node.setSize([
    Math.max(node.size[0], minW, longest * CHAR_WIDTH + 2 * MARGIN + 16),
    Math.max(node.size[1], minH),
  ]);
  node.setDirtyCanvas(true, true);
}

// announced as a graph change, so the frontend's change tracker stores the workflow with the verdict (what a page
// reload restores) and undo sees it
function setSummary(node, summary) {
  app.canvas?.emitBeforeChange?.();
  node.properties ??= {};
  if (summary) node.properties[SUMMARY_PROPERTY] = summary;
  else delete node.properties[SUMMARY_PROPERTY];
  showSummary(node);
  app.canvas?.emitAfterChange?.();
}

function loraxNodes() {
  return (app.graph?.nodes ?? []).filter((n) => n.type?.startsWith(PREFIX));
}

function nodeById(id) {
  return id === undefined || id === null ? null : app.graph?.getNodeById?.(id);
}

function wrap(text) {
  const out = [];
  let line = "";
  for (const word of String(text).split(/\s+/)) {
    if (line && line.length + 1 + word.length > WRAP) {
      out.push(line);
      line = word;
    } else {
      line = line ? `${line} ${word}` : word;
    }
  }
  if (line) out.push(line);
  return out;
}

function stamp() {
  return { prompt_id: runningPrompt, at: new Date().toISOString() };
}

function listenToRuns() {
  const api = app.api;
  api.addEventListener("execution_start", (e) => {
    runningPrompt = e.detail?.prompt_id ?? null;
    for (const node of loraxNodes()) {
      const summary = node.properties?.[SUMMARY_PROPERTY];
      if (summary && !summary.stale) setSummary(node, { ...summary, stale: true });
    }
  });
  // a node whose cached output ComfyUI reuses had the same inputs: its verdict is this run's too
  api.addEventListener("execution_cached", (e) => {
    for (const id of e.detail?.nodes ?? []) {
      const node = nodeById(id);
      const summary = node?.properties?.[SUMMARY_PROPERTY];
      if (summary?.stale && node.type.startsWith(PREFIX)) {
        setSummary(node, { ...summary, stale: false, run: stamp() });
      }
    }
  });
  api.addEventListener("execution_error", (e) => {
    const node = nodeById(e.detail?.node_id);
    if (!node?.type?.startsWith(PREFIX)) return;
    const message = String(e.detail?.exception_message ?? "").split("\n")[0];
    setSummary(node, { verdict: "failed", lines: wrap(`FAILED: ${message}`), run: stamp() });
  });
}

// a verdict restored with a workflow stays only if this server ran its prompt (see the top of this file)
async function checkRestored(node) {
  const summary = node.properties?.[SUMMARY_PROPERTY];
  if (!summary) return;
  const id = summary.run?.prompt_id;
  let known = false;
  if (id) {
    try {
      const response = await app.api.fetchApi(`/history/${encodeURIComponent(id)}`);
      known = response.ok && id in (await response.json());
    } catch {
      known = false;
    }
  }
  if (node.properties?.[SUMMARY_PROPERTY] !== summary) return; // a run replaced it meanwhile
  setSummary(node, known ? { ...summary, stale: true } : null);
}

app.registerExtension({
  name: "LoRAX.TransferSummary",
  setup() {
    listenToRuns();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    // every node of the pack, including ones added later, without a list to keep in sync
    if (!nodeData.name.startsWith(PREFIX)) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const summary = message?.lorax?.[0];
      if (summary) setSummary(this, { ...summary, run: stamp() });
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      onConfigure?.apply(this, arguments);
      showSummary(this);
      checkRestored(this);
    };
  },
});
