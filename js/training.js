// Trainer nodes while they run: ComfyUI draws the progress bar and the loss curve (the preview image
// that nodes/live_progress.py sends); this adds a status line under the node's widgets: step, loss,
// speed and time left, from the "productscene.training" websocket message.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { loadStrings, t } from "./strings.js";

const EVENT = "productscene.training";
const STATUS = "productscene_training_status";

function nodeOf(executionId) {
  // "12" on the root graph; "5:12" inside a subgraph shows on the subgraph node 5
  const first = String(executionId).split(":")[0];
  return app.graph?.getNodeById?.(Number(first)) ?? app.graph?.getNodeById?.(first) ?? null;
}

function duration(seconds) {
  if (seconds == null || !isFinite(seconds)) return "…";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${rest}` : `${m}:${rest}`;
}

function statusWidget(node) {
  let w = node.widgets?.find((x) => x.name === STATUS);
  if (w) return w;
  const element = document.createElement("div");
  element.className = "productscene-training-status";
  Object.assign(element.style, {
    font: "12px monospace", color: "var(--input-text, #ddd)", padding: "4px 8px",
    whiteSpace: "pre-wrap", lineHeight: "1.4", boxSizing: "border-box",
  });
  if (typeof node.addDOMWidget === "function") {
    w = node.addDOMWidget(STATUS, "productscene_status", element, {
      serialize: false, hideOnZoom: false, getMinHeight: () => 40, getMaxHeight: () => 48,
    });
  } else {
    w = { name: STATUS, element, options: {} };
  }
  w.serialize = false;
  w.options ??= {};
  w.options.serialize = false;
  w.element ??= element;
  const min = node.computeSize?.();
  if (min) node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  return w;
}

export function statusText(d) {
  const lines = [t("training.step", { step: d.step, total: d.total })];
  if (d.loss != null) lines[0] += " · " + t("training.loss", { loss: d.loss.toFixed(4) });
  const perStep = d.per_step;
  const parts = [];
  if (perStep) parts.push(t("training.perStep", { seconds: perStep.toFixed(perStep < 10 ? 2 : 1) }));
  parts.push(d.step >= d.total ? t("training.done", { time: duration(d.elapsed) }) : t("training.left", { time: duration(d.eta) }));
  lines.push(parts.join(" · "));
  return lines.join("\n");
}

app.registerExtension({
  name: "ProductScene.TrainingProgress",
  async setup() {
    await loadStrings();
    api.addEventListener(EVENT, ({ detail }) => {
      const node = nodeOf(detail.node);
      if (!node) return;
      node.productsceneTraining = detail;
      const w = statusWidget(node);
      w.element.textContent = statusText(detail);
      node.setDirtyCanvas?.(true, true);
    });
  },
});
