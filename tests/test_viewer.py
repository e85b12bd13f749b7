"""The circuits CLI end to end on a tiny saved model and suite, and the offline viewer driven in
headless Chromium (Debian's `chromium` + pip's playwright; skipped without them unless
SCAE_REQUIRE_BROWSER=1, which CI sets)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import circuits as C
from dictionary_learning.graph_format import check_feature, check_graph, check_graph_metadata
from tests.helpers import random_texts, tiny_hf_gpt2, tiny_tokenizer
from tests.scae_fixtures import random_connections, random_suite

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def chromium() -> str | None:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    return path or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def circuits_dir(tmp_path_factory):
    """`python circuits.py` on a saved tiny GPT-2 and suite: two prompts, pages computed."""
    root = tmp_path_factory.mktemp("circuits")
    hf = tiny_hf_gpt2(n_layer=2, d_model=32, n_head=4, n_ctx=64)
    hf.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(" ".join(random_texts(400, seed=1, min_len=20, max_len=60)))
    suite = random_suite(n_layers=2, d=32, F=40, k=5, seed=0, dtype=torch.float32)
    suite.set_connections(random_connections(suite, C=12))
    suite.save_pretrained(root / "suite", meta={
        "model_name": str(root / "model"),
        "buffer": {"ctx_len": 33, "data": str(root / "text.txt")}})
    index = C.main(["--suite", str(root / "suite"), "--prompt", "To be, or not to be",
                    "--prompt", "that is the question", "--target", "?", "--target", " ",
                    "--out", str(root / "out"), "--page-tokens", "512"])
    return index.parent


def test_cli_writes_the_fields_files(circuits_dir):
    index = json.loads((circuits_dir / "graph-metadata.json").read_text())
    check_graph_metadata(index)
    assert len(index["graphs"]) == 2
    for meta in index["graphs"]:
        graph = json.loads((circuits_dir / f"{meta['slug']}.json").read_text())
        check_graph(graph)
        assert graph["metadata"]["scan"] == "./data/features/scae"
        target = [n for n in graph["nodes"] if n.get("is_target_logit")]
        assert len(target) == 1
        for node in graph["nodes"]:
            if node["feature_type"] == "cross layer transcoder":
                # `circuit-tracer start-server` maps ./data/* to the graph folder
                path = circuits_dir / "features" / "scae" / f"{node['feature']}.json"
                feature = json.loads(path.read_text())
                check_feature(feature)
                assert (feature["transcoder_id"], feature["index"]) == (node["module"],
                                                                        node["index"])
    assert (circuits_dir / "index.html").is_file() and (circuits_dir / "viewer-data.js").is_file()
    html = (circuits_dir / "index.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html


def test_viewer_in_chromium(circuits_dir, tmp_path):
    exe = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        exe = None
    if exe is None:
        if os.environ.get("SCAE_REQUIRE_BROWSER") == "1":
            pytest.fail("SCAE_REQUIRE_BROWSER=1 but Chromium or playwright is missing: "
                        "apt-get install -y chromium; pip install playwright==1.65.2")
        pytest.skip("no Chromium/playwright (apt-get install -y chromium; pip install playwright)")
    data = json.loads((circuits_dir / "viewer-data.js").read_text()
                      .removeprefix("window.SCAE_DATA = ").rstrip().rstrip(";"))
    graph = data["graphs"][0]
    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto((circuits_dir / "index.html").as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)

        # every node and edge of the pruned graph is drawn
        assert page.locator("#nodes .node").count() == len(graph["nodes"])
        assert page.locator("#edges .edge").count() == len(graph["links"])

        # click the transcoder feature with the most incoming edges
        feats = [n for n in graph["nodes"] if n.get("module", "").startswith("mlp_")]
        n_in = {n["node_id"]: sum(e["target"] == n["node_id"] for e in graph["links"])
                for n in feats}
        node = max(feats, key=lambda n: n_in[n["node_id"]])
        fpage = data["pages"][f"{node['module']}/{node['index']}"]
        page.click(f".node[data-node-id='{node['node_id']}']")
        panel = page.locator("#panel")
        assert page.locator("#panel table.incoming tr").count() == min(40, n_in[node["node_id"]])
        top = fpage["examples_quantiles"][0]["examples"][0]
        first_ctx = panel.locator(".examples .ctx").first.inner_text()
        assert first_ctx == "".join(top["tokens"])
        assert page.locator("#panel table.connections tr").count() == \
            len(fpage["connections"]) + 1
        # follow a connection to the upstream feature's page
        up = fpage["connections"][0]
        panel.locator("table.connections a.feat").first.click()
        assert page.locator("#feature-page").get_attribute("data-page") == \
            f"{up['module']}/{up['index']}"

        # the threshold slider hides nodes above the influence threshold
        page.locator("#threshold").fill("0.5")
        keep = [n for n in graph["nodes"] if n["feature_type"] in ("embedding", "logit")
                or n["influence"] <= 0.5]
        ids = {n["node_id"] for n in keep}
        assert page.locator("#nodes .node").count() == len(keep)
        assert page.locator("#edges .edge").count() == sum(
            e["source"] in ids and e["target"] in ids for e in graph["links"])
        page.locator("#threshold").fill("1")

        # search by feature id
        attn = next(n for n in graph["nodes"] if n.get("module", "").startswith("attn_"))
        page.fill("#search", str(attn["feature"]))
        page.press("#search", "Enter")
        assert page.locator(".node.match").count() >= 1
        assert page.locator("#feature-page").get_attribute("data-page") == \
            f"{attn['module']}/{attn['index']}"
        page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
        browser.close()
    assert (tmp_path / "viewer.png").stat().st_size > 1000
    assert not errors, errors
    assert requests and all(u.startswith("file://") for u in requests), requests
