"""A real browser on a real ComfyUI canvas: Debian's chromium driven headless by the ``playwright``
package (Playwright's own browser download is not used; scripts/setup_browser.sh installs chromium).

    with canvas_browser(server.url) as canvas:        # one browser, one page at 1600x900
        canvas.load_workflow(json.loads(path.read_text()))
        canvas.page.screenshot(path=...)

Host-agnostic: it only uses what both frontends this pack is tested on offer (1.32.9 with ComfyUI
0.3.75, 1.49.6 with 0.33.0): ``app``, ``app.graph``, ``app.canvas``, ``LiteGraph``, the settings API
and the command ``Comfy.Canvas.FitView``.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("PRODUCTSCENE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 900}

READY = """() => !!(window.app && app.vueAppReady && window.graph && app.canvas
  && app.extensionManager?.workflow?.activeWorkflow
  && Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > 50)"""


class BrowserMissing(RuntimeError):
    pass


def ensure_browser() -> str:
    """The chromium executable, installed by scripts/setup_browser.sh if missing; raises
    BrowserMissing with the script's message otherwise."""
    script = ROOT / "scripts" / "setup_browser.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not os.access(CHROMIUM, os.X_OK):
        raise BrowserMissing(
            f"the canvas tests need a chromium at {CHROMIUM} (scripts/setup_browser.sh exited "
            f"{result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        raise BrowserMissing("the canvas tests need the playwright package (pip install -r requirements-dev.txt)") from e
    return CHROMIUM


def post_settings(url: str, settings: dict) -> None:
    request = urllib.request.Request(url + "/api/settings", data=json.dumps(settings).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        r.read()


class Canvas:
    """One page of the ComfyUI frontend. ``events`` collects console errors, page errors, dialogs
    (alerts are dismissed and recorded) and failed requests."""

    def __init__(self, page, url: str):
        self.page = page
        self.url = url
        self.dialogs: list[str] = []
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []
        self.failed_requests: list[tuple[int, str]] = []
        page.on("dialog", self._on_dialog)
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("response", lambda r: self.failed_requests.append((r.status, r.url)) if r.status >= 400 else None)
        page.add_init_script("try { localStorage['vueNodesBannerDismissed'] = 'true' } catch (e) {}")

    def _on_dialog(self, dialog) -> None:
        if dialog.type == "beforeunload":  # leaving the page on purpose (reload): let it go
            dialog.accept()
            return
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def open(self, timeout_ms: int = 90_000) -> None:
        self.page.goto(self.url)
        self.page.wait_for_function(READY, timeout=timeout_ms)

    def reset_events(self) -> None:
        self.dialogs.clear()
        self.page_errors.clear()
        self.console_errors.clear()
        self.failed_requests.clear()

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def load_workflow(self, workflow: dict) -> None:
        self.evaluate("""async (wf) => {
            await app.loadGraphData(wf, true, true, null, {showMissingNodesDialog: false});
        }""", workflow)
        self.page.wait_for_timeout(300)

    def open_dialogs(self) -> list[str]:
        """Dialogs the frontend shows (missing nodes, errors, templates ...): their text, shortened."""
        return self.evaluate("() => [...document.querySelectorAll('[role=dialog]')].map(d => d.innerText.slice(0, 200))")

    def close_dialogs(self) -> None:
        """Close what is open as a user would: Escape, else the dialog's close button."""
        for attempt in range(4):
            if not self.open_dialogs():
                return
            if attempt == 0:
                self.page.keyboard.press("Escape")
            else:
                labelled = self.page.locator("[role=dialog] button[aria-label='Close' i]:visible")
                button = labelled.first if labelled.count() else self.page.locator("[role=dialog] button:visible").last
                button.click(timeout=5000)
            self.page.wait_for_timeout(400)

    def fit_view(self) -> float:
        self.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        self.page.wait_for_timeout(400)
        return self.evaluate("() => { app.canvas.draw(true, true); return app.canvas.ds.scale; }")

    def nodes(self) -> list[dict]:
        return self.evaluate("""() => app.graph.nodes.map(n => ({
            id: n.id, type: n.type, title: n.title, pos: [...n.pos], size: [...n.size],
            rect: [...(n.boundingRect ?? [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
                                           n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT])],
            known: n.type in LiteGraph.registered_node_types,
            has_errors: !!n.has_errors,
        }))""")


@contextlib.contextmanager
def canvas_browser(url: str, *, settings: dict | None = None):
    """A headless chromium on ``url`` (ComfyUI's frontend), ready to use. ``settings`` are posted
    first (a fresh user would get the templates dialog; Comfy.TutorialCompleted hides it)."""
    executable = ensure_browser()
    from playwright.sync_api import sync_playwright

    post_settings(url, {"Comfy.TutorialCompleted": True, **(settings or {})})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            canvas = Canvas(page, url)
            canvas.open()
            yield canvas
        finally:
            browser.close()


def overlaps(nodes: list[dict], gap: float = 0.0) -> list[tuple]:
    """Pairs of nodes whose bounding boxes (title bar included) intersect."""
    out = []
    for i, a in enumerate(nodes):
        ax, ay, aw, ah = a["rect"]
        for b in nodes[i + 1:]:
            bx, by, bw, bh = b["rect"]
            if ax < bx + bw + gap and bx < ax + aw + gap and ay < by + bh + gap and by < ay + ah + gap:
                out.append((a["id"], a["title"] or a["type"], b["id"], b["title"] or b["type"]))
    return out
