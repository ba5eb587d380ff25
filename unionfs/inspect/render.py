"""``unionfs explain``'s output: the readable report and the JSON object."""

from __future__ import annotations

import os
from typing import Any

from unionfs.inspect import markerinfo
from unionfs.inspect.explain import Explanation, disagreements, show
from unionfs.options import human_size


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return os.fsdecode(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def as_json(exp: Explanation) -> dict[str, Any]:
    out: dict[str, Any] = _jsonable(
        {
            "path": exp.path,
            "mount": exp.mount,
            "visible": exp.visible,
            "type": exp.kind,
            "layer": exp.layer,
            "verdict": exp.verdict,
            "layers": [
                {
                    "index": r.index,
                    "role": r.role,
                    "root": r.root,
                    "entry": r.entry,
                    "size": r.size,
                    "rule": r.rule,
                    "note": r.note,
                    "markers": [m.__dict__ for m in r.markers],
                }
                for r in exp.layers
            ],
            "merge": exp.merge,
            "entries": exp.entries,
            "copy_up": exp.copy_up,
            "shown": exp.shown,
            "mount_shows": exp.mount_shows,
            "mount_disagrees": disagreements(exp),
            "prediction": exp.prediction,
        }
    )
    return out


def _stat_line(d: dict[str, Any]) -> str:
    parts = [d["mode"], f"{d['uid']}:{d['gid']}"]
    if "size" in d:
        parts.append(f"size {d['size']:,}")
    parts += [f"nlink {d['nlink']}", f"mtime {d['mtime']}"]
    if "target" in d:
        parts.append(f"-> {os.fsdecode(d['target'])}")
    if "rdev" in d:
        parts.append(f"device {d['rdev']}")
    return "  ".join(parts)


def render(exp: Explanation) -> str:
    lines = [show(exp.path), f"  {exp.verdict}", "", "  layers, top first (* provides the path):"]
    width = max((len(r.root) for r in exp.layers), default=0)
    for r in exp.layers:
        star = "*" if exp.layer == r.index else " "
        what = r.entry or "-"
        if r.size is not None:
            what += f", {human_size(r.size)}"
        lines.append(f"  {star} {r.index} {r.role:5}  {r.root:{width}}  {what:22}  {r.note}")
        for m in r.markers:
            effect = f": {m.effect}" if m.effect else ""
            lines.append(f"{'':10}{m.kind} ({m.format}) {m.detail}{effect}")
    if exp.merge:
        given = ", ".join(f"{n} from layer {i}" for i, n in sorted(exp.entries.items()))
        merge = (
            f"layers {', '.join(str(i) for i in exp.merge)} merge"
            if len(exp.merge) > 1
            else f"layer {exp.merge[0]} only"
        )
        lines += ["", f"  directory: {merge}; its entries: {given or 'none'}"]
    if exp.copy_up is not None:
        lines += ["", f"  copy-up: {exp.copy_up['note']}"]
    if exp.shown is not None:
        lines += ["", f"  the mount shows: {_stat_line(exp.shown)}"]
        for k, v in exp.shown["xattrs"].items():
            lines.append(f"{'':19}{k}={markerinfo.printable(v)}")
    if exp.mount is not None:
        diff = disagreements(exp)
        if diff:
            lines.append(f"  the live mount at {exp.mount} DISAGREES: " + "; ".join(diff))
        else:
            lines.append(f"  the live mount at {exp.mount} answers the same")
    if exp.prediction is not None:
        p = exp.prediction
        op = p["op"] + (f" to {p['to']}" if p.get("to") else "")
        result = p["result"]
        if result == "ok":
            lines += ["", f"  {op}: succeeds"]
        else:
            rule = " (an overlay rule)" if p["overlay_rule"] else ""
            lines += ["", f"  {op}: fails with {result}{rule}: {p['why']}"]
        for effect in p["effects"]:
            lines.append(f"    - {effect}")
        if p["copy_up_bytes"]:
            lines.append(f"    copy-up total: {p['copy_up_bytes']:,} bytes")
    return "\n".join(lines)
