"""UI-format <-> API-format workflow conversion, driven by the server's ``/object_info``.

The UI format is what ComfyUI's frontend saves and what ``workflows/*.json`` hold; the API format is what
``POST /prompt`` runs (``workflows/api/*.json``). The tests convert each UI workflow back to API format and
compare it with its committed twin; ``scripts/make_ui_workflows.py`` writes the UI files from the twins.
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NODE_WIDTH = 420   # wide enough that no widget shows a cut label ("source_checkpoint" with a checkpoint name)
LORAX_NODE_WIDTH = 560   # and the pack's verdict lines (nodes/ui_summary.py LINE_WIDTH) beside them
COLUMN_GAP = 40
SEED_NAMES = {"seed", "noise_seed"}


def _inputs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of a node's inputs in declaration order (required, then optional)."""
    out = []
    for section in ("required", "optional"):
        spec = info["input"].get(section, {})
        order = info.get("input_order", {}).get(section, list(spec))
        for name in order:
            entry = spec[name]
            out.append((name, entry[0], entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}))
    return out


def _is_widget(type_, opts) -> bool:
    return (isinstance(type_, list) or type_ in WIDGET_TYPES) and not opts.get("forceInput")


def _has_seed_control(name, type_, opts) -> bool:
    return type_ == "INT" and (opts.get("control_after_generate") or name in SEED_NAMES)


def ui_to_api(ui: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, type_, opts in _inputs(info):
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
                if _is_widget(type_, opts):      # a widget converted to an input still holds a value
                    values.pop(0)
                    if _has_seed_control(name, type_, opts):
                        values.pop(0)
            elif _is_widget(type_, opts) and values:
                inputs[name] = values.pop(0)
                if _has_seed_control(name, type_, opts):
                    values.pop(0)
        entry = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        api[str(node["id"])] = entry
    return api


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def of(nid):
        if nid not in depth:
            depth[nid] = 0
            parents = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2
                       and isinstance(v[0], str)]
            depth[nid] = 1 + max((of(p) for p in parents), default=-1)
        return depth[nid]

    for nid in api:
        of(nid)
    return depth


def api_to_ui(api: dict, object_info: dict) -> dict:
    """A UI-format workflow with the same graph, laid out in columns by dependency depth."""
    depth = _depths(api)
    column_rows: dict[int, int] = {}
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    order = sorted(api, key=lambda n: (depth[n], int(n)))
    for nid in order:
        for value in api[nid]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                out_links.setdefault((value[0], value[1]), [])
    link_ids: dict[tuple[str, str], int] = {}
    for nid in order:
        for name, value in api[nid]["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                link_id = len(links) + 1
                src_type = object_info[api[value[0]]["class_type"]]["output"][value[1]]
                links.append([link_id, int(value[0]), value[1], int(nid), None, src_type])
                link_ids[(nid, name)] = link_id
                out_links[(value[0], value[1])].append(link_id)
    widths = {nid: LORAX_NODE_WIDTH if api[nid]["class_type"].startswith("LoRAX_") else NODE_WIDTH for nid in api}
    column_x = {0: 40}
    for col in range(1, max(depth.values()) + 1):
        column_x[col] = column_x[col - 1] + max(widths[n] for n in api if depth[n] == col - 1) + COLUMN_GAP
    for index, nid in enumerate(order):
        entry = api[nid]
        info = object_info[entry["class_type"]]
        inputs, widgets = [], []
        for name, type_, opts in _inputs(info):
            value = entry["inputs"].get(name)
            if (nid, name) in link_ids:
                slot = len(inputs)
                inputs.append({"name": name, "type": "COMBO" if isinstance(type_, list) else type_,
                               "link": link_ids[(nid, name)]})
                links[link_ids[(nid, name)] - 1][4] = slot
                if _is_widget(type_, opts):
                    inputs[-1]["widget"] = {"name": name}
            elif _is_widget(type_, opts):
                widgets.append(value if value is not None else opts.get("default"))
                if _has_seed_control(name, type_, opts):
                    widgets.append("fixed")
            elif not _is_widget(type_, opts):
                inputs.append({"name": name, "type": type_, "link": None})
        outputs = []
        for slot, (type_, name) in enumerate(zip(info["output"], info.get("output_name", info["output"]), strict=True)):
            outputs.append({"name": name, "type": type_, "links": out_links.get((nid, slot), []),
                            "slot_index": slot})
        col = depth[nid]
        row = column_rows.get(col, 0)
        column_rows[col] = row + 1
        node = {"id": int(nid), "type": entry["class_type"], "pos": [column_x[col], 40 + 260 * row],
                "size": [widths[nid], 90 + 26 * (len(widgets) + len(inputs))], "flags": {}, "order": index, "mode": 0,
                "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": entry["class_type"]}, "widgets_values": widgets}
        if entry.get("_meta", {}).get("title"):
            node["title"] = entry["_meta"]["title"]
        nodes.append(node)
    return {"last_node_id": max(int(n) for n in api), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4}
