// Category Tokens node: the category menu offers only the categories of the library chosen on the
// node (GET /productscene/libraries/categories?library=..., nodes/routes.py), and a search box
// finds one among thousands ("Search N categories" button under the widgets).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { loadStrings, t } from "./strings.js";

const NODE = "ProductSceneCategoryTokens";
const SEARCH = "productscene_search_categories";
const SHOWN = 200; // rows the search list draws at once; typing narrows the rest

export async function fetchCategories(library) {
  const url = `/productscene/libraries/categories?library=${encodeURIComponent(library)}`;
  const response = await api.fetchApi(url, { cache: "no-cache" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function redraw(node) {
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

// --------------------------------------------------------------------------- the library's list
async function refresh(node, { userChoice }) {
  const library = widget(node, "library");
  const category = widget(node, "category");
  if (!library || !category || !library.value) return;
  const token = (node.productsceneRequest = (node.productsceneRequest ?? 0) + 1);
  let answer;
  try {
    answer = await fetchCategories(library.value);
  } catch (error) {
    if (token === node.productsceneRequest) {
      node.productsceneCategories = { library: library.value, error: String(error.message ?? error) };
      updateSearchLabel(node);
    }
    return;
  }
  if (token !== node.productsceneRequest) return; // a newer choice is on its way
  const names = answer.categories;
  category.options.values = names;
  node.productsceneCategories = { library: answer.library, names, family: answer.family, at: performance.now() };
  if (userChoice && names.length && !names.includes(category.value)) {
    category.value = names[0];
    category.callback?.(category.value);
  }
  updateSearchLabel(node);
  redraw(node);
}

function updateSearchLabel(node) {
  const button = widget(node, SEARCH);
  if (!button) return;
  const state = node.productsceneCategories;
  button.label = state?.names ? t("categories.search", { count: state.names.length }) : t("categories.searchAll");
}

// --------------------------------------------------------------------------- the search box
let openPicker = null;

function lowered(state) {
  state.lower ??= state.names.map((n) => n.toLowerCase());
  return state.lower;
}

export function search(names, lower, query) {
  const terms = query.toLowerCase().split(/\s+/).filter(Boolean);
  if (!terms.length) return names.map((_, i) => i);
  const first = [];
  const rest = [];
  for (let i = 0; i < names.length; i++) {
    const text = lower[i];
    if (!terms.every((term) => text.includes(term))) continue;
    (text.startsWith(terms[0]) ? first : rest).push(i);
  }
  return first.concat(rest);
}

function showPicker(node) {
  openPicker?.close();
  const category = widget(node, "category");
  if (!category) return;
  const state = node.productsceneCategories?.names
    ? node.productsceneCategories
    : { names: [...(category.options.values ?? [])] };

  const root = document.createElement("div");
  root.className = "productscene-picker";
  Object.assign(root.style, {
    position: "fixed", zIndex: 10000, width: "360px", maxHeight: "440px", display: "flex",
    flexDirection: "column", gap: "6px", padding: "8px", boxSizing: "border-box",
    background: "var(--comfy-menu-bg, #202020)", color: "var(--input-text, #ddd)",
    border: "1px solid var(--border-color, #555)", borderRadius: "8px",
    boxShadow: "0 6px 24px rgba(0,0,0,.5)", font: "13px sans-serif",
  });
  const input = document.createElement("input");
  input.type = "search";
  input.placeholder = t("categories.placeholder", { count: state.names.length });
  Object.assign(input.style, {
    padding: "6px 8px", borderRadius: "6px", border: "1px solid var(--border-color, #555)",
    background: "var(--comfy-input-bg, #111)", color: "inherit", font: "inherit",
  });
  const list = document.createElement("div");
  list.setAttribute("role", "listbox");
  Object.assign(list.style, { overflowY: "auto", flex: "1 1 auto", minHeight: "60px" });
  const info = document.createElement("div");
  Object.assign(info.style, { opacity: 0.7, fontSize: "12px" });
  root.append(input, list, info);

  let matches = [];
  let selected = 0;
  const render = () => {
    matches = search(state.names, lowered(state), input.value);
    selected = Math.min(selected, Math.max(matches.length - 1, 0));
    list.replaceChildren();
    matches.slice(0, SHOWN).forEach((index, row) => {
      const item = document.createElement("div");
      item.className = "productscene-picker-item";
      item.setAttribute("role", "option");
      item.textContent = state.names[index];
      Object.assign(item.style, {
        padding: "3px 8px", borderRadius: "4px", cursor: "pointer", whiteSpace: "nowrap",
        overflow: "hidden", textOverflow: "ellipsis",
        background: row === selected ? "var(--comfy-input-bg, #3a3a3a)" : "",
        fontWeight: state.names[index] === category.value ? "bold" : "",
      });
      item.addEventListener("mousedown", (event) => {
        event.preventDefault();
        choose(state.names[index]);
      });
      list.append(item);
    });
    info.textContent = matches.length
      ? t("categories.matches", { shown: Math.min(matches.length, SHOWN), count: matches.length, total: state.names.length })
      : t("categories.none");
  };
  const choose = (name) => {
    category.value = name;
    category.callback?.(name);
    redraw(node);
    close();
  };
  const onOutside = (event) => {
    if (!root.contains(event.target)) close();
  };
  const close = () => {
    document.removeEventListener("mousedown", onOutside, true);
    root.remove();
    if (openPicker?.root === root) openPicker = null;
  };
  input.addEventListener("input", () => {
    selected = 0;
    render();
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      selected = Math.max(0, Math.min(Math.min(matches.length, SHOWN) - 1, selected + (event.key === "ArrowDown" ? 1 : -1)));
      render();
      list.children[selected]?.scrollIntoView({ block: "nearest" });
      event.preventDefault();
    } else if (event.key === "Enter") {
      if (matches.length) choose(state.names[matches[selected]]);
      event.preventDefault();
    } else if (event.key === "Escape") {
      close();
      event.preventDefault();
    }
    event.stopPropagation(); // keep canvas shortcuts out of the search box
  });

  const canvasRect = app.canvas?.canvas?.getBoundingClientRect?.();
  const [x, y] = app.canvas?.ds?.convertOffsetToCanvas?.([node.pos[0] + node.size[0], node.pos[1]]) ?? [200, 120];
  const left = Math.min((canvasRect?.left ?? 0) + x + 8, window.innerWidth - 370);
  const top = Math.min(Math.max((canvasRect?.top ?? 0) + y, 8), window.innerHeight - 450);
  Object.assign(root.style, { left: `${Math.max(left, 8)}px`, top: `${Math.max(top, 8)}px` });
  document.body.append(root);
  document.addEventListener("mousedown", onOutside, true);
  openPicker = { root, close, input };
  render();
  input.focus();
}

// --------------------------------------------------------------------------- wiring
app.registerExtension({
  name: "ProductScene.CategoryTokens",
  async setup() {
    await loadStrings();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const node = this;
      const library = widget(node, "library");
      if (!library || !widget(node, "category")) return result;
      const previous = library.callback;
      library.callback = function () {
        const out = previous?.apply(this, arguments);
        refresh(node, { userChoice: true });
        return out;
      };
      const button = node.addWidget("button", SEARCH, null, () => showPicker(node), { serialize: false });
      button.serialize = false; // not a node input: no widget value in the workflow or the prompt
      button.label = t("categories.searchAll");
      // values of a loaded workflow are set after creation: read the library once they are
      setTimeout(() => refresh(node, { userChoice: false }), 0);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const out = onConfigure?.apply(this, arguments);
      refresh(this, { userChoice: false });
      return out;
    };
  },
});
