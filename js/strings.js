// Texts the ProductScene extension shows, in the user's language: locales/<lang>/main.json of this
// pack, under "productscene". ComfyUI serves every pack's locales at /i18n and the frontend merges
// them into its own messages, but extensions cannot import the frontend's translate function, so
// the texts are read here once.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

let translations = null;
let loading = null;

export function loadStrings() {
  loading ??= api
    .fetchApi("/i18n")
    .then((response) => (response.ok ? response.json() : {}))
    .catch((error) => {
      console.warn("ProductScene: could not load translations", error);
      return {};
    })
    .then((table) => (translations = table));
  return loading;
}

export function locale() {
  const settings = app.extensionManager?.setting;
  const value = settings?.get?.("Comfy.Locale") ?? app.ui?.settings?.getSettingValue?.("Comfy.Locale");
  return value || navigator.language?.split("-")[0] || "en";
}

function lookup(table, key) {
  return key.split(".").reduce((node, part) => (node == null ? undefined : node[part]), table?.productscene);
}

// t("categories.search", {count: 5000}) -> "Search 5,000 categories"
export function t(key, vars = {}) {
  const lang = locale();
  const text =
    lookup(translations?.[lang], key) ??
    lookup(translations?.[lang.split("-")[0]], key) ??
    lookup(translations?.en, key) ??
    key;
  return text.replace(/\{(\w+)\}/g, (_, name) => {
    const value = vars[name];
    if (typeof value === "number") return value.toLocaleString(lang);
    return value ?? "";
  });
}
