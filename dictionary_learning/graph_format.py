"""The project's model of the field's attribution-graph and feature file formats.

Written from the fields circuit-tracer 0.5.0 declares (`frontend/graph_models.py`,
`frontend/feature_models.py`) and what its viewer relies on (docs/circuits.md): required keys and
their types, unique node ids, links between existing nodes, logit labels containing `(p=`, and an
`influence` on every non-embedding, non-logit node when `node_threshold` is set. Extra keys are
allowed, as pydantic's default does. `check_graph` / `check_feature` raise ValueError naming the
first offending field.
"""

from __future__ import annotations

import math

_NUM = (int, float)


def _fail(where: str, what: str) -> None:
    raise ValueError(f"{where}: {what}")


def _check_fields(obj, spec: dict, where: str) -> None:
    if not isinstance(obj, dict):
        _fail(where, f"expected an object, got {type(obj).__name__}")
    for key, (types, required) in spec.items():
        if key not in obj:
            if required:
                _fail(where, f"missing required key {key!r}")
            continue
        v = obj[key]
        if v is None and not required:
            continue
        if isinstance(v, bool) and bool not in types:
            _fail(f"{where}.{key}", f"expected {types}, got bool")
        if not isinstance(v, types):
            _fail(f"{where}.{key}", f"expected {[t.__name__ for t in types]}, got "
                                    f"{type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            _fail(f"{where}.{key}", f"not a finite number: {v}")


def _check_list(v, types, where: str) -> None:
    if not isinstance(v, list):
        _fail(where, f"expected a list, got {type(v).__name__}")
    for i, x in enumerate(v):
        if not isinstance(x, types) or isinstance(x, bool) and bool not in types:
            _fail(f"{where}[{i}]", f"expected {[t.__name__ for t in types]}, got "
                                   f"{type(x).__name__}")


METADATA = {"slug": ((str,), True), "scan": ((str,), True), "transcoder_list": ((list,), True),
            "prompt_tokens": ((list,), True), "prompt": ((str,), True),
            "node_threshold": (_NUM, False), "schema_version": ((int,), False)}
QPARAMS = {"pinnedIds": ((list,), True), "supernodes": ((list,), True),
           "linkType": ((str,), True), "clickedId": ((str,), True), "sg_pos": ((str,), True)}
NODE = {"node_id": ((str,), True), "feature": ((int,), True), "layer": ((str,), True),
        "ctx_idx": ((int,), True), "feature_type": ((str,), True), "jsNodeId": ((str,), True),
        "token_prob": (_NUM, False), "is_target_logit": ((bool,), False),
        "run_idx": ((int,), False),
        "reverse_ctx_idx": ((int,), False), "clerp": ((str,), False),
        "influence": (_NUM, False), "activation": (_NUM, False)}
LINK = {"source": ((str,), True), "target": ((str,), True), "weight": (_NUM, True)}
EXAMPLE = {"tokens_acts_list": ((list,), True), "train_token_ind": ((int,), True),
           "is_repeated_datapoint": ((bool,), True), "tokens": ((list,), True)}
FEATURE = {"transcoder_id": ((str,), True), "index": ((int,), True),
           "examples_quantiles": ((list,), True), "top_logits": ((list,), True),
           "bottom_logits": ((list,), True), "act_min": (_NUM, True), "act_max": (_NUM, True),
           "quantile_values": ((list,), True), "histogram": ((list,), True),
           "activation_frequency": (_NUM, True)}


def check_graph(graph: dict) -> None:
    """Raise ValueError unless `graph` is a valid `<slug>.json` attribution graph."""
    _check_fields(graph, {"metadata": ((dict,), True), "qParams": ((dict,), True),
                          "nodes": ((list,), True), "links": ((list,), True)}, "graph")
    meta = graph["metadata"]
    _check_fields(meta, METADATA, "metadata")
    _check_list(meta["transcoder_list"], (str,), "metadata.transcoder_list")
    _check_list(meta["prompt_tokens"], (str,), "metadata.prompt_tokens")
    _check_fields(graph["qParams"], QPARAMS, "qParams")
    thresholded = meta.get("node_threshold") is not None
    ids = set()
    n_ctx = len(meta["prompt_tokens"])
    for i, node in enumerate(graph["nodes"]):
        where = f"nodes[{i}]"
        _check_fields(node, NODE, where)
        if node["node_id"] in ids:
            _fail(f"{where}.node_id", f"duplicate id {node['node_id']!r}")
        ids.add(node["node_id"])
        if not 0 <= node["ctx_idx"] < n_ctx:
            _fail(f"{where}.ctx_idx", f"{node['ctx_idx']} is outside the {n_ctx} prompt tokens")
        kind = node["feature_type"]
        if kind == "logit" and "(p=" not in node.get("clerp", ""):
            _fail(f"{where}.clerp", "a logit's label must contain '(p=' (the viewer splits on it)")
        if thresholded and kind not in ("embedding", "logit") and node.get("influence") is None:
            _fail(f"{where}.influence", "missing: with metadata.node_threshold set the viewer "
                                        "hides nodes without influence")
    for i, link in enumerate(graph["links"]):
        _check_fields(link, LINK, f"links[{i}]")
        for end in ("source", "target"):
            if link[end] not in ids:
                _fail(f"links[{i}].{end}", f"{link[end]!r} is not a node id")


def check_graph_metadata(index: dict) -> None:
    """Raise ValueError unless `index` is a valid graph-metadata.json ({"graphs": [...]})."""
    _check_fields(index, {"graphs": ((list,), True)}, "graph-metadata")
    slugs = set()
    for i, meta in enumerate(index["graphs"]):
        _check_fields(meta, METADATA, f"graphs[{i}]")
        if meta["slug"] in slugs:
            _fail(f"graphs[{i}].slug", f"duplicate slug {meta['slug']!r}")
        slugs.add(meta["slug"])


def check_feature(feature: dict) -> None:
    """Raise ValueError unless `feature` is a valid feature file (`<scan>/<feature>.json`)."""
    _check_fields(feature, FEATURE, "feature")
    for key in ("top_logits", "bottom_logits"):
        _check_list(feature[key], (str,), f"feature.{key}")
    for key in ("quantile_values", "histogram"):
        _check_list(feature[key], _NUM, f"feature.{key}")
    for q, quantile in enumerate(feature["examples_quantiles"]):
        where = f"feature.examples_quantiles[{q}]"
        _check_fields(quantile, {"quantile_name": ((str,), True), "examples": ((list,), True)},
                      where)
        for e, ex in enumerate(quantile["examples"]):
            w = f"{where}.examples[{e}]"
            _check_fields(ex, EXAMPLE, w)
            _check_list(ex["tokens"], (str,), f"{w}.tokens")
            _check_list(ex["tokens_acts_list"], _NUM, f"{w}.tokens_acts_list")
            if len(ex["tokens"]) != len(ex["tokens_acts_list"]):
                _fail(w, f"{len(ex['tokens'])} tokens but {len(ex['tokens_acts_list'])} "
                         f"activations")
