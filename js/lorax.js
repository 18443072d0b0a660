// LoRA-X canvas extension: shows each transfer's verdict on the node that produced it.
// The Python nodes return {"ui": {"lorax": [summary]}}; summary.lines are short text lines and
// summary.verdict is "good" | "weak" | "none" (see nodes/summary.py for how it is decided).
import { app } from "../../scripts/app.js";

const LORAX_NODES = new Set([
  "LoRAX_LoadSourceLoRA",
  "LoRAX_SubspaceSimilarity",
  "LoRAX_ProjectLoRA",
  "LoRAX_ApplyToSDXL",
  "LoRAX_SaveLoRA",
]);

// Colours chosen to read on both the dark and the light theme.
const VERDICT_COLOURS = {
  good: { box: "#3fae5a", text: "#8fe0a0" },
  weak: { box: "#d9a520", text: "#f0cd6e" },
  none: { box: "#d04a4a", text: "#f08a8a" },
};
const LINE_HEIGHT = 15;

function showSummary(node, summary) {
  node.loraxSummary = summary;
  const colours = VERDICT_COLOURS[summary.verdict] ?? VERDICT_COLOURS.weak;
  node.boxcolor = colours.box;
  const lines = summary.lines ?? [];
  const needed = node.computeSize()[1] + lines.length * LINE_HEIGHT + 8;
  if (node.size[1] < needed) node.setSize([node.size[0], needed]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "LoRAX.TransferSummary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!LORAX_NODES.has(nodeData.name)) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const summary = message?.lorax?.[0];
      if (summary) showSummary(this, summary);
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      const summary = this.loraxSummary;
      if (!summary || this.flags?.collapsed) return;
      const colours = VERDICT_COLOURS[summary.verdict] ?? VERDICT_COLOURS.weak;
      const lines = summary.lines ?? [];
      ctx.save();
      ctx.font = "12px monospace";
      ctx.textAlign = "left";
      let y = this.size[1] - lines.length * LINE_HEIGHT - 2;
      for (const [i, line] of lines.entries()) {
        ctx.fillStyle = i === 0 ? colours.text : "#bbbbbb";
        ctx.fillText(line, 10, y + LINE_HEIGHT - 3);
        y += LINE_HEIGHT;
      }
      ctx.restore();
    };
  },
});
