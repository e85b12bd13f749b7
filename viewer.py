"""The offline circuit viewer: DIR/index.html plus DIR/viewer-data.js, opened from file://.

The page inlines the project's own `viewer_assets/viewer.js` and `viewer.css` (no library, no CDN,
no network request) and loads its data with a <script> tag, which browsers allow from file://
(fetch is not). It draws each pruned graph (rows: attention and MLP dictionaries of each layer;
columns: prompt positions; edge width: |weight|; colour: sign) and shows feature pages.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from dictionary_learning.files import atomic_write

ASSETS = Path(__file__).resolve().parent / "viewer_assets"

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; script-src 'unsafe-inline' file: 'self';
               style-src 'unsafe-inline'; img-src data:">
<title>SCAE circuits: {title}</title>
<style>
{css}
</style>
</head>
<body>
<header>
  <h1>SCAE circuits</h1>
  <label>graph <select id="graph-select"></select></label>
  <label>node influence &le; <input id="threshold" type="range" min="0" max="1" step="0.01"
         value="1"><span id="threshold-value">1.00</span></label>
  <label>feature <input id="search" type="search" placeholder="mlp_2/137 or feature id" size="22">
  <button id="search-button">find</button><span id="search-result"></span></label>
  <span id="stats"></span>
</header>
<div id="prompt"></div>
<main><div id="graph-wrap"></div><div id="panel"></div></main>
<script src="viewer-data.js"></script>
<script>
{js}
</script>
</body>
</html>
"""


def viewer_pages(graphs: list[dict], pages, neighbours: bool = True) -> dict[str, dict]:
    """Feature pages the viewer needs: every feature node of the graphs and, with `neighbours`,
    the features their pages link to (connections and downstream lists)."""
    if pages is None:
        return {}
    wanted = {(n["module"], n["index"]) for g in graphs for n in g["nodes"]
              if n["feature_type"] == "cross layer transcoder"}
    out = {f"{m}/{i}": pages.feature_file(m, i) for m, i in sorted(wanted)}
    if neighbours:
        extra = {(r["module"], r["index"]) for p in list(out.values())
                 for r in p["connections"] + p["downstream"]} - wanted
        for m, i in sorted(extra):
            page = pages.feature_file(m, i)
            for q in page["examples_quantiles"]:
                q["examples"] = q["examples"][:3]
            out[f"{m}/{i}"] = page
    return out


def write_viewer(out_dir: str | Path, graphs: list[dict], pages=None) -> Path:
    """Write out_dir/index.html and out_dir/viewer-data.js for graph JSONs (`circuits.graph_json`)
    and `feature_pages.FeaturePages`; returns the index.html path."""
    if not graphs:
        raise ValueError("write_viewer needs at least one graph")
    out_dir = Path(out_dir)
    data = {"graphs": graphs, "pages": viewer_pages(graphs, pages)}
    # "</" inside a script would end it early; JSON allows the escaped form
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    atomic_write(out_dir / "viewer-data.js",
                 lambda fh: fh.write(f"window.SCAE_DATA = {blob};\n".encode()))
    page = PAGE.format(title=html.escape(graphs[0]["metadata"]["prompt"][:60]),
                       css=(ASSETS / "viewer.css").read_text(),
                       js=(ASSETS / "viewer.js").read_text())
    path = out_dir / "index.html"
    atomic_write(path, lambda fh: fh.write(page.encode()))
    return path
