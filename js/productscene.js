// ProductScene canvas extension: the Category Tokens node offers only the categories of the library
// chosen on it (the server lists every library's categories at /productscene/libraries).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

async function libraryIndex() {
  const response = await api.fetchApi("/productscene/libraries");
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  return response.json();
}

app.registerExtension({
  name: "ProductScene.CategoryTokens",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "ProductSceneCategoryTokens") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const library = this.widgets?.find((w) => w.name === "library");
      const category = this.widgets?.find((w) => w.name === "category");
      if (!library || !category) return result;
      const everything = [...category.options.values];
      const refresh = async () => {
        try {
          const entry = (await libraryIndex())[library.value];
          const names = entry?.categories?.length ? entry.categories : everything;
          category.options.values = names;
          if (!names.includes(category.value)) category.value = names[0];
          this.setDirtyCanvas?.(true, true);
        } catch (error) {
          console.warn("ProductScene: could not list the library's categories", error);
        }
      };
      const previous = library.callback;
      library.callback = function () {
        const out = previous?.apply(this, arguments);
        refresh();
        return out;
      };
      refresh();
      return result;
    };
  },
});
