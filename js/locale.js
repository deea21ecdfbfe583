// The pack's node names, input names and tooltips in the user's language (locales/<lang>/nodeDefs.json)
// on frontends that drop them: frontend 1.32 merges the packs' /i18n messages before it loads the
// language itself, then replaces that language's messages, so a pack's translations are lost for
// every language but English (1.49 merges them again). Where the frontend did translate (the name
// differs from the English one), nothing is changed.
import { app } from "../../scripts/app.js";
import { loadStrings, locale } from "./strings.js";

const PREFIX = "ProductScene";
let tables = null;

function entries(name) {
  const lang = locale();
  const own = tables?.[lang]?.nodeDefs?.[name] ?? tables?.[lang.split("-")[0]]?.nodeDefs?.[name];
  const english = tables?.en?.nodeDefs?.[name];
  return own && english && own !== english ? { own, english } : null;
}

function translateSpec(spec, entry) {
  if (!Array.isArray(spec)) return;
  if (entry?.tooltip) {
    spec[1] = { ...(spec[1] ?? {}), tooltip: entry.tooltip };
  }
}

app.registerExtension({
  name: "ProductScene.Locale",
  async init() {
    tables = await loadStrings();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name?.startsWith(PREFIX)) return;
    const found = entries(nodeData.name);
    if (!found || nodeData.display_name !== found.english.display_name) return;
    const { own } = found;
    if (own.display_name) {
      nodeData.display_name = own.display_name;
      nodeType.title = own.display_name;
    }
    if (own.description) nodeData.description = own.description;
    for (const section of ["required", "optional"]) {
      for (const [name, spec] of Object.entries(nodeData.input?.[section] ?? {})) translateSpec(spec, own.inputs?.[name]);
    }
    if (Array.isArray(nodeData.output_tooltips)) {
      nodeData.output_tooltips = nodeData.output_tooltips.map((tip, i) => own.outputs?.[i]?.tooltip ?? tip);
    }
    const label = (node) => {
      for (const w of node.widgets ?? []) {
        const entry = own.inputs?.[w.name];
        if (entry?.name && (!w.label || w.label === w.name)) w.label = entry.name;
        if (entry?.tooltip) w.tooltip = entry.tooltip;
      }
      for (const input of node.inputs ?? []) {
        const entry = own.inputs?.[input.name];
        if (entry?.name && (!input.label || input.label === input.name)) input.label = entry.name;
      }
      (node.outputs ?? []).forEach((output, i) => {
        const entry = own.outputs?.[i];
        if (entry?.name && (!output.label || output.label === output.name)) output.label = entry.name;
        if (entry?.tooltip) output.tooltip = entry.tooltip;
      });
    };
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      label(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure; // a loaded workflow brings its own slots
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      label(this);
      return result;
    };
  },
});
