"""`dvc plots show` / `dvc plots diff` pages render offline in a real browser (headless Chromium).

A tiny finished run is built in a temporary git+DVC repository with this project's dvc.yaml, plot templates,
HTML template and the real figures stage. Each page is opened over Chromium's DevTools protocol (aiohttp
websocket): the test records every request the page makes, waits for every Vega view, and counts the marks
each drew. A screenshot of each page goes to test-artifacts/.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import time
from pathlib import Path

from digitpairs.core.paths import VENDOR_JS
from digitpairs.report import figures

import aiohttp
import pandas as pd
import pytest
import yaml

from tests.e2e import dvc, sh
from tests.test_figures import run_stage, write_inputs

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # a guard: any name lookup fails, so nothing could leave
    "--window-size=1400,1000",
    "--remote-debugging-port=0",
]
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")

# Counts every item in a data mark (role "mark") of each view's scenegraph: axes, legends and titles excluded.
MARKS_JS = """
(() => {
  LAYOUT

  const count = (node) => {
    let n = 0;
    if (node.marktype && node.marktype !== 'group' && node.role === 'mark') n += (node.items || []).length;
    for (const it of node.items || []) if (it && it.items) n += count(it);
    return n;
  };
  const missing = (id) => ({id, querySelector: () => null, querySelectorAll: () => []});
  const containers = IDS.map((id) => document.getElementById(id) || missing(id));
  return JSON.stringify({
    containers: containers.map((d) => ({
      id: d.id,
      drawn: !!d.querySelector('.vega-embed canvas, .vega-embed svg'),
      // drawn surface: SVG shapes, or canvas pixels
      surface: [...d.querySelectorAll('.vega-embed svg')]
        .reduce((n, s) => n + s.querySelectorAll('path,rect,line,text').length, 0)
        + [...d.querySelectorAll('.vega-embed canvas')].reduce((n, c) => n + c.width * c.height, 0),
    })),
    views: (window.dvcPlots || {views: []}).views.map((v) => ({el: v.el, marks: count(v.view.scenegraph().root)})),
    errors: (window.dvcPlots || {errors: ['window.dvcPlots missing: not the project HTML template']}).errors,
    images: [...document.images].map((i) => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0})),
    layout: (window.dvcPlots || {views: []}).views.map((v) => layout(v)),
  });
})()
"""

# What a person sees in each view, in page pixels: its box, every axis (orientation from the spread of
# its labels, label texts and positions, the panel it belongs to) and every line (its points' y range
# within its panel). Vega's scenegraph: group items carry x/y offsets and the panel size; an axis is a
# role 'axis' node whose 'axis-label' items hold the tick texts; a line is one 'line' mark item list.
LAYOUT_JS = """
const layout = (v) => {
  const axes = [], lines = [], bars = [];
  const labelsOf = (node, acc) => {
    for (const it of node.items || []) {
      if (node.role === 'axis-label' && it.text !== undefined && it.text !== '') {
        acc.push({x: it.x, y: it.y, text: String(it.text)});
      }
      if (it && it.items) labelsOf(it, acc);
    }
    return acc;
  };
  const walk = (node, panel) => {
    for (const it of node.items || []) {
      if (!it) continue;
      let p = panel;
      const plain = node.role !== 'axis' && node.role !== 'legend';
      if (node.marktype === 'group' && it.height > 0 && it.width > 0 && plain) {
        p = {h: it.height, w: it.width};
      }
      if (node.role === 'axis') {
        const labels = labelsOf(it, []);
        const xs = labels.map((l) => l.x), ys = labels.map((l) => l.y);
        const spread = (a) => (a.length ? Math.max(...a) - Math.min(...a) : 0);
        const vertical = labels.length > 1 && spread(ys) > spread(xs);
        axes.push({vertical, n: labels.length, texts: labels.map((l) => l.text).slice(0, 20),
                   span: vertical ? spread(ys) : spread(xs), panel: p});
        continue;
      }
      if (node.marktype === 'line' && node.role === 'mark') {
        const ys = (node.items || []).map((q) => q.y).filter((y) => Number.isFinite(y));
        if (ys.length > 1) lines.push({h: p ? p.h : 0, min: Math.min(...ys), max: Math.max(...ys), n: ys.length});
        break;
      }
      if (node.marktype === 'rect' && node.role === 'mark' && it.width !== undefined) bars.push(it.width);
      if (it.items) walk(it, p);
    }
  };
  walk(v.view.scenegraph().root, null);
  const box = document.querySelector(v.el).getBoundingClientRect();
  const embed = document.querySelector(v.el + ' .vega-embed') || document.querySelector(v.el);
  const inner = embed.getBoundingClientRect();
  const title = [];
  const titles = (node) => {
    for (const it of node.items || []) {
      if (node.role === 'title-text') title.push(String(it.text));
      if (it && it.items) titles(it);
    }
  };
  titles(v.view.scenegraph().root);
  return {el: v.el, left: Math.min(box.left, inner.left),
          right: Math.max(box.right, inner.right, box.left + embed.scrollWidth),
          top: box.top + window.scrollY, bottom: Math.max(box.bottom, inner.bottom) + window.scrollY,
          title: title.join(' '), axes, lines, bars};
};
"""

if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("chromium is not installed (apt-get install chromium); CI must have it", allow_module_level=True)


def _live_curves(root: Path, scale: float) -> None:
    """dvclive-style training curves, as the train stage writes them."""
    for variant in figures.VARIANTS:
        d = root / "models_out/live/plots/metrics" / variant
        d.mkdir(parents=True, exist_ok=True)
        rows = "".join(f"{s}\t{scale * (1 + 1 / (s + 1)):.4f}\n" for s in range(5))
        (d / "train_loss.tsv").write_text("step\ttrain_loss\n" + rows)


@pytest.fixture(scope="module")
def run_repo(tmp_path_factory) -> Path:
    """A git+DVC repository holding a tiny finished run: the project's plot config and the real figures stage."""
    root = tmp_path_factory.mktemp("plots-run")
    sh(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    shutil.copy(REPO / ".dvc/config", root / ".dvc/config")
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots", ignore=shutil.ignore_patterns("vendor"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    write_inputs(root)
    grad = pd.read_csv(root / "data/grad_norms.csv")
    grad.loc[0, "norm"] = 0.0  # a vanishing gradient: a log axis must leave it out, not collapse
    grad.to_csv(root / "data/grad_norms.csv", index=False)
    _live_curves(root, 1.0)
    r = run_stage(root)
    assert r.returncode == 0, r.stderr
    # the stage itself wrote the offline bundle the page loads: no extra step after `dvc repro`
    assert (root / VENDOR_JS).is_file()
    return root


async def _render(page: Path, shot: Path, ids: list[str], timeout: float = 60) -> tuple[dict, list[str]]:
    """Open ``page`` in headless Chromium; return the marks report and every URL the page requested."""
    profile = page.parent.parent / f".chromium-{page.parent.name}"
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with http.ws_connect(ws_url, max_msg_size=0) as ws:
                js = MARKS_JS.replace("IDS", json.dumps(ids)).replace("LAYOUT", LAYOUT_JS)
                return await _drive(ws, page, shot, js, timeout)
    finally:
        proc.kill()
        await proc.wait()


async def _drive(
    ws: aiohttp.ClientWebSocketResponse, page: Path, shot: Path, marks_js: str, timeout: float
) -> tuple[dict, list]:
    ids = iter(range(1, 1_000_000))
    requests: list[str] = []
    console: list[str] = []
    loaded = asyncio.Event()
    pending: dict[int, asyncio.Future] = {}

    async def reader() -> None:
        async for msg in ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in pending:
                pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Network.requestWillBeSent":
                requests.append(data["params"]["request"]["url"])
            elif data.get("method") == "Page.loadEventFired":
                loaded.set()
            elif data.get("method") == "Runtime.exceptionThrown":
                console.append(json.dumps(data["params"]["exceptionDetails"])[:500])

    async def call(method: str, **params) -> dict:
        i = next(ids)
        pending[i] = asyncio.get_running_loop().create_future()
        await ws.send_json({"id": i, "method": method, "params": params})
        reply = await asyncio.wait_for(pending[i], timeout)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"]

    task = asyncio.create_task(reader())
    try:
        for domain in ("Network", "Page", "Runtime"):
            await call(f"{domain}.enable")
        await call("Page.navigate", url=page.as_uri())
        await asyncio.wait_for(loaded.wait(), timeout)
        deadline = time.monotonic() + timeout
        while True:  # Vega renders asynchronously after the load event
            res = await call("Runtime.evaluate", expression=marks_js, returnByValue=True)
            report = json.loads(res["result"]["value"])
            settled = len(report["views"]) + len(report["errors"]) >= len(report["containers"])
            if settled or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        metrics = await call("Page.getLayoutMetrics")
        size = metrics["cssContentSize"]
        await call("Emulation.setDeviceMetricsOverride", width=int(size["width"]), height=int(size["height"]),
                   deviceScaleFactor=1, mobile=False)  # fmt: skip
        png = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        shot.parent.mkdir(parents=True, exist_ok=True)
        shot.write_bytes(base64.b64decode(png["data"]))
        for view in report["layout"]:  # one screenshot per view, at its size on the page, to look at
            width, height = min(view["right"] + 8, WINDOW), view["bottom"] - view["top"]
            clip = {"x": 0, "y": view["top"], "width": width, "height": height, "scale": 1}
            png = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
            shot.with_name(f"{shot.stem}-{view['el'].lstrip('#')}.png").write_bytes(base64.b64decode(png["data"]))
        report["exceptions"] = console
        return report, requests
    finally:
        task.cancel()


def _check_page(page: Path, shot: Path, n_plots: int) -> dict:
    ids = re.findall(r"vegaEmbed\('#([^']+)'", page.read_text())
    assert len(ids) == n_plots, f"{page} embeds {len(ids)} Vega plots, dvc.yaml declares {n_plots}"
    report, requests = asyncio.run(_render(page, shot, ids))
    remote = [u for u in requests if not u.startswith(LOCAL_SCHEMES)]
    assert not remote, f"the page requested non-local URLs: {remote}"
    assert any(u.endswith("vega-offline.js") for u in requests), requests
    assert not report["errors"] and not report["exceptions"], report
    assert len(report["containers"]) == n_plots, report["containers"]
    assert all(c["drawn"] for c in report["containers"]), report["containers"]
    assert all(c["surface"] > 0 for c in report["containers"]), report["containers"]
    assert len(report["views"]) == n_plots and all(v["marks"] > 0 for v in report["views"]), report["views"]
    assert report["images"] and all(i["ok"] for i in report["images"]), report["images"]
    _check_readable(report["layout"])
    return report


WINDOW = 1400  # px, the browser window the page must fit (CHROMIUM_FLAGS)


def _check_readable(layout: list[dict]) -> None:
    """What a person sees, view by view: inside the window's width, a y axis with tick labels that span
    the data, lines that use their panel (not collapsed onto an edge), and a title of its own."""
    for view in layout:
        el, lines = view["el"], view["lines"]
        assert view["left"] >= 0 and view["right"] <= WINDOW, f"{el} spans {view['left']:.0f}-{view['right']:.0f} px"
        y_axes = [a for a in view["axes"] if a["vertical"]]
        assert y_axes and all(a["n"] >= 2 for a in y_axes), f"{el}: a y axis without tick labels: {view['axes']}"
        for line in lines:
            h = line["h"]
            assert h > 0, f"{el}: a line outside any panel: {line}"
            pinned = line["max"] - line["min"] < 1 and (line["min"] <= 1 or line["max"] >= h - 1)
            assert not pinned, f"{el}: a line collapsed onto the panel's edge: {line}"
        if lines:
            spans = sorted((ln["max"] - ln["min"]) / ln["h"] for ln in lines)
            assert spans[len(spans) // 2] >= 0.1, f"{el}: most lines are flat in their panel: {spans}"
            data = max(ln["max"] for ln in lines) - min(ln["min"] for ln in lines)
            ticks = max(a["span"] for a in y_axes)
            assert ticks >= 0.5 * min(data, max(ln["h"] for ln in lines)), f"{el}: y ticks span {ticks} px of {data}"
        if view["bars"]:  # a bar a person can see and tell apart (not a 1 px sliver)
            widths = sorted(view["bars"])
            assert widths[len(widths) // 2] >= 4, f"{el}: bars too thin to read: {widths[:10]}"
    titles = [v["title"] for v in layout]
    assert len(set(titles)) == len(titles), f"views with the same title: {titles}"
    for view in layout:
        named = [v for v in figures.VARIANTS if f"_{v}_" in view["el"]]
        assert all(v in view["title"] for v in named), f"{view['el']} does not name its variant: {view['title']}"


def _interactive_plots(root: Path) -> int:
    """How many Vega plots a page should hold: one per data file of dvc.yaml's top-level plots (images aside)."""
    entries = [
        next(iter(e)) if isinstance(e, dict) else e for e in yaml.safe_load((root / "dvc.yaml").read_text())["plots"]
    ]
    paths = [root / e for e in entries if not e.endswith(".png")]
    return sum(len([f for f in p.rglob("*") if f.is_file()]) if p.is_dir() else 1 for p in paths)


def test_plots_show_renders_offline(run_repo: Path):
    dvc(run_repo, "plots", "show")
    _check_page(run_repo / "dvc_plots/index.html", ARTIFACTS / "dvc-plots-show.png", _interactive_plots(run_repo))


def test_plots_diff_overlays_revisions(run_repo: Path):
    """Commit the run, change the results, and diff: every view holds both revisions' data."""
    sh(run_repo, "git", "add", "-f", ".")
    sh(run_repo, "git", "-c", "commit.gpgsign=false", "commit", "-q", "-m", "baseline run")
    lw = pd.read_csv(run_repo / "data/loss_weights.csv")
    lw["score"] -= 0.05
    lw.to_csv(run_repo / "data/loss_weights.csv", index=False)
    cv = pd.read_csv(run_repo / "data/cv/pair.csv")
    cv["score"] -= 0.1
    cv.to_csv(run_repo / "data/cv/pair.csv", index=False)
    _live_curves(run_repo, 0.5)
    assert run_stage(run_repo).returncode == 0
    dvc(run_repo, "plots", "diff", "HEAD", "-o", "dvc_plots_diff")
    html = (run_repo / "dvc_plots_diff/index.html").read_text()
    assert '"rev": "HEAD"' in html and '"rev": "workspace"' in html
    n = _interactive_plots(run_repo)
    _check_page(run_repo / "dvc_plots_diff/index.html", ARTIFACTS / "dvc-plots-diff.png", n)
