// SCAE circuit viewer: draws a pruned attribution graph (circuit-tracer's JSON) and feature pages.
// Project-written, no libraries, no network: data comes from window.SCAE_DATA (viewer-data.js).
(function () {
  "use strict";
  const DATA = window.SCAE_DATA;
  const SVGNS = "http://www.w3.org/2000/svg";
  const COL_W = 64, ROW_H = 46, LEFT = 70, TOP = 20, R = 5;
  const state = { graph: null, threshold: 1.0, selected: null, nodes: [], links: [] };

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svgEl(tag, attrs) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  const fmt = (x, d = 3) => (x === null || x === undefined ? "" : Number(x).toFixed(d));
  const pageKey = (module, index) => module + "/" + index;

  // ----------------------------------------------------------------------------- layout
  function rowOf(node, nRows) {
    if (node.feature_type === "embedding") return -1;
    if (node.feature_type === "logit") return nRows;
    return +node.layer;
  }
  function kindClass(node) {
    if (node.feature_type === "embedding") return "embedding";
    if (node.feature_type === "logit") return "logit";
    if (node.feature_type.includes("error")) return "error";
    return node.module && node.module.startsWith("attn") ? "attn" : "mlp";
  }
  function visibleNodes(graph) {
    return graph.nodes.filter(n => n.feature_type === "embedding" || n.feature_type === "logit" ||
                              (n.influence !== null && n.influence <= state.threshold + 1e-12));
  }

  function draw() {
    const graph = state.graph;
    const meta = graph.metadata;
    const rows = meta.info && meta.info.dictionaries ? meta.info.dictionaries : [];
    const nRows = rows.length;
    const nPos = meta.prompt_tokens.length;
    const nodes = visibleNodes(graph);
    const ids = new Set(nodes.map(n => n.node_id));
    const links = graph.links.filter(l => ids.has(l.source) && ids.has(l.target));
    state.nodes = nodes;
    state.links = links;

    // positions: nodes of one (row, position) cell spread across the column
    const cells = new Map();
    for (const n of nodes) {
      const key = rowOf(n, nRows) + ":" + n.ctx_idx;
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(n);
    }
    const xy = new Map();
    for (const [key, group] of cells) {
      const [row, pos] = key.split(":").map(Number);
      group.sort((a, b) => (b.activation || 0) - (a.activation || 0));
      group.forEach((n, i) => {
        const x = LEFT + pos * COL_W + COL_W / 2 + (i - (group.length - 1) / 2) *
          Math.min(2.2 * R, (COL_W - 8) / Math.max(1, group.length));
        const y = TOP + (nRows - row) * ROW_H;
        xy.set(n.node_id, [x, y]);
      });
    }
    const width = LEFT + nPos * COL_W + 20, height = TOP + (nRows + 2) * ROW_H + 30;
    const svg = svgEl("svg", { id: "graph", width, height, viewBox: `0 0 ${width} ${height}` });
    const labels = ["emb"].concat(rows).concat(["logits"]);
    labels.forEach((name, i) => {
      const t = svgEl("text", { x: 4, y: TOP + (nRows - (i - 1)) * ROW_H + 3, class: "row-label" });
      t.textContent = name;
      svg.appendChild(t);
    });
    meta.prompt_tokens.forEach((tok, p) => {
      const t = svgEl("text", { x: LEFT + p * COL_W + COL_W / 2, y: height - 8,
                                 "text-anchor": "middle", class: "tok-label" });
      t.textContent = tok.length > 9 ? tok.slice(0, 8) + "…" : tok;
      svg.appendChild(t);
    });

    const maxW = Math.max(1e-12, ...links.map(l => Math.abs(l.weight)));
    const edgeLayer = svgEl("g", { id: "edges" });
    for (const l of links) {
      const [x1, y1] = xy.get(l.source), [x2, y2] = xy.get(l.target);
      const my = (y1 + y2) / 2;
      const path = svgEl("path", {
        d: `M${x1},${y1} C${x1},${my} ${x2},${my} ${x2},${y2}`,
        class: "edge " + (l.weight >= 0 ? "pos" : "neg"),
        "stroke-width": (0.4 + 4 * Math.sqrt(Math.abs(l.weight) / maxW)).toFixed(2),
        "data-source": l.source, "data-target": l.target,
      });
      const title = svgEl("title");
      title.textContent = `${l.source} → ${l.target}: ${fmt(l.weight, 4)}`;
      path.appendChild(title);
      edgeLayer.appendChild(path);
    }
    svg.appendChild(edgeLayer);
    const nodeLayer = svgEl("g", { id: "nodes" });
    for (const n of nodes) {
      const [x, y] = xy.get(n.node_id);
      const c = svgEl("circle", { cx: x, cy: y, r: R, class: "node " + kindClass(n),
                                  "data-node-id": n.node_id, "data-feature": n.feature });
      const title = svgEl("title");
      title.textContent = nodeTitle(n);
      c.appendChild(title);
      c.addEventListener("click", () => selectNode(n.node_id));
      nodeLayer.appendChild(c);
    }
    svg.appendChild(nodeLayer);
    const wrap = document.getElementById("graph-wrap");
    wrap.replaceChildren(svg);
    document.getElementById("stats").textContent =
      `${nodes.length} nodes, ${links.length} edges (of ${graph.nodes.length} / ${graph.links.length})`;
    document.getElementById("prompt").textContent = meta.prompt;
    if (state.selected && ids.has(state.selected)) highlight(state.selected);
  }

  function nodeTitle(n) {
    if (n.feature_type === "embedding")
      return `emb “${state.graph.metadata.prompt_tokens[n.ctx_idx]}” @${n.ctx_idx}`;
    if (n.feature_type.includes("error")) return `${n.clerp} @${n.ctx_idx}`;
    if (n.feature_type === "logit" ||
        n.feature_type.includes("error")) return n.clerp || n.node_id;
    return `${n.module}/${n.index} @${n.ctx_idx} act ${fmt(n.activation)}`;
  }

  // ----------------------------------------------------------------------------- selection
  function highlight(nodeId) {
    document.querySelectorAll(".node.selected").forEach(e => e.classList.remove("selected"));
    const c = document.querySelector(`.node[data-node-id="${CSS.escape(nodeId)}"]`);
    if (c) c.classList.add("selected");
    document.querySelectorAll(".edge").forEach(e => {
      const hot = e.dataset.source === nodeId || e.dataset.target === nodeId;
      e.classList.toggle("hot", hot);
      e.classList.toggle("dim", !hot);
    });
  }

  function selectNode(nodeId) {
    state.selected = nodeId;
    highlight(nodeId);
    const node = state.graph.nodes.find(n => n.node_id === nodeId);
    showPanel(node);
  }

  function nodeLink(nodeId) {
    const n = state.graph.nodes.find(m => m.node_id === nodeId);
    const a = el("a", { class: "feat" }, n ? nodeTitle(n) : nodeId);
    a.addEventListener("click", () => selectNode(nodeId));
    return a;
  }

  function featureLink(module, index) {
    const a = el("a", { class: "feat", "data-page": pageKey(module, index) }, `${module}/${index}`);
    a.addEventListener("click", () => openFeature(module, index));
    return a;
  }

  function openFeature(module, index) {
    const inGraph = state.nodes.find(n => n.module === module && n.index === index);
    if (inGraph) return selectNode(inGraph.node_id);
    state.selected = null;
    highlight("");
    showPanel(null, module, index);
  }

  function edgeTable(title, rows, otherEnd) {
    const panel = document.getElementById("panel");
    panel.appendChild(el("h3", {}, `${title} (${rows.length})`));
    const table = el("table", { class: title.startsWith("Incoming") ? "incoming" : "outgoing" });
    rows.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
    for (const l of rows.slice(0, 40)) {
      const tr = el("tr");
      const td = el("td");
      td.appendChild(nodeLink(l[otherEnd]));
      tr.appendChild(td);
      tr.appendChild(el("td", { class: "num" }, fmt(l.weight, 4)));
      table.appendChild(tr);
    }
    panel.appendChild(table);
  }

  function showPanel(node, module, index) {
    const panel = document.getElementById("panel");
    panel.replaceChildren();
    if (node) {
      panel.appendChild(el("h2", {}, nodeTitle(node)));
      panel.appendChild(el("div", { class: "muted" },
        `node ${node.node_id} · feature id ${node.feature} · influence ${fmt(node.influence)}` +
        (node.total_effect !== undefined ? ` · total effect on target ${fmt(node.total_effect, 4)}` : "")));
      edgeTable("Incoming edges", state.links.filter(l => l.target === node.node_id), "source");
      edgeTable("Outgoing edges", state.links.filter(l => l.source === node.node_id), "target");
      module = node.module;
      index = node.index;
    }
    if (module === undefined) return;
    const page = DATA.pages[pageKey(module, index)];
    if (!node) panel.appendChild(el("h2", {}, `${module}/${index}`));
    if (!page) {
      panel.appendChild(el("p", { class: "muted" }, "No feature page for this feature."));
      return;
    }
    renderPage(page);
  }

  // ----------------------------------------------------------------------------- feature page
  function renderPage(page) {
    const panel = document.getElementById("panel");
    const div = el("div", { id: "feature-page", "data-page": pageKey(page.module, page.index) });
    panel.appendChild(div);
    div.appendChild(el("h3", {}, `Feature page ${page.module}/${page.index}`));
    div.appendChild(el("div", {},
      `frequency ${fmt(100 * page.activation_frequency, 3)}% of ${page.n_tokens} tokens · max ${fmt(page.act_max)}`));
    div.appendChild(histogram(page));
    for (const [title, toks, cls] of [["Top logits", page.top_logits, "up"],
                                       ["Bottom logits", page.bottom_logits, "down"]]) {
      div.appendChild(el("h3", {}, title));
      const box = el("div", { class: "logits " + cls });
      toks.forEach(t => box.appendChild(el("span", {}, t)));
      div.appendChild(box);
    }
    if (page.connections && page.connections.length) {
      div.appendChild(el("h3", {}, `Connections (${page.connections.length})`));
      const table = el("table", { class: "connections" });
      const head = el("tr");
      ["upstream", "virtual w", "mean contrib", "frac of pre"].forEach(h => head.appendChild(el("th", {}, h)));
      table.appendChild(head);
      for (const c of page.connections) {
        const tr = el("tr");
        const td = el("td");
        td.appendChild(featureLink(c.module, c.index));
        tr.appendChild(td);
        for (const v of [c.virtual_weight, c.mean_contribution, c.fraction_of_pre_activation])
          tr.appendChild(el("td", { class: "num" }, fmt(v, 4)));
        table.appendChild(tr);
      }
      div.appendChild(table);
    }
    if (page.downstream && page.downstream.length) {
      div.appendChild(el("h3", {}, `Downstream features listing it (${page.downstream.length})`));
      const table = el("table", { class: "downstream" });
      for (const d of page.downstream) {
        const tr = el("tr");
        const td = el("td");
        td.appendChild(featureLink(d.module, d.index));
        tr.appendChild(td);
        tr.appendChild(el("td", { class: "num" }, fmt(d.virtual_weight, 4)));
        table.appendChild(tr);
      }
      div.appendChild(table);
    }
    for (const q of page.examples_quantiles) {
      if (!q.examples.length) continue;
      div.appendChild(el("h3", {}, q.quantile_name));
      const box = el("div", { class: "examples" });
      q.examples.forEach(ex => box.appendChild(context(ex, page.act_max)));
      div.appendChild(box);
    }
  }

  function context(ex, actMax) {
    const row = el("div", { class: "ctx" });
    ex.tokens.forEach((tok, i) => {
      const a = ex.tokens_acts_list[i];
      const s = el("span", { title: fmt(a, 3) }, tok);
      if (a > 0) s.style.background = `rgba(255, 120, 0, ${Math.min(1, a / (actMax || 1)).toFixed(3)})`;
      if (i === ex.train_token_ind) s.classList.add("top");
      row.appendChild(s);
    });
    return row;
  }

  function histogram(page) {
    const counts = page.histogram, edges = page.histogram_edges || [];
    const w = 400, h = 50;
    const svg = svgEl("svg", { width: w, height: h + 14, class: "histogram" });
    const first = counts.findIndex(c => c > 0);
    if (first < 0) return svg;
    let last = counts.length - 1;
    while (counts[last] === 0) last--;
    const shown = counts.slice(first, last + 1), max = Math.max(...shown);
    const bw = w / shown.length;
    shown.forEach((c, i) => {
      const bh = (h * c) / max;
      svg.appendChild(svgEl("rect", { x: i * bw, y: h - bh, width: Math.max(1, bw - 1), height: bh,
                                      fill: "#868e96" }));
    });
    for (const [i, anchor] of [[first, "start"], [last + 1, "end"]]) {
      const t = svgEl("text", { x: anchor === "start" ? 0 : w, y: h + 12, "text-anchor": anchor });
      t.textContent = edges.length ? fmt(edges[i], 3) : "";
      svg.appendChild(t);
    }
    return svg;
  }

  // ----------------------------------------------------------------------------- search
  function search(query) {
    document.querySelectorAll(".node.match").forEach(e => e.classList.remove("match"));
    query = query.trim();
    if (!query) return;
    let module = null, index = null, feature = null;
    const m = query.match(/^(attn|mlp)_(\d+)\s*[\/:]\s*(\d+)$/);
    if (m) { module = `${m[1]}_${m[2]}`; index = +m[3]; } else if (/^\d+$/.test(query)) feature = +query;
    const hits = state.nodes.filter(n => n.module !== undefined &&
      ((feature !== null && n.feature === feature) || (module === n.module && index === n.index)));
    hits.forEach(n => {
      const c = document.querySelector(`.node[data-node-id="${CSS.escape(n.node_id)}"]`);
      if (c) c.classList.add("match");
    });
    document.getElementById("search-result").textContent = `${hits.length} node(s)`;
    if (hits.length) return selectNode(hits[0].node_id);
    if (module !== null) return openFeature(module, index);
    if (feature !== null) {
      const page = Object.values(DATA.pages).find(p => p.feature === feature);
      if (page) openFeature(page.module, page.index);
    }
  }

  // ----------------------------------------------------------------------------- start
  function loadGraph(i) {
    state.graph = DATA.graphs[i];
    state.selected = null;
    draw();
    document.getElementById("panel").replaceChildren(el("p", { class: "muted" },
      "Click a node to see its feature page and edges."));
  }

  function init() {
    const select = document.getElementById("graph-select");
    DATA.graphs.forEach((g, i) => select.appendChild(el("option", { value: i }, g.metadata.slug)));
    select.addEventListener("change", () => loadGraph(+select.value));
    const slider = document.getElementById("threshold");
    const label = document.getElementById("threshold-value");
    slider.addEventListener("input", () => {
      state.threshold = +slider.value;
      label.textContent = fmt(state.threshold, 2);
      draw();
    });
    const box = document.getElementById("search");
    box.addEventListener("keydown", e => { if (e.key === "Enter") search(box.value); });
    document.getElementById("search-button").addEventListener("click", () => search(box.value));
    loadGraph(0);
    document.body.dataset.ready = "1";
  }
  init();
})();
