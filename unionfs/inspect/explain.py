"""``unionfs explain PATH``: why a path in the merged view looks the way it does.

The verdict is the mount's own: each component of the path is resolved with
``Union.resolve`` (the function every lookup of the mount runs), which tells
its *why* recorder the rule it applied in each layer. This module only adds
the reporting: what each layer holds at the path, in which marker format,
why a layer was never looked at, and what the mount shows.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from unionfs.errors import UsageError
from unionfs.inspect import markerinfo
from unionfs.inspect.names import brief, printable
from unionfs.inspect.stack import Stack
from unionfs.overlay import union as resolution
from unionfs.overlay.events import errno_name
from unionfs.overlay.layers import Layer
from unionfs.overlay.markers import is_whiteout
from unionfs.overlay.nodes import Entry, Node
from unionfs.overlay.syscalls import fd_path
from unionfs.overlay.union import Union, join

KINDS = {
    stat.S_IFREG: "regular file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def kind_of(st: os.stat_result) -> str:
    if is_whiteout(st):
        return "whiteout"
    return KINDS.get(stat.S_IFMT(st.st_mode), "unknown")


def layer_name(layer: Layer) -> str:
    return "the upper" if layer.writable else f"layer {layer.index}"


def show(path: bytes) -> str:
    """A path (or name) in text: one line, whatever bytes it holds; the root as ``/``."""
    return printable(path) if path else "/"


@dataclass
class Step:
    """What resolution did in one layer (told by ``Union.resolve``)."""

    layer: Layer
    st: os.stat_result | None
    rule: str
    place: bytes  # the path resolution asked this layer for (a redirect above changes it)


@dataclass
class Component:
    """One name of the path, resolved in its parent."""

    parent: Node
    name: bytes
    steps: list[Step]
    entry: Entry | None
    error: OSError | None = None  # the lookup failed (as the mount's does), with this
    culprit: Step | None = None  # the layer whose entry made it fail, and where

    @property
    def path(self) -> bytes:
        return join(self.parent.path, self.name)


def resolve_traced(union: Union, parent: Node, name: bytes, keep_error: bool = False) -> Component:
    """*name* resolved in *parent* by the mount's own ``Union.resolve``, with the rule
    it applied in each layer and the path it asked that layer for (both told by it). A
    lookup that fails raises, as the mount's does; with *keep_error* the component
    says why instead."""
    steps: list[Step] = []

    def why(layer: Layer, st: os.stat_result | None, rule: str, place: bytes) -> None:
        steps.append(Step(layer, st, rule, place))

    try:
        entry = union.resolve(parent, name, why=why)
    except OSError as e:
        if not keep_error:
            raise
        failed = steps.pop() if steps and steps[-1].rule == resolution.FAILS else None
        comp = Component(parent, name, steps, None, e)
        comp.culprit = _culprit(comp, failed)
        return comp
    return Component(parent, name, steps, entry)


def _culprit(comp: Component, failed: Step | None) -> Step | None:
    """The layer (and place) whose entry made the lookup fail: the one resolution was
    asking when it failed (*failed*: its markers cannot be read, an invalid redirect
    or metacopy xattr), else the last one whose redirect or metadata-only copy
    resolution refused to follow."""
    if failed is not None:
        return failed
    for step in reversed(comp.steps):
        if step.rule in (resolution.REDIRECT, resolution.METACOPY):
            return step
    return comp.steps[-1] if comp.steps else None


@dataclass
class Walk:
    """A path resolved component by component, as the mount's lookups do."""

    components: list[Component]
    node: Node | None  # the final node, when the whole path is visible
    blocked: str | None = None  # why the walk stopped before the last component
    errno: str | None = None  # what the kernel answers for the path, when not visible
    rest: list[bytes] = field(default_factory=list)  # the names after where it stopped

    @property
    def last(self) -> Component | None:
        return self.components[-1] if self.components else None

    @property
    def path(self) -> bytes:
        """The path it reached (``.`` and ``..`` walked), then the names it did not reach."""
        out = self.components[-1].path if self.components else b""
        for name in self.rest:
            out = join(out, name)
        return out


class AboveRoot(UsageError):
    """A ``..`` that would leave the merged view (a live mount's: the mountpoint's parent)."""


def walk(union: Union, relpath: bytes) -> Walk:
    """*relpath*, below the merged root as written, looked up as the kernel's path walk
    does: each name in the directory reached so far; ``.`` stays there and ``..`` goes
    back up, both only from a directory that was found; anything after a name (a
    ``/``, ``.``, ``..``) needs it to be a directory. Symlinks are not followed."""
    parts = relpath.split(b"/")
    root = union.table.root
    node = root
    comps: list[Component] = []
    dirs: list[Node] = []  # the directory each component reached, for ".."
    for i, name in enumerate(parts):
        if name in (b"", b"."):
            continue
        if name == b"..":
            if not comps:
                raise AboveRoot(f"{brief(relpath)}: climbs above the merged root")
            comps.pop()
            dirs.pop()
            node = dirs[-1] if dirs else root
            continue
        more = i < len(parts) - 1  # something follows that needs a directory
        comp = resolve_traced(union, node, name, keep_error=True)
        comps.append(comp)
        rest: list[bytes] = []
        for after in parts[i + 1 :]:
            if after in (b"", b".", b".."):
                break
            rest.append(after)
        if comp.error is not None:
            errno_ = errno_name(comp.error.errno)
            if more:
                why = f"the lookup of {show(comp.path)} {lookup_failure(comp)}"
                return Walk(comps, None, why, errno_, rest)
            return Walk(comps, None, None, errno_)
        entry = comp.entry
        if entry is None:
            if more:
                why = f"{show(comp.path)} is not visible: {hidden_reason(comp)}"
                return Walk(comps, None, why, "ENOENT", rest)
            return Walk(comps, None, None, "ENOENT")
        child = union.node_for(node, entry)
        if more and not stat.S_ISDIR(entry.st.st_mode):
            what = kind_of(entry.st)
            if stat.S_ISLNK(entry.st.st_mode):
                target = show(union.readlink(child))
                what = f"symlink to {target} (explain follows no symlink; the kernel would)"
                return Walk(
                    comps, None, f"{show(comp.path)} is a {what}, not a directory", None, rest
                )
            follows = show(b"/".join(parts[i + 1 :]))
            asks = "" if rest else f": what follows it ({follows}) asks for one"
            why = f"{show(comp.path)} is a {what}, not a directory{asks}"
            return Walk(comps, None, why, "ENOTDIR", rest)
        node = child
        if stat.S_ISDIR(entry.st.st_mode):
            dirs.append(child)
    return Walk(comps, node)


# -- the verdict, from the rules resolution applied --------------------------------


def _format(layer: Layer, place: bytes, rule: str) -> str:
    """The marker format behind an opaque or whiteout rule, in words (*place*: the
    entry's path in *layer*)."""
    if rule == resolution.WHITEOUT:
        return "kernel format: a character device 0/0"
    if rule == resolution.OCI_WHITEOUT:
        return "OCI format: a .wh. file beside it"
    if rule == resolution.OPAQUE:
        found = markerinfo.opaque_markers(layer, place)
        return ", ".join(m.detail for m in found) or "opaque"
    return ""


def hidden_reason(comp: Component) -> str:
    """Why resolution found nothing (``comp.entry`` is None)."""
    if comp.error is not None:
        return "its lookup " + lookup_failure(comp)
    last = comp.steps[-1] if comp.steps else None
    if last is None:
        return "no layer has it"
    where = layer_name(last.layer)
    place = last.place
    moved = f" at {show(place)}" if place != comp.path else ""
    if last.rule == resolution.WHITEOUT:
        return f"hidden by a whiteout in {where}{moved} ({_format(last.layer, place, last.rule)})"
    if last.rule == resolution.OCI_WHITEOUT:
        parent, _, name = place.rpartition(b"/")
        return f"hidden by an OCI whiteout {show(join(parent, b'.wh.' + name))} in {where}"
    if last.rule == resolution.RESERVED:
        return (
            "a name starting with .wh. is an OCI marker: no lower layer shows it, "
            "and the upper has none"
        )
    if comp.parent.path:
        return f"no layer that merges into {show(comp.parent.path)} has it"
    return "no layer has it"


def lookup_failure(comp: Component) -> str:
    """How the lookup of *comp* fails (``comp.error``), as the mount's and the kernel's
    does: "fails with" the errno, the layer and entry whose markers cause it, and the
    finding ``unionfs check`` reports for it."""
    e = comp.error
    assert e is not None
    code = errno_name(e.errno)
    culprit = comp.culprit
    if culprit is None:
        return f"fails with {code} ({e.strerror})"
    where = f"{layer_name(culprit.layer)}'s {show(culprit.place)}"
    prefix = culprit.layer.xattrs.prefix.decode()
    value = _raw_xattr(culprit, b"redirect")
    shown_value = f"={markerinfo.printable(value)}" if value is not None else ""
    if e.errno == errno.EINVAL and value is not None:
        return (
            f"fails with EINVAL, in the kernel as in unionfs: {where} has an invalid "
            f"redirect xattr ({prefix}redirect{shown_value}: empty, relative with a '/', "
            "or with an empty component); unionfs check reports it as invalid-redirect"
        )
    if e.errno == errno.EPERM and culprit.rule == resolution.METACOPY:
        return (
            f"fails with EPERM, in the kernel as in unionfs: {where} is a metadata-only "
            f"copy ({prefix}metacopy) and the stack is not mounted with metacopy=on, so its "
            "data below is not followed; unionfs check reports it as "
            "metacopy-without-metacopy"
        )
    if e.errno == errno.EPERM and value is not None:
        return (
            f"fails with EPERM, in the kernel as in unionfs: {where} has a redirect "
            f"({prefix}redirect{shown_value}) and the stack is mounted with "
            "redirect_dir=nofollow; unionfs check reports it as redirect-not-followed"
        )
    return f"fails with {code} ({e.strerror}) at {where}"


def _raw_xattr(step: Step, key: bytes) -> bytes | None:
    """The overlay xattr *key* of the entry at *step* as stored (None: it has none)."""
    parent, _, name = step.place.rpartition(b"/")
    try:
        path = fd_path(step.layer.dirfd(parent), name)
        return os.getxattr(path, step.layer.xattrs.prefix + key, follow_symlinks=False)
    except OSError:
        return None


def _stop(comp: Component) -> str:
    """What ended a directory's merge, if anything did."""
    last = comp.steps[-1]
    where = layer_name(last.layer)
    place = last.place
    if last.rule == resolution.OPAQUE:
        return f"{where}'s opaque marker ({_format(last.layer, place, last.rule)}) stops the merge"
    if last.rule in (resolution.WHITEOUT, resolution.OCI_WHITEOUT):
        fmt = _format(last.layer, place, last.rule)
        return f"a whiteout in {where} ({fmt}) ends the merge"
    if last.rule == resolution.ENDS_MERGE and last.st is not None:
        return f"{where} has a {kind_of(last.st)} there, which ends the merge"
    return ""


def _names(layers: list[Layer]) -> str:
    names = [layer_name(la) for la in layers]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


_MERGING = (resolution.DIRECTORY, resolution.OPAQUE, resolution.REDIRECT)


def verdict(comp: Component) -> str:
    entry = comp.entry
    if entry is None:
        if comp.error is not None:
            return "listed, but not visible: its lookup " + lookup_failure(comp)
        return "not visible: " + hidden_reason(comp)
    if not stat.S_ISDIR(entry.st.st_mode):
        return (
            f"a {kind_of(entry.st)} from {layer_name(entry.layer)}: the topmost layer that has "
            "the name; a non-directory hides whatever the layers below have"
        )
    merged = [s.layer for s in comp.steps if s.rule in _MERGING]
    stop = _stop(comp)
    if len(merged) == 1:
        text = f"a directory from {layer_name(merged[0])} only"
    else:
        text = f"a merged directory: the directories in {_names(merged)} merge"
    moved = [
        f"{layer_name(p.layer)}'s at {show(p.path)}" for p in entry.lowers if p.path != comp.path
    ]
    if moved:
        text += " (a redirect: " + ", ".join(moved) + ")"
    return text + ("; " + stop if stop else "")


# -- what each layer holds -----------------------------------------------------------


@dataclass
class LayerReport:
    index: int
    role: str
    root: str
    entry: str | None  # the kind of what is at the path, None: nothing
    size: int | None = None
    markers: list[markerinfo.Marker] = field(default_factory=list)
    rule: str = ""  # what resolution did here, or why it never looked here
    note: str = ""
    place: bytes = b""  # the path in this layer the row is about (a redirect moves it)


def stopped_by(step: Step | None) -> str:
    """What the layer at which resolution stopped did, as the reason for those below."""
    if step is None:
        return "not looked at"
    where = layer_name(step.layer)
    rule = step.rule
    if rule == resolution.OPAQUE:
        return f"below {where}'s opaque directory"
    if rule in (resolution.WHITEOUT, resolution.OCI_WHITEOUT):
        return f"hidden by {where}'s whiteout"
    if rule == resolution.RESERVED:
        return "a .wh. name is never looked up in a lower layer"
    if step.st is not None:
        return f"hidden by {where}'s {kind_of(step.st)}"
    return f"not looked at (resolution stopped at {where})"


def _places(union: Union, walked: Walk) -> dict[int, list[bytes]]:
    """For each layer, the path it has (or would have) at each component of the walk:
    where resolution asked it, or below its path for the component before."""
    out: dict[int, list[bytes]] = {}
    for layer in union.layers:
        cur = b""
        seq: list[bytes] = []
        for comp in walked.components:
            asked = [s.place for s in comp.steps if s.layer is layer]
            culprit = comp.culprit
            if not asked and culprit is not None and culprit.layer is layer and culprit.place:
                asked = [culprit.place]
            cur = asked[0] if asked else join(cur, comp.name)
            seq.append(cur)
        for name in walked.rest:
            cur = join(cur, name)
            seq.append(cur)
        out[layer.index] = seq
    return out


def _cut(walked: Walk, layer: Layer, places: list[bytes]) -> str:
    """Why resolution never looked at *layer* for the walk's path."""
    for i, comp in enumerate(walked.components):
        final = i == len(walked.components) - 1 and not walked.rest
        mine = [s for s in comp.steps if s.layer is layer]
        where = show(places[i])
        if comp.error is not None:
            code = errno_name(comp.error.errno)
            culprit = comp.culprit
            if culprit is not None and culprit.layer is layer:
                return f"cut off: its {where} makes the lookup fail with {code}"
            if not mine or final:
                at = f" at {layer_name(culprit.layer)}" if culprit is not None else ""
                return f"not looked at: the lookup of {show(comp.path)} fails{at} ({code})"
        if not mine:
            stop = stopped_by(comp.steps[-1] if comp.steps else None)
            if final:
                return "not looked at: " + stop
            return f"cut off at {show(comp.path)}: {stop}"
        step = mine[0]
        if final or step.rule in _MERGING:
            continue
        if step.rule == resolution.ABSENT:
            return f"has no directory {where}"
        if step.rule in (resolution.WHITEOUT, resolution.OCI_WHITEOUT):
            return f"cut off: {where} is deleted here"
        if step.st is not None:
            return f"cut off: {where} is a {kind_of(step.st)} here"
        return f"cut off at {where}"
    last = walked.last
    if walked.rest and last is not None:
        return f"not reached: the path is not visible past {show(last.path)}"
    return ""


def _root_note(union: Union, layer: Layer) -> str:
    stack = [p.layer for p in union.table.root.stack]
    if layer in stack:
        if layer is stack[-1] and layer is not union.layers[-1]:
            return "a directory: merges; it is opaque, so nothing below merges"
        return "a directory: merges"
    return "cut off: a higher layer's root directory is opaque"


_RULE_NOTES = {
    resolution.ABSENT: "nothing here; resolution looks further down",
    resolution.PROVIDES: "provides the name: the topmost layer that has it",
    resolution.DIRECTORY: "a directory: merges",
    resolution.OPAQUE: "an opaque directory: merges, and nothing below merges into it",
    resolution.WHITEOUT: "a whiteout: hides the name in every layer below",
    resolution.OCI_WHITEOUT: "an OCI whiteout beside it: hides the name in every layer below",
    resolution.ENDS_MERGE: "not a directory: ends the merge of the directories above",
    resolution.RESERVED: "a .wh. name: an OCI marker, never shown from a lower layer",
    resolution.REDIRECT: "a directory with a redirect: the layers below are asked for the "
    "path it names instead",
    resolution.METACOPY: "a metadata-only copy: provides the attributes; the data comes from below",
    resolution.DATA: "holds the data of the metadata-only copy above",
}


def layer_reports(union: Union, walked: Walk) -> list[LayerReport]:
    last = walked.last
    final = last is not None and not walked.rest
    steps = {s.layer.index: s for s in last.steps} if last is not None and final else {}
    culprit = last.culprit if last is not None and final and last.error is not None else None
    places = _places(union, walked)
    bottom = union.layers[-1]
    out: list[LayerReport] = []
    for layer in union.layers:
        seq = places[layer.index]
        place = seq[-1] if seq else b""
        parent, _, name = place.rpartition(b"/")
        st = layer.lstat(parent, name) if name else os.stat(layer.root_fd)
        rep = LayerReport(
            layer.index,
            "upper" if layer.writable else "lower",
            os.fspath(layer.path),
            kind_of(st) if st is not None else None,
            place=place,
        )
        if st is not None and stat.S_ISREG(st.st_mode):
            rep.size = st.st_size
        if name:
            rep.markers = markerinfo.markers_at(layer, parent, name, st, union, layer is bottom)
        step = steps.get(layer.index)
        moved = f" (at {show(place)})" if name and place != walked.path else ""
        if culprit is not None and culprit.layer is layer:
            assert last is not None
            rep.rule = "lookup-fails"
            code = errno_name(last.error.errno) if last.error is not None else "?"
            rep.note = f"its entry makes the lookup fail with {code} (see the verdict){moved}"
        elif step is not None:
            rep.rule = step.rule
            rep.note = _RULE_NOTES.get(step.rule, "") + moved
        elif name:
            rep.rule = "not-looked-at"
            rep.note = _cut(walked, layer, seq)
        else:
            rep.rule = "root"
            rep.note = _root_note(union, layer)
        out.append(rep)
    return out


# -- the whole explanation -------------------------------------------------------------


@dataclass
class Explanation:
    path: bytes
    visible: bool
    kind: str | None
    layer: int | None  # the layer that provides the path
    verdict: str
    layers: list[LayerReport]
    merge: list[int] = field(default_factory=list)  # a directory's merging layers
    entries: dict[int, int] = field(default_factory=dict)  # names each layer provides
    failing: list[dict[str, Any]] = field(default_factory=list)  # names that cannot be looked up
    copy_up: dict[str, Any] | None = None
    shown: dict[str, Any] | None = None  # what the mount shows (computed)
    mount: str | None = None  # the live mount's path
    mount_shows: dict[str, Any] | None = None  # what the live mount answered
    prediction: dict[str, Any] | None = None  # --op
    node: Node | None = None
    written: bytes | None = None  # the path as written, when it is not ``path``
    errno: str | None = None  # what a lookup of the path as written answers (not visible)


def explain(union: Union, relpath: bytes, stack: Stack | None = None) -> Explanation:
    """*relpath* (below the merged root, as written: ``..`` and a trailing ``/`` are
    walked as the kernel walks them) explained."""
    walked = walk(union, relpath)
    node = walked.node
    last = walked.last
    path = walked.path
    if node is not None and not walked.components:
        root = union.table.root
        merged = [p.layer for p in root.stack]
        text = (
            f"the root: the directories in {_names(merged)} merge"
            if len(merged) > 1
            else f"the root of {layer_name(merged[0])}"
        )
        exp = Explanation(path, True, "directory", root.layer.index, text, [], node=root)
    elif walked.blocked is not None:
        exp = Explanation(path, False, None, None, "not visible: " + walked.blocked, [])
    else:
        assert last is not None
        entry = last.entry
        exp = Explanation(
            path,
            entry is not None,
            kind_of(entry.st) if entry is not None else None,
            entry.layer.index if entry is not None else None,
            verdict(last),
            [],
            node=node,
        )
    exp.layers = layer_reports(union, walked)
    exp.errno = walked.errno
    if relpath.strip(b"/") != path:
        exp.written = relpath
    if not exp.visible:
        for r in exp.layers:
            cut = r.note.startswith("cut off")  # (those below the deciding layer are said)
            if r.entry is not None and r.entry != "whiteout" and cut:
                name = "the upper" if r.role == "upper" else f"layer {r.index}"
                exp.verdict += f"; {name} has a {r.entry} there ({r.note})"
        if walked.blocked is not None and walked.errno is not None:
            exp.verdict += f"; a lookup of {show(relpath.strip(b'/'))} answers {walked.errno}"
    if node is not None:
        if node.is_dir:
            exp.merge = [p.layer.index for p in node.stack]
            exp.entries, exp.failing = contributions(union, node)
        exp.shown = shown(union, node)
        if node.layer.writable and stack is not None and path:
            exp.copy_up = provenance(union, stack, node, path)
    return exp


def contributions(union: Union, node: Node) -> tuple[dict[int, int], list[dict[str, Any]]]:
    """How many of a directory's names each layer provides (resolved by the core), and
    the names it lists whose lookup fails (as the kernel lists them, then fails them)."""
    counts: dict[int, int] = {}
    failing: list[dict[str, Any]] = []
    for name in union.names(node):
        try:
            entry = union.resolve(node, name)
        except OSError as e:
            comp = resolve_traced(union, node, name, keep_error=True)
            culprit = comp.culprit
            failing.append(
                {
                    "name": printable(name),
                    "errno": errno_name(e.errno),
                    "layer": culprit.layer.index if culprit is not None else None,
                    "why": "its lookup " + lookup_failure(comp)
                    if comp.error is not None
                    else e.strerror,
                }
            )
            continue
        if entry is not None:
            counts[entry.layer.index] = counts.get(entry.layer.index, 0) + 1
    return counts, failing


def shown(union: Union, node: Node) -> dict[str, Any]:
    """The stat and xattrs the mount shows for *node*, computed as the mount does."""
    st = union.stat(node)
    ids = union.config.ids
    out: dict[str, Any] = {
        "type": kind_of(st),
        "mode": stat.filemode(st.st_mode),
        "uid": ids.uids.shown(st.st_uid),
        "gid": ids.gids.shown(st.st_gid),
        "nlink": union.shown_nlink(node, st),
        "mtime": _iso(st.st_mtime_ns),
        "mtime_ns": st.st_mtime_ns,
    }
    if not node.is_dir:
        out["size"] = st.st_size
    if stat.S_ISLNK(st.st_mode):
        out["target"] = union.readlink(node)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        out["rdev"] = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    xattrs: dict[str, bytes] = {}
    try:
        for name in union.listxattr(node):
            try:
                xattrs[printable(name)] = union.getxattr(node, name)
            except OSError as e:
                xattrs[printable(name)] = f"<{errno.errorcode.get(e.errno or 0, '?')}>".encode()
    except OSError:
        pass
    out["xattrs"] = xattrs
    return out


def mount_shows(mountpoint: str, relpath: bytes) -> dict[str, Any]:
    """What the live mount answers for the path (an lstat and its xattrs)."""
    path = os.path.join(os.fsencode(mountpoint), relpath) if relpath else os.fsencode(mountpoint)
    try:
        st = os.lstat(path)
    except OSError as e:
        return {"error": errno.errorcode.get(e.errno or 0, "?")}
    out: dict[str, Any] = {
        "type": kind_of(st),
        "mode": stat.filemode(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "nlink": st.st_nlink,
        "mtime": _iso(st.st_mtime_ns),
        "mtime_ns": st.st_mtime_ns,
    }
    if not stat.S_ISDIR(st.st_mode):
        out["size"] = st.st_size
    if stat.S_ISLNK(st.st_mode):
        out["target"] = os.readlink(path)
    return out


SAME_FIELDS = ("type", "mode", "uid", "gid", "size", "mtime_ns", "target")


def disagreements(exp: Explanation) -> list[str]:
    """Where the live mount's answer differs from the computed one."""
    live = exp.mount_shows
    if live is None:
        return []
    if exp.shown is None:
        if "error" not in live:
            return ["the mount shows the path, explain found it not visible"]
        if exp.errno is not None and live["error"] != exp.errno:
            return [f"the mount answers {live['error']}, explain expected {exp.errno}"]
        return []
    if "error" in live:
        return [f"the mount answers {live['error']}"]
    out = []
    for key in SAME_FIELDS:
        if exp.shown.get(key) != live.get(key):
            out.append(f"{key}: mount {live.get(key)!r}, computed {exp.shown.get(key)!r}")
    return out


def _iso(ns: int) -> str:
    sec = ns // 10**9
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec)) + f".{ns % 10**9:09d}Z"


# -- where an upper copy came from ----------------------------------------------------


def provenance(union: Union, stack: Stack, node: Node, relpath: bytes) -> dict[str, Any] | None:
    """For a path the upper provides: the lower entry it replaces, and whether it is a
    copy-up of it, when that is known (the kernel's origin xattr, the mount's trace)."""
    if node.lowers:
        return _merged_provenance(union, stack, node, relpath)
    lowers_only = stack.open_lowers() if stack.config.lowers else None
    if lowers_only is None:
        return None
    try:
        try:
            below = walk(lowers_only, relpath)
        except (OSError, UsageError):
            below = Walk([], None)
        comp = below.last
        if below.node is None or comp is None or comp.entry is None:
            return {"note": "new in the upper: no lower layer shows this path"}
        entry = comp.entry
        index = entry.layer.index + 1  # the same layer in the full stack
        lower_st = entry.st
        upper_st = union.stat(node)
        out: dict[str, Any] = {"from": index}
        if node.is_dir:
            out["note"] = (
                f"replaces {layer_name(union.layers[index])}'s {kind_of(lower_st)}: "
                "nothing below merges into the upper directory (it is opaque)"
            )
            return out
        origin = markerinfo.origin_matches(union, node, entry.layer, comp.parent.path, comp.name)
        traced = _traced_copy_up(stack, relpath)
        if origin is True:
            out["known"] = "origin"
            out["note"] = (
                f"a copy-up of {layer_name(union.layers[index])}'s {kind_of(lower_st)}: "
                "its origin xattr is that file's handle"
            ) + (f"; {traced}" if traced is not None else "")
            return out
        if traced is not None:
            out["known"] = "trace"
            out["note"] = traced
            return out
        if origin is False:
            out["note"] = (
                "its origin xattr names another file: copied up from elsewhere, then moved"
            )
        elif stat.S_IFMT(upper_st.st_mode) != stat.S_IFMT(lower_st.st_mode):
            out["note"] = f"replaces {layer_name(union.layers[index])}'s {kind_of(lower_st)}"
        elif upper_st.st_mtime_ns == lower_st.st_mtime_ns and upper_st.st_size == lower_st.st_size:
            out["known"] = "guess"
            out["note"] = (
                f"probably a copy-up of {layer_name(union.layers[index])}'s file: same size "
                "and mtime (a copy-up keeps both; no record says so)"
            )
        else:
            out["note"] = (
                f"replaces {layer_name(union.layers[index])}'s file: a copy-up changed since, "
                "or a new file (no record says which)"
            )
        return out
    finally:
        lowers_only.close()


def _merged_provenance(union: Union, stack: Stack, node: Node, relpath: bytes) -> dict[str, Any]:
    """For an upper directory with lower parts, or a metadata-only copy: where its lower
    parts are, as resolution found them (a redirect sends them elsewhere)."""
    top = node.lowers[0]
    lower = layer_name(top.layer)
    at = "" if top.path == relpath else f" at {show(top.path)}"
    redirect = f"{union.ns.prefix.decode()}redirect"
    moved = (
        f"; moved here by a rename, which left a redirect xattr ({redirect}) so that "
        "they still show under this name"
        if at
        else ""
    )
    out: dict[str, Any] = {"from": top.layer.index}
    if node.is_dir:
        out["note"] = (
            f"the upper part of a directory that {lower}{at} has too: made when something "
            f"inside it changed{moved}"
        )
        return out
    parent, _, name = top.path.rpartition(b"/")
    origin = markerinfo.origin_matches(union, node, top.layer, parent, name)
    data = node.lowers[-1]
    out["note"] = (
        f"a metadata-only copy-up of {lower}'s file{at}: its data is read from "
        f"{layer_name(data.layer)}'s {show(data.path)}{moved}"
    )
    if origin is True:
        out["known"] = "origin"
        out["note"] += "; its origin xattr is that file's handle"
    traced = _traced_copy_up(stack, relpath)
    if traced is not None:
        out.setdefault("known", "trace")
        out["note"] += f"; {traced}"
    return out


def _traced_copy_up(stack: Stack, relpath: bytes) -> str | None:
    """The last copy-up of *relpath* in the live mount's trace file, in words."""
    trace = stack.live.trace if stack.live is not None else None
    if trace is None:
        return None
    from unionfs.inspect.trace import last_copy_up

    rec = last_copy_up(trace, relpath)
    if rec is None:
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("time", 0)))
    who = f" by pid {rec['pid']}" if rec.get("pid") is not None else ""
    why = f" ({rec['request']})" if rec.get("request") else ""
    return (
        f"copied up from layer {rec.get('layer')} at {when}{who}{why}, "
        f"{rec.get('bytes', 0):,} bytes by {rec.get('method')} (the mount's trace)"
    )
