"""dmsetup's output formats, as text (the CLI prints what these functions return).

Each function mirrors one piece of ``dmsetup.c``/``libdm``:

* ``ioctl_error`` -- libdm's ``device-mapper: <ioctl> ioctl on <name> <uuid>[(maj:min)] failed:
  <strerror>``; note the blank between name and uuid that is there even without a uuid.
* ``info_long`` -- ``_display_info_long``: Name, State, Read Ahead, Tables present, Open count,
  Event number, "Major, minor", Number of targets, UUID (only when set), then an empty line.  A pool
  with an autoextend policy gets one more line, ``Autoextend:``, before the empty line (ours).
* ``info_columns`` -- ``info -c`` through libdm's report: fields padded to their width (which grows
  to fit the data), numbers right-aligned, strings left-aligned, headings left-aligned, one space
  between columns; ``--noheadings`` switches to ``:``-separated unaligned fields.
* ``ls_line`` (``name<TAB>(maj:min)``), ``deps_line`` (``N dependencies<TAB>: (maj, min)...``),
  ``target_line`` (``<start> <len> <type> <params>``), ``targets_line`` (``%-16s v%d.%d.%d``).
* ``render_tree`` -- ``ls --tree``: the pstree-style drawing of ``_display_tree_*`` (not compact,
  never truncated), with the ascii, utf and vt100 symbol sets.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_COLUMNS",
    "FIELDS",
    "TREE_SYMBOLS",
    "TreeNode",
    "TreeOptions",
    "deps_line",
    "info_columns",
    "info_long",
    "ioctl_error",
    "ls_line",
    "render_tree",
    "strerror",
    "target_line",
    "targets_line",
]

Info = Mapping[str, Any]


def strerror(errno_name: str) -> str:
    code = getattr(errno, errno_name, None)
    return os.strerror(code) if isinstance(code, int) else errno_name


def ioctl_error(stage: str, name: str, uuid: str, devno: Sequence[int] | None, errno_name: str) -> str:
    where = f"{name} {uuid}"
    if devno is not None and devno[0] > 0:
        where += f"({devno[0]}:{devno[1]})"
    return f"device-mapper: {stage} ioctl on {where} failed: {strerror(errno_name)}"


def info_long(info: Info) -> str:
    state = "SUSPENDED" if info["suspended"] else "ACTIVE"
    state += " (READ-ONLY)" if info["read_only"] else ""
    state += " (DEFERRED REMOVE)" if info["deferred_remove"] else ""
    live, inactive = info["live_table"], info["inactive_table"]
    tables = "None" if not (live or inactive) else " & ".join(
        t for t, present in (("LIVE", live), ("INACTIVE", inactive)) if present
    )
    lines = [
        f"Name:              {info['name']}",
        f"State:             {state}",
        f"Read Ahead:        {info['read_ahead']}",
        f"Tables present:    {tables}",
        f"Open count:        {info['open_count']}",
        f"Event number:      {info['event_nr']}",
        f"Major, minor:      {info['major']}, {info['minor']}",
        f"Number of targets: {info['target_count']}",
    ]
    if info["uuid"]:
        lines.append(f"UUID: {info['uuid']}")
    if info.get("autoextend"):
        policy = info["autoextend"]
        lines.append(
            f"Autoextend:        threshold {policy['threshold']}%, percent {policy['percent']}%; "
            f"{info.get('autoextend_status') or 'extended 0 times'}"
        )
    return "\n".join(lines) + "\n\n"


# -- info -c ------------------------------------------------------------------------------------


def _attr(info: Info) -> str:
    return "".join((
        "L" if info["live_table"] else "-",
        "I" if info["inactive_table"] else "-",
        "s" if info["suspended"] else "-",
        "r" if info["read_only"] else "w",
    ))


def _tables(info: Info) -> str:
    live, inactive = info["live_table"], info["inactive_table"]
    return "Both" if live and inactive else "Live" if live else "Inactive" if inactive else "None"


@dataclasses.dataclass(frozen=True, slots=True)
class Field:
    heading: str
    width: int
    number: bool
    value: Callable[[Info], str]


FIELDS: dict[str, Field] = {
    "name": Field("Name", 16, False, lambda i: str(i["name"])),
    "uuid": Field("UUID", 32, False, lambda i: str(i["uuid"])),
    "read_ahead": Field("RAhead", 6, True, lambda i: str(i["read_ahead"])),
    "attr": Field("Stat", 4, False, _attr),
    "tables_loaded": Field("Tables", 6, False, _tables),
    "suspended": Field("Suspended", 9, False, lambda i: "Suspended" if i["suspended"] else "Active"),
    "readonly": Field("Read-only", 9, False, lambda i: "Read-only" if i["read_only"] else "Writeable"),
    "devno": Field("DevNo", 5, False, lambda i: f"{i['major']}:{i['minor']}"),
    "major": Field("Maj", 3, True, lambda i: str(i["major"])),
    "minor": Field("Min", 3, True, lambda i: str(i["minor"])),
    "open": Field("Open", 4, True, lambda i: str(i["open_count"])),
    "segments": Field("Targ", 4, True, lambda i: str(i["target_count"])),
    "events": Field("Event", 6, True, lambda i: str(i["event_nr"])),
    "device_count": Field("#Devs", 5, True, lambda i: str(len(i.get("deps", [])))),
    "devnos_used": Field("DevNosUsed", 16, False,
                         lambda i: ",".join(d[1] if d[1] else d[0] for d in i.get("deps", []))),
}
DEFAULT_COLUMNS = "name,major,minor,attr,open,segments,events,uuid"


def column_names(options: str | None) -> list[str]:
    """The fields of ``-o``; ``+f`` appends to the defaults.  Raises ValueError on an unknown one."""
    spec = options or DEFAULT_COLUMNS
    if spec.startswith("+"):
        spec = DEFAULT_COLUMNS + "," + spec[1:]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        if name not in FIELDS:
            raise ValueError(f"Unrecognised field: {name}")
    return names


def info_columns(infos: Sequence[Info], names: Sequence[str], *, headings: bool = True,
                 separator: str | None = None) -> str:
    """``info -c``; empty when there is nothing to report (libdm prints no headings then)."""
    if not infos:
        return ""
    fields = [FIELDS[n] for n in names]
    rows = [[f.value(info) for f in fields] for info in infos]
    if not headings:
        sep = ":" if separator is None else separator
        return "".join(sep.join(row) + "\n" for row in rows)
    sep = " " if separator is None else separator
    widths = [max([f.width] + [len(r[k]) for r in rows]) for k, f in enumerate(fields)]
    out = [sep.join(f.heading[:w].ljust(w) for f, w in zip(fields, widths, strict=True))]
    for row in rows:
        cells = [v.rjust(w) if f.number else v.ljust(w) for v, f, w in zip(row, fields, widths, strict=True)]
        out.append(sep.join(cells))
    return "".join(line + "\n" for line in out)


# -- one-liners ---------------------------------------------------------------------------------


def ls_line(info: Info) -> str:
    return f"{info['name']}\t({info['major']}:{info['minor']})"


def deps_line(deps: Sequence[Sequence[Any]], name: str | None = None) -> str:
    """``N dependencies<TAB>: (maj, min)...``; a file is shown by its path."""
    items = "".join(f" ({d[1][0]}, {d[1][1]})" if d[1] else f" ({d[0]})" for d in deps)
    prefix = f"{name}: " if name is not None else ""
    return f"{prefix}{len(deps)} dependencies\t:{items}"


def target_line(line: Sequence[Any], name: str | None = None) -> str:
    prefix = f"{name}: " if name is not None else ""
    return f"{prefix}{line[0]} {line[1]} {line[2]} {line[3]}"


def targets_line(name: str, version: str) -> str:
    return f"{name:<16} v{version}"


# -- ls --tree ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Symbols:
    empty: str
    branch: str
    vert: str
    last: str


TREE_SYMBOLS: dict[str, Symbols] = {
    "ascii": Symbols("  ", "|-", "| ", "`-"),
    "utf": Symbols("  ", "\u251c\u2500", "\u2502 ", "\u2514\u2500"),
    "vt100": Symbols("  ", "\033(0\017tq\033(B", "\033(0\017x\033(B ", "\033(0\017mq\033(B"),
}
TREE_OPTION_NAMES = ("active", "ascii", "blkdevname", "compact", "device", "inverted", "nodevice", "notrunc",
                     "open", "rw", "status", "table", "utf", "uuid", "vt100")


@dataclasses.dataclass(slots=True)
class TreeOptions:
    symbols: str = "ascii"
    device: bool = True
    inverted: bool = False
    active: bool = False
    rw: bool = False
    open: bool = False
    uuid: bool = False

    def apply(self, options: str) -> None:
        """dmsetup's ``-o`` tree options; ValueError names an unknown one."""
        for opt in (o for o in options.split(",") if o):
            if opt not in TREE_OPTION_NAMES:
                raise ValueError(f"Tree option not recognised: {opt}.")
            if opt in TREE_SYMBOLS:
                self.symbols = opt
            elif opt in ("device", "nodevice"):
                self.device = opt == "device"
            elif opt in ("inverted", "active", "rw", "open", "uuid"):
                setattr(self, opt, True)
            # compact, notrunc, blkdevname, status and table change nothing here


@dataclasses.dataclass(slots=True)
class TreeNode:
    """A device in the tree: one of ours (``info`` set) or a lower device (block device or file)."""

    name: str
    devno: tuple[int, int] | None
    info: Info | None = None
    children: list[str] = dataclasses.field(default_factory=list)


def _node_text(node: TreeNode, opts: TreeOptions) -> str:
    text = node.name  # "" for a block device under a table: dmsetup then prints " (7:0)"
    if opts.device and node.devno is not None:
        text += f" ({node.devno[0]}:{node.devno[1]})"
    info = node.info
    if info is None:
        return text
    attrs = []
    if opts.active:
        attrs.append("SUSPENDED" if info["suspended"] else "ACTIVE")
    if opts.rw:
        attrs.append("RO" if info["read_only"] else "RW")
    if opts.open:
        attrs.append(str(info["open_count"]))
    if opts.uuid:
        attrs.append(str(info["uuid"]))
    return text + (f" [{', '.join(attrs)}]" if attrs else "")


def render_tree(nodes: Mapping[str, TreeNode], roots: Sequence[str], opts: TreeOptions) -> str:
    """Draw the forest below ``roots`` (a shared subtree is drawn under each of its parents)."""
    sym = TREE_SYMBOLS[opts.symbols]
    more: dict[int, bool] = {}
    out: list[str] = []

    def prefix(depth: int) -> str:
        parts = []
        for d in range(depth):
            mark = (sym.branch if more[depth] else sym.last) if d == depth - 1 else (
                sym.vert if more[d + 1] else sym.empty)
            parts.append(" " + mark)
        return "".join(parts)

    def walk(key: str, depth: int, last: bool, seen: tuple[str, ...]) -> None:
        more[depth] = not last
        node = nodes[key]
        out.append(prefix(depth) + _node_text(node, opts))
        kids = [k for k in node.children if k not in seen]
        for i, kid in enumerate(kids):
            walk(kid, depth + 1, i == len(kids) - 1, (*seen, key))

    for i, root in enumerate(roots):
        walk(root, 0, i == len(roots) - 1, ())
    return "".join(line + "\n" for line in out)


def build_tree(devices: Sequence[Info], inverted: bool = False) -> tuple[dict[str, TreeNode], list[str]]:
    """Nodes and roots from ``tree`` results (each device's info and live-table deps)."""
    nodes: dict[str, TreeNode] = {}
    used: set[str] = set()
    order: list[str] = []
    for dev in devices:
        info = dev["info"]
        key = f"{info['major']}:{info['minor']}"
        node = nodes.setdefault(key, TreeNode(info["name"], (info["major"], info["minor"])))
        node.name, node.info = info["name"], info  # it may have been met first as another device's dep
        if key not in order:
            order.append(key)
        for label, devno in dev["deps"]:
            dkey = label if devno is None else f"{devno[0]}:{devno[1]}"
            if dkey not in nodes:
                nodes[dkey] = TreeNode("" if devno is not None else label, None if devno is None else tuple(devno))
                order.append(dkey)
            nodes[key].children.append(dkey)
            used.add(dkey)
    if not inverted:
        return nodes, [k for k in order if nodes[k].info is not None and k not in used]
    return _invert(nodes, order)


def _invert(nodes: dict[str, TreeNode], order: list[str]) -> tuple[dict[str, TreeNode], list[str]]:
    inverted = {k: TreeNode(n.name, n.devno, n.info) for k, n in nodes.items()}
    for key in order:
        for child in nodes[key].children:
            inverted[child].children.append(key)
    return inverted, [k for k in order if not nodes[k].children]
