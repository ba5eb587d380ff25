"""``unionfs explain``'s output: the readable report and the JSON object."""

from __future__ import annotations

from typing import Any

from unionfs.inspect import markerinfo
from unionfs.inspect.explain import Explanation, disagreements, show
from unionfs.inspect.names import printable
from unionfs.options import human_size

FAILING_SHOWN = 10  # names whose lookup fails, listed in the text (the JSON has all)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return printable(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def as_json(exp: Explanation) -> dict[str, Any]:
    out: dict[str, Any] = _jsonable(
        {
            "path": exp.path,
            "written": exp.written,
            "mount": printable(exp.mount) if exp.mount is not None else None,
            "visible": exp.visible,
            "errno": exp.errno,
            "type": exp.kind,
            "layer": exp.layer,
            "verdict": exp.verdict,
            "layers": [
                {
                    "index": r.index,
                    "role": r.role,
                    "root": printable(r.root),
                    "place": r.place,
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
            "failing": exp.failing,
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
        parts.append(f"-> {printable(d['target'])}")
    if "rdev" in d:
        parts.append(f"device {d['rdev']}")
    return "  ".join(parts)


def render(exp: Explanation) -> str:
    head = show(exp.path)
    if exp.written is not None:
        head += f"  (as written: {printable(exp.written)})"
    lines = [head, f"  {exp.verdict}", "", "  layers, top first (* provides the path):"]
    roots = [printable(r.root) for r in exp.layers]
    width = max((len(r) for r in roots), default=0)
    for r, root in zip(exp.layers, roots, strict=True):
        star = "*" if exp.layer == r.index else " "
        what = r.entry or "-"
        if r.size is not None:
            what += f", {human_size(r.size)}"
        lines.append(f"  {star} {r.index} {r.role:5}  {root:{width}}  {what:22}  {r.note}")
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
        if exp.failing:
            names = ", ".join(
                f"{f['name']} ({f['errno']}"
                + (f", layer {f['layer']})" if f["layer"] is not None else ")")
                for f in exp.failing[:FAILING_SHOWN]
            )
            more = len(exp.failing) - FAILING_SHOWN
            names += f" and {more:,} more" if more > 0 else ""
            lines.append(f"  listed, but their lookup fails (explain each for why): {names}")
    if exp.copy_up is not None:
        lines += ["", f"  copy-up: {exp.copy_up['note']}"]
    if exp.shown is not None:
        lines += ["", f"  the mount shows: {_stat_line(exp.shown)}"]
        for k, v in exp.shown["xattrs"].items():
            lines.append(f"{'':19}{k}={markerinfo.printable(v)}")
    if exp.mount is not None:
        diff = disagreements(exp)
        mount = printable(exp.mount)
        if diff:
            lines.append(f"  the live mount at {mount} DISAGREES: " + "; ".join(diff))
        else:
            lines.append(f"  the live mount at {mount} answers the same")
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
