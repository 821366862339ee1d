// Shows the last sampling run's RFC summary on the RFC Cache node that drove it.
// The server sends "rfc-cache.summary" with the node's id after each run.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPES = new Set(["RFCCache", "RFCCacheAdvanced"]);
const SUMMARY_WIDGET = "last run";

function showSummary(node, text) {
  let widget = node.widgets?.find((w) => w.name === SUMMARY_WIDGET);
  if (!widget) {
    widget = node.addWidget("text", SUMMARY_WIDGET, "", () => {}, { serialize: false });
    widget.disabled = true;
  }
  widget.value = text;
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "ComfyUI-RFC.summary",
  setup() {
    api.addEventListener("rfc-cache.summary", ({ detail }) => {
      const node = app.graph?.getNodeById(Number(detail?.node)) ?? app.graph?.getNodeById(detail?.node);
      if (node && NODE_TYPES.has(node.comfyClass ?? node.type)) {
        showSummary(node, detail.summary);
      }
    });
  },
});
