"""``udmsetup``: dmsetup for the userspace device-mapper daemon.

Same commands, options, output and exit codes as dmsetup(8) for what the daemon supports (see
``usage``); options may appear anywhere, as with dmsetup's getopt.  Commands go to the daemon over
its control socket (``$DEVMAPPER_RUNTIME_DIR``, else ``/run/devmapper`` as root); when nothing
answers, udmsetup starts ``devmapper daemon`` in the background (``$DEVMAPPER_NO_AUTOSTART=1``
prevents it).  Failures print dmsetup's messages -- preceded by the daemon's reason, as the kernel
log would show it -- then ``Command failed.``, and exit 1.

Extensions: ``--autoextend THRESHOLD,PERCENT`` on create/load sets a thin-pool's autoextend policy
(LVM's thin_pool_autoextend_threshold/percent; also ``message POOL 0 "@autoextend T P"``, ``@autoextend
off``, and ``@autoextend`` alone to print it); ``info`` shows it on an ``Autoextend:`` line.  ``wait``
takes ``--timeout SECONDS``.  Table devices may be regular files (shown by path).
"""

from __future__ import annotations

import dataclasses
import getopt
import locale
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

from devmapper import __version__
from devmapper.cli.daemon import runtime_dir_from_env, spawn, state_dir_from_env
from devmapper.control import report
from devmapper.control.client import Client, DaemonUnavailableError, connect
from devmapper.control.errors import DmError
from devmapper.control.table import TableLine, TableSyntaxError, parse_table

PROG: Final = "udmsetup"
LIBRARY_VERSION: Final = f"1.02.185 (devmapper {__version__})"
REMOVE_RETRIES: Final = 25
RETRY_DELAY: Final = 0.2

SHORT_OPTS = "cCfhj:m:no:rS:u:U:G:M:vy"
LONG_OPTS = [
    "addnodeoncreate", "addnodeonresume", "autoextend=", "checks", "columns", "concise", "deferred", "force",
    "headings=", "help", "inactive", "major=", "minor=", "noflush", "noheadings", "nolockfs", "noopencount",
    "notable", "noudevrules", "noudevsync", "options=", "readahead=", "readonly", "retry", "separator=",
    "setuuid", "showkeys", "table=", "target=", "timeout=", "tree", "udevcookie=", "uuid=", "verbose",
    "verifyudev", "version", "yes", "uid=", "gid=", "mode=",
]

# (name, usage, min args, max args or -1, repeatable)
COMMANDS: Final[tuple[tuple[str, str, int, int, bool], ...]] = (
    ("help", "[-c|-C|--columns]", 0, 0, False),
    ("create", "<dev_name>\n\t    [-u|--uuid <uuid>] [-j|--major <major> -m|--minor <minor>]\n"
     "\t    [--readahead <sectors>] [--autoextend <threshold>,<percent>]\n"
     "\t    [-n|--notable|--table {<table>|<table_file>}]", 0, 2, False),
    ("remove", "[--deferred] [-f|--force] [--retry] <device>...", 0, -1, True),
    ("remove_all", "[-f|--force] [--deferred]", 0, 0, False),
    ("suspend", "[--noflush] <device>...", 0, -1, True),
    ("resume", "<device>...", 0, -1, True),
    ("load", "<device> [<table>|<table_file>] [--autoextend <threshold>,<percent>]", 0, 2, False),
    ("clear", "<device>", 0, -1, True),
    ("reload", "<device> [<table>|<table_file>]", 0, 2, False),
    ("wipe_table", "<device>...", 0, -1, True),
    ("rename", "<device> [--setuuid] <new_name_or_uuid>", 1, 2, False),
    ("message", "<device> <sector> <message>", 2, -1, False),
    ("ls", "[--target <target_type>] [-o <options>] [--tree]", 0, 0, False),
    ("info", "[<device>...]", 0, -1, True),
    ("deps", "[-o <options>] [<device>...]", 0, -1, True),
    ("status", "[<device>...] [--noflush] [--target <target_type>]", 0, -1, True),
    ("table", "[<device>...] [--target <target_type>] [--showkeys]", 0, -1, True),
    ("wait", "<device> [<event_nr>] [--noflush] [--timeout <seconds>]", 0, 2, False),
    ("mknodes", "[<device>...]", 0, -1, True),
    ("targets", "", 0, 0, False),
    ("version", "", 0, 0, False),
)
_COMMANDS = {c[0]: c for c in COMMANDS}


def _atoi(text: str | None) -> int:
    """C's atoi, as dmsetup reads numbers: leading blanks, a sign, digits; anything else is 0."""
    digits = (text or "").strip()
    sign = -1 if digits.startswith("-") else 1
    digits = digits.lstrip("+-")
    end = len(digits) - len(digits.lstrip("0123456789"))
    return sign * int(digits[:end]) if end else 0


class Failed(Exception):
    """The command failed; its messages are already written."""


@dataclasses.dataclass
class Options:
    values: dict[str, str] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def has(self, name: str) -> bool:
        return self.counts.get(name, 0) > 0

    def get(self, name: str) -> str | None:
        return self.values.get(name)


_ALIASES = {"-c": "columns", "-C": "columns", "-f": "force", "-h": "help", "-j": "major", "-m": "minor",
            "-n": "notable", "-o": "options", "-r": "readonly", "-u": "uuid", "-v": "verbose", "-y": "yes",
            "-S": "select", "-U": "uid", "-G": "gid", "-M": "mode"}


def parse_options(argv: Sequence[str]) -> tuple[Options, list[str]]:
    """dmsetup's switches, anywhere on the line; raises getopt.GetoptError."""
    pairs, rest = getopt.gnu_getopt(list(argv), SHORT_OPTS, LONG_OPTS)
    opts = Options()
    for flag, value in pairs:
        name = _ALIASES.get(flag, flag.lstrip("-"))
        opts.counts[name] = opts.counts.get(name, 0) + 1
        opts.values[name] = value
    return opts, rest


def usage() -> str:
    lines = [
        "Usage:", "", f"{PROG}", "\t[--version] [-h|--help [-c|-C|--columns]]",
        "\t[-v|--verbose [-v|--verbose ...]] [-f|--force]",
        "\t[-r|--readonly] [--noflush] [--inactive] [--retry] [--deferred]",
        "\t[-c|-C|--columns] [-o <fields>] [--noheadings] [--separator <separator>]", "",
    ]
    lines += [f"\t{name} {args}" for name, args, *_ in COMMANDS]
    lines += [
        "", "<device> may be device name or (if only one) -u <uuid> or -j <major> -m <minor>",
        "<fields> are comma-separated.  Use 'help -c' for list.",
        "Table_file contents may be supplied on stdin.",
        "Options are: devno, devname, blkdevname.",
        "Tree specific options are: ascii, utf, vt100; compact, inverted, notrunc;",
        "                           blkdevname, [no]device, active, open, rw and uuid.",
        "Devices in tables may be MAJOR:MINOR, /dev/mapper/NAME, block device nodes or regular files.",
        "Thin-pool autoextend: --autoextend THRESHOLD,PERCENT on create/load, or",
        '  message POOL 0 "@autoextend THRESHOLD PERCENT" ("@autoextend off"; "@autoextend" prints it);',
        "  info shows it on an Autoextend: line.",
        "Environment: DEVMAPPER_RUNTIME_DIR (the daemon's socket), DEVMAPPER_STATE_DIR (saved devices),",
        "  DEVMAPPER_NO_AUTOSTART=1 (do not start a daemon when none runs).", "",
    ]
    return "\n".join(lines)


class Session:
    """One udmsetup run: options, streams, and a daemon connection made on first use."""

    def __init__(self, opts: Options, env: Mapping[str, str], stdin: TextIO, out: TextIO, err: TextIO) -> None:
        self.opts, self.env, self.stdin, self.out, self.err = opts, env, stdin, out, err
        self._client: Client | None = None

    # -- plumbing --------------------------------------------------------------------------------

    @property
    def client(self) -> Client:
        if self._client is None:
            runtime, state = runtime_dir_from_env(self.env), state_dir_from_env(self.env)
            start = None if self.env.get("DEVMAPPER_NO_AUTOSTART") else (lambda: spawn(runtime, state))
            try:
                self._client = connect(runtime, start)
            except DaemonUnavailableError as e:
                self.error(f"{e}")
                self.error("Failure to communicate with the userspace device-mapper daemon.")
                raise Failed() from None
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def error(self, text: str) -> None:
        self.err.write(text + "\n")

    def print(self, text: str) -> None:
        self.out.write(text + "\n")

    def call(self, op: str, stage: str, label: str, /, **args: Any) -> Any:
        """One daemon request; a refusal prints dmsetup's ioctl error and raises Failed."""
        try:
            return self.client.call(op, **args)
        except DmError as e:
            self.ioctl_failed(e, stage, label)
            raise Failed() from None

    def ioctl_failed(self, e: DmError, stage: str, name: str) -> None:
        if e.reason and e.logged:
            self.error(f"device-mapper: {e.reason}")
        uuid = (self.opts.get("uuid") or "") if stage == "create" else ""
        self.error(report.ioctl_error(e.stage or stage, name, uuid, e.devno, e.errno_name))

    def by_switches(self) -> bool:
        return self.opts.has("uuid") or self.opts.has("major")

    def device_and_rest(self, args: list[str]) -> tuple[Any, str, list[str]]:
        """For load, message and wait: -u/-j -m if given (then every argument is left), else the first
        argument names the device."""
        if self.by_switches():
            device, label = self.device([])
            return device, label, args
        device, label = self.device(args)
        return device, label, args[1:]

    def device(self, args: list[str]) -> tuple[Any, str]:
        """The device argument (name, path, -u uuid or -j/-m) as a request value and a label."""
        if args:
            name = args[0]
            if name.count("/") == 1 and not name.startswith("/"):
                name = "/dev/" + name  # dmsetup tries a one-slash relative name under /dev
            if "/" in name and not (name.startswith("/dev/mapper/") or name.startswith("/dev/dm-")):
                self.error(f"Device {args[0]} not found")
                raise Failed()
            return name, name.removeprefix("/dev/mapper/")
        if self.opts.has("uuid"):
            uuid = self.opts.get("uuid") or ""
            return {"uuid": uuid}, ""
        if self.opts.has("major") and self.opts.has("minor"):
            devno = [_atoi(self.opts.get("major")), _atoi(self.opts.get("minor"))]
            return {"devno": devno}, ""
        self.error("No device specified.")
        raise Failed()

    def all_names(self, silent: bool = False) -> list[str]:
        names = [info["name"] for info in self.call("list", "names", "")]
        if not names and not silent:
            self.print("No devices found")
        return names

    # -- tables ----------------------------------------------------------------------------------

    def read_table(self, file: str | None) -> list[TableLine]:
        table = self.opts.get("table")
        try:
            if table is not None:
                return parse_table(table, "")
            if file is not None:
                try:
                    text = Path(file).read_text()
                except OSError:
                    self.error(f"Couldn't open '{file}' for reading.")
                    raise Failed() from None
                return parse_table(text, file)
            return parse_table(self.stdin.read(), "on stdin")
        except TableSyntaxError as e:
            self.error(str(e))
            raise Failed() from None

    def autoextend(self) -> str | None:
        return self.opts.get("autoextend")

    def show_info(self, info: dict[str, Any]) -> None:
        if self.opts.has("verbose"):
            self.out.write(report.info_long(info))


# -- commands ----------------------------------------------------------------------------------------


def cmd_create(s: Session, args: list[str]) -> None:
    if not args:
        s.error("Please provide a name for the new device.")
        raise Failed()
    name = args[0]
    if "/" in name:
        s.error(f'Name "{name}" invalid. It contains "/".')
        raise Failed()
    table = None if s.opts.has("notable") else s.read_table(args[1] if len(args) == 2 else None)
    request: dict[str, Any] = {
        "name": name, "uuid": s.opts.get("uuid") or "", "table": [t.to_json() for t in table] if table else None,
        "read_only": s.opts.has("readonly"), "cwd": os.getcwd(), "autoextend": s.autoextend(),
    }
    if s.opts.has("minor"):
        request["minor"] = _atoi(s.opts.get("minor"))
    if s.opts.get("readahead") not in (None, "auto", "none"):
        request["read_ahead"] = _atoi(s.opts.get("readahead"))
    s.show_info(s.call("create", "create", name, **request))


def cmd_load(s: Session, args: list[str]) -> None:
    if s.opts.has("notable"):
        s.error("--notable only available when creating new device.")
        raise Failed()
    device, label, rest = s.device_and_rest(args)
    if len(rest) > 1:
        s.error("Too many command line arguments.")
        raise Failed()
    table = s.read_table(rest[0] if rest else None)
    info = s.call("load", "reload", label, device=device, table=[t.to_json() for t in table],
                  read_only=s.opts.has("readonly"), cwd=os.getcwd(), autoextend=s.autoextend())
    s.show_info(info)


def _simple(op: str, stage: str, **extra: Any) -> Callable[[Session, list[str]], None]:
    def run(s: Session, args: list[str]) -> None:
        device, label = s.device(args)
        s.show_info(s.call(op, stage, label, device=device, **extra))

    return run


def cmd_suspend(s: Session, args: list[str]) -> None:
    device, label = s.device(args)
    s.show_info(s.call("suspend", "suspend", label, device=device, noflush=s.opts.has("noflush")))


def cmd_remove(s: Session, args: list[str]) -> None:
    device, label = s.device(args)
    if s.opts.has("force"):
        try:
            s.client.call("wipe_table", device=device)
        except DmError:
            pass  # dmsetup ignores a failed wipe (e.g. an immutable pool table)
    tries = REMOVE_RETRIES if s.opts.has("retry") else 1
    for attempt in range(tries):
        try:
            s.client.call("remove", device=device, deferred=s.opts.has("deferred"))
            return
        except DmError as e:
            if e.errno_name != "EBUSY" or attempt == tries - 1:
                s.ioctl_failed(e, "remove", label)
                raise Failed() from None
            time.sleep(RETRY_DELAY)


def cmd_remove_all(s: Session, args: list[str]) -> None:
    left = s.call("remove_all", "remove_all", "", deferred=s.opts.has("deferred"), force=s.opts.has("force"))
    if left and s.opts.has("force"):
        s.error(f"Unable to remove {len(left)} device(s).")


def cmd_rename(s: Session, args: list[str]) -> None:
    device, label = s.device(args[:-1] if len(args) == 2 else [])
    target = args[-1]
    if s.opts.has("setuuid"):
        s.call("rename", "rename", label, device=device, new_uuid=target)
        return
    if "/" in target:
        s.error(f'Name "{target}" invalid. It contains "/".')
        raise Failed()
    s.call("rename", "rename", label, device=device, new_name=target)


def cmd_message(s: Session, args: list[str]) -> None:
    device, label, rest = s.device_and_rest(args)
    if not rest or not (rest[0].isascii() and rest[0].isdigit()):
        s.error("Invalid sector.")
        raise Failed()
    if len(rest) < 2:
        s.error("No message supplied.")
    result = s.call("message", "message", label, device=device, sector=int(rest[0]), text=" ".join(rest[1:]))
    response = result.get("response") if isinstance(result, dict) else None
    if response is not None:
        s.out.write(response if not response or response.endswith("\n") else response + "\n")


def _each_device(s: Session, args: list[str], fn: Callable[[Any, str, bool], None]) -> None:
    """Run fn for each named device, or for all when none is named (dmsetup's _process_all)."""
    if args or s.opts.has("uuid") or s.opts.has("major"):
        many = len(args) > 1
        for group in [[a] for a in args] or [[]]:
            device, label = s.device(group)
            fn(device, label, many)
        return
    for name in s.all_names():
        fn(name, name, True)


def cmd_info(s: Session, args: list[str]) -> None:
    if s.opts.has("columns"):
        _info_columns(s, args)
        return

    def one(device: Any, label: str, many: bool) -> None:
        try:
            info = s.client.call("info", device=device)
        except DmError as e:
            if e.errno_name != "ENXIO":
                s.ioctl_failed(e, "info", label)
            else:
                s.error("Device does not exist.")
            raise Failed() from None
        s.out.write(report.info_long(info))

    _each_device(s, args, one)


def _info_columns(s: Session, args: list[str]) -> None:
    try:
        names = report.column_names(s.opts.get("options"))
    except ValueError as e:
        s.error(str(e))
        raise Failed() from None
    infos: list[dict[str, Any]] = []
    need_deps = any(n in ("device_count", "devnos_used") for n in names)

    def one(device: Any, label: str, many: bool) -> None:
        try:
            info = s.client.call("info", device=device)
            if need_deps:
                info["deps"] = s.client.call("deps", device=device)
        except DmError:
            s.error("Device does not exist.")
            raise Failed() from None
        infos.append(info)

    try:
        _each_device(s, args, one)
    finally:
        s.out.write(report.info_columns(infos, names, headings=not s.opts.has("noheadings"),
                                        separator=s.opts.get("separator")))


def _lines_command(op: str) -> Callable[[Session, list[str]], None]:
    """``table`` and ``status``: ``<start> <len> <type> <params>`` per target."""

    def run(s: Session, args: list[str]) -> None:
        target = s.opts.get("target")

        def one(device: Any, label: str, many: bool) -> None:
            lines = _fetch_lines(s, op, device, label)
            if s.opts.has("verbose"):
                s.out.write(report.info_long(s.call("info", "info", label, device=device)))
            prefix = label if many and not s.opts.has("verbose") else None
            if not lines and target is None:
                s.print(f"{prefix}: " if prefix else "")
            for line in lines:
                if target is None or line[2] == target:
                    s.print(report.target_line(line, prefix))

        _each_device(s, args, one)

    return run


def _fetch_lines(s: Session, op: str, device: Any, label: str) -> list[list[Any]]:
    try:
        result: list[list[Any]] = s.client.call(op, device=device, inactive=s.opts.has("inactive"),
                                                **({"noflush": s.opts.has("noflush")} if op == "status" else {}))
        return result
    except DmError as e:
        if op == "status" and e.errno_name == "ENXIO":
            s.error("Device does not exist.")
        else:
            s.ioctl_failed(e, op, label)
        raise Failed() from None


def cmd_deps(s: Session, args: list[str]) -> None:
    style = s.opts.get("options") or "devno"
    if style not in ("devno", "devname", "blkdevname"):
        s.error(f"Option not recognised: {style}.")
        raise Failed()
    names = {}
    if style != "devno":
        names = {(i["major"], i["minor"]): i["name"] for i in s.call("list", "names", "")}

    def one(device: Any, label: str, many: bool) -> None:
        deps = s.call("deps", "deps", label, device=device, inactive=s.opts.has("inactive"))
        shown = [[_dep_name(d, style, names), None if style != "devno" else d[1]] for d in deps]
        s.print(report.deps_line(shown, label if many else None))

    _each_device(s, args, one)


def _dep_name(dep: list[Any], style: str, names: dict[tuple[int, int], str]) -> str:
    label, devno = dep
    if devno is None:
        return str(label)
    if style == "devname" and tuple(devno) in names:
        return names[tuple(devno)]
    if tuple(devno) in names:
        return f"dm-{devno[1]}"
    try:
        return os.path.basename(os.path.realpath(f"/sys/dev/block/{devno[0]}:{devno[1]}"))
    except OSError:
        return str(label)


def cmd_ls(s: Session, args: list[str]) -> None:
    target = s.opts.get("target")
    if target is not None:
        for name in s.all_names():
            if any(line[2] == target for line in s.call("table", "table", name, device=name)):
                info = s.call("info", "info", name, device=name)
                s.print(f"{name}\t({info['major']}, {info['minor']})")
        return
    if s.opts.has("tree"):
        _ls_tree(s)
        return
    infos = s.call("list", "names", "")
    if not infos:
        s.print("No devices found")
    for info in infos:
        s.print(report.ls_line(info))


def _ls_tree(s: Session) -> None:
    opts = report.TreeOptions(symbols="utf" if _utf8(s.env) else "ascii")
    try:
        opts.apply(s.opts.get("options") or "")
    except ValueError as e:
        s.error(str(e))
        raise Failed() from None
    devices = s.call("tree", "names", "")
    if not devices:
        s.print("No devices found")
        return
    nodes, roots = report.build_tree(devices, opts.inverted)
    s.out.write(report.render_tree(nodes, roots, opts))


def _utf8(env: Mapping[str, str]) -> bool:
    for var in ("LC_ALL", "LC_CTYPE", "LANG"):
        value = env.get(var)
        if value:
            return "utf-8" in value.lower() or "utf8" in value.lower()
    return locale.getpreferredencoding(False).lower().replace("-", "") == "utf8"


def cmd_wait(s: Session, args: list[str]) -> None:
    device, label, rest = s.device_and_rest(args)
    event_nr = _atoi(rest[-1]) if rest else 0
    try:
        timeout = float(s.opts.get("timeout") or 0) or None
    except ValueError:
        s.error(f"Invalid --timeout {s.opts.get('timeout')}.")
        raise Failed() from None
    s.show_info(s.call("wait", "waitevent", label, device=device, event_nr=event_nr, timeout=timeout))


def cmd_mknodes(s: Session, args: list[str]) -> None:
    """Device nodes come with the exports; nothing to create here (a missing device is fine)."""


def cmd_targets(s: Session, args: list[str]) -> None:
    for name, version in s.call("targets", "versions", ""):
        s.print(report.targets_line(name, version))


def cmd_version(s: Session, args: list[str]) -> None:
    s.print(f"Library version:   {LIBRARY_VERSION}")
    s.print(f"Driver version:    {s.call('version', 'version', '')['driver']}")


def cmd_help(s: Session, args: list[str]) -> None:
    s.err.write(usage() + "\n")
    if s.opts.has("columns"):
        s.error("Device-mapper info fields")
        s.error("-------------------------")
        for name, field in report.FIELDS.items():
            s.error(f"  {name:<16} - {field.heading}")


HANDLERS: Final[dict[str, Callable[[Session, list[str]], None]]] = {
    "help": cmd_help,
    "create": cmd_create,
    "remove": cmd_remove,
    "remove_all": cmd_remove_all,
    "suspend": cmd_suspend,
    "resume": _simple("resume", "resume"),
    "load": cmd_load,
    "reload": cmd_load,
    "clear": _simple("clear", "clear"),
    "wipe_table": _simple("wipe_table", "reload"),
    "rename": cmd_rename,
    "message": cmd_message,
    "ls": cmd_ls,
    "info": cmd_info,
    "deps": cmd_deps,
    "status": _lines_command("status"),
    "table": _lines_command("table"),
    "wait": cmd_wait,
    "mknodes": cmd_mknodes,
    "targets": cmd_targets,
    "version": cmd_version,
}


def _check_switches(opts: Options, err: TextIO) -> bool:
    if opts.has("table") and opts.has("notable"):
        err.write("--table and --notable are incompatible.\n")
        return False
    if opts.has("major") != opts.has("minor"):
        err.write("Please specify both major number and minor number.\n")
        return False
    if opts.has("concise") or opts.has("select"):
        err.write(f"{PROG}: --concise and --select are not supported.\n")
        return False
    return True


def _run_command(s: Session, command: str, args: list[str]) -> int:
    _, _, lo, hi, repeatable = _COMMANDS[command]
    if len(args) < lo or (hi >= 0 and len(args) > hi):
        s.error("Incorrect number of arguments.")
        s.err.write(usage() + "\n")
        return 1
    handler = HANDLERS[command]
    groups = [[a] for a in args] if repeatable and len(args) > 1 and command in (
        "remove", "suspend", "resume", "clear", "wipe_table") else [args]
    try:
        for group in groups:
            handler(s, group)
    except Failed:
        s.error("Command failed.")
        return 1
    except DaemonUnavailableError as e:
        s.error(str(e))
        s.error("Command failed.")
        return 1
    finally:
        s.close()
    return 0


def main(
    argv: Sequence[str] | None = None, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
    stderr: TextIO | None = None, env: Mapping[str, str] | None = None,
) -> int:
    """Run udmsetup with argv (default ``sys.argv[1:]``) and return its exit status."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        opts, rest = parse_options(sys.argv[1:] if argv is None else argv)
    except getopt.GetoptError as e:
        err.write(f"{PROG}: {e}\nCouldn't process command line.\n")
        return 1
    if not _check_switches(opts, err):
        err.write("Couldn't process command line.\n")
        return 1
    session = Session(opts, os.environ if env is None else env, stdin or sys.stdin, out, err)
    if opts.has("help"):
        cmd_help(session, [])
        return 0
    if opts.has("version"):
        return _run_command(session, "version", [])
    if not rest:
        err.write(usage() + "\n")
        return 1
    if rest[0] not in _COMMANDS:
        err.write("Unknown command.\n" + usage() + "\n")
        return 1
    return _run_command(session, rest[0], rest[1:])


if __name__ == "__main__":
    sys.exit(main())
