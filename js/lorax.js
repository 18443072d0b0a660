// LoRA-X canvas extension: shows each run's verdict on the node that produced it.
// The Python nodes return {"ui": {"lorax": [summary]}}; summary.lines are short text lines and
// summary.verdict is "good" | "weak" | "none" (see nodes/ui_summary.py for how it is decided).
//
// The summary is kept in node.properties, which the workflow JSON carries, so the verdict survives a page
// reload and a workflow save/load. It is shown in a read-only DOM widget: both the classic LiteGraph canvas
// (which overlays DOM widgets on the canvas) and the Vue "Nodes 2.0" renderer (which mounts DOM widgets inside
// the node) display it. The title-box colour is a LiteGraph-only extra.
import { app } from "../../scripts/app.js";

const PREFIX = "LoRAX_";
const SUMMARY_PROPERTY = "lorax_summary";
const WIDGET_NAME = "lorax_verdict";

// Colours chosen to read on both the dark and the light theme.
const VERDICT_COLOURS = {
  good: { box: "#3fae5a", text: "#8fe0a0" },
  weak: { box: "#d9a520", text: "#f0cd6e" },
  none: { box: "#d04a4a", text: "#f08a8a" },
};
const LINE_HEIGHT = 15;
const CHAR_WIDTH = 7.3; // 12px monospace
const MARGIN = 6;

function coloursOf(summary) {
  return VERDICT_COLOURS[summary.verdict] ?? VERDICT_COLOURS.weak;
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
  const lineCount = () => node.properties?.[SUMMARY_PROPERTY]?.lines?.length ?? 0;
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
  if (!summary) return;
  const colours = coloursOf(summary);
  const lines = summary.lines ?? [];
  const element = verdictWidget(node).element;
  element.style.borderLeftColor = colours.box;
  element.replaceChildren(
    ...lines.map((line, i) => {
      const div = document.createElement("div");
      div.textContent = line;
      div.style.color = i === 0 ? colours.text : "#bbbbbb";
      if (i === 0) div.style.fontWeight = "bold";
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

app.registerExtension({
  name: "LoRAX.TransferSummary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    // every node of the pack, including ones added later, without a list to keep in sync
    if (!nodeData.name.startsWith(PREFIX)) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const summary = message?.lorax?.[0];
      if (!summary) return;
      // announced as a graph change so the frontend's change tracker stores the workflow with the verdict
      // (what a page reload restores) and undo sees it
      app.canvas?.emitBeforeChange?.();
      this.properties ??= {};
      this.properties[SUMMARY_PROPERTY] = summary;
      showSummary(this);
      app.canvas?.emitAfterChange?.();
    };

    // a loaded workflow (page reload, file, template) brings the summary back in its properties
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      onConfigure?.apply(this, arguments);
      showSummary(this);
    };
  },
});
