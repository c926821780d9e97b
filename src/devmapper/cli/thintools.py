"""``devmapper thin ...``: check, dump, restore, repair, ls, delta and metadata-size.

Flags, output and exit codes follow thin-provisioning-tools 0.9.0 (thin_check, thin_dump, ...), so
scripts written for those tools work with ``devmapper thin <tool>`` in their place.  Input files are
opened read-only by every command except restore's output.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, TextIO

from devmapper.blockdev.file import FileBlockDevice
from devmapper.cli.progress import ProgressBar
from devmapper.errors import BlockDeviceError, ToolError
from devmapper.units import METADATA_BLOCK_SIZE

Handler = Any


def open_metadata(path: str, write: bool = False) -> FileBlockDevice:
    """Open a metadata file or device, refusing what clearly is not binary metadata."""
    if os.path.isdir(path):
        raise ToolError(f"{path}: is a directory")
    if not os.path.exists(path):
        raise ToolError(f"{path}: no such file or device")
    dev = FileBlockDevice(path, read_only=not write)
    if dev.size() < METADATA_BLOCK_SIZE:
        dev.close()
        raise ToolError(f"{path}: metadata device/file too small ({dev.size()} bytes); is this binary metadata?")
    head = dev.read(0, 64).lstrip()
    if head.startswith(b"<superblock") or head.startswith(b"<?xml"):
        dev.close()
        raise ToolError(f"{path}: looks like XML, not binary metadata (use 'devmapper thin restore')")
    return dev


def _metadata_snap_arg(value: str | bool) -> bool | int:
    if value is True or value is False:
        return value
    text = str(value).lstrip("=")
    if not text.isdigit():
        raise ToolError(f"bad metadata snapshot block {value!r}")
    return int(text)


# -- check -------------------------------------------------------------------------------------------


def _check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from devmapper.thin.check import check_metadata
    from devmapper.thin.metadata import PoolMetadata

    if args.clear_needs_check_flag and (args.metadata_snap or args.skip_mappings or args.super_block_only
                                        or args.ignore_non_fatal_errors):
        raise ToolError("--clear-needs-check-flag cannot be combined with partial checks or ignored errors")
    dev = open_metadata(args.device)
    bar = ProgressBar("checking", err)
    try:
        report = check_metadata(dev, metadata_snap=args.metadata_snap, skip_mappings=args.skip_mappings,
                                super_block_only=args.super_block_only, progress=bar.stage)
    finally:
        bar.close()
        dev.close()
    if not args.quiet:
        if report.trans_id is not None:
            out.write(f"TRANSACTION_ID={report.trans_id}\n")
        if report.metadata_free_blocks is not None:
            out.write(f"METADATA_FREE_BLOCKS={report.metadata_free_blocks}\n")
        for d in report.defects:
            err.write(f"{'error' if d.fatal else 'warning'}: {d.message}\n")
        for rule, n in report.suppressed.items():
            err.write(f"... and {n} more {rule} defects\n")
    failing = [d for d in report.defects if d.fatal or not args.ignore_non_fatal_errors]
    if failing or report.suppressed:
        return 1
    if args.clear_needs_check_flag and report.needs_check:
        pmd = PoolMetadata.open(FileBlockDevice(args.device))
        pmd.clear_needs_check()
        pmd.close()
    return 0


# -- metadata-size -----------------------------------------------------------------------------------


def _metadata_size(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from devmapper.thin import metadata_size as ms

    try:
        opts = ms.parse_metadata_size_args(args.args)
    except ms.MetadataSizeError as e:
        err.write(e.render("devmapper thin metadata-size", "devmapper thin metadata-size"))
        return 1
    if opts.action is ms.Action.HELP:
        out.write(ms.help_text("devmapper thin metadata-size"))
    elif opts.action is ms.Action.VERSION:
        from devmapper import __version__

        out.write(f"{__version__}\n")
    else:
        out.write(ms.format_metadata_size(opts, "devmapper thin metadata-size"))
    return 0


# -- dump --------------------------------------------------------------------------------------------


def _dump(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from devmapper.thin.dump import dump
    from devmapper.thin.xml import HumanReadableWriter, XmlWriter

    dev = open_metadata(args.device)
    target: TextIO = out
    opened = None
    try:
        if args.output:
            opened = target = open(args.output, "w", encoding="utf-8")  # noqa: SIM115
        writer = XmlWriter(target) if args.format == "xml" else HumanReadableWriter(target)
        bar = ProgressBar("dumping", err)
        dump(dev, writer, metadata_snap=_metadata_snap_arg(args.metadata_snap),
             dev_ids=args.dev_id or None, skip_mappings=args.skip_mappings, progress=bar.update)
        bar.close()
    finally:
        if opened is not None:
            opened.close()
        dev.close()
    return 0


# -- restore -----------------------------------------------------------------------------------------


def _restore(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from devmapper.thin.restore import RestoreEmitter
    from devmapper.thin.xml import parse_xml

    if not os.path.isfile(args.input):
        raise ToolError(f"{args.input}: no such input file")
    if not os.path.exists(args.output):
        raise ToolError(f"{args.output}: output file does not exist; create it first (e.g. truncate -s 64M)")
    try:
        dev = FileBlockDevice(args.output)
    except BlockDeviceError as e:
        raise ToolError(str(e)) from e
    emitter = RestoreEmitter(dev)
    try:
        with open(args.input, "rb") as source:
            parse_xml(source, emitter)
    except BaseException:
        emitter.fail()
        dev.close()
        raise
    if not args.quiet and err.isatty():
        err.write(f"restored {emitter.nr_mappings} mappings\n")
    return 0


# -- repair ------------------------------------------------------------------------------------------


def _repair(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from devmapper.thin.repair import salvage
    from devmapper.thin.restore import RestoreEmitter

    if not os.path.exists(args.output):
        raise ToolError(f"{args.output}: output file does not exist; create it first (e.g. truncate -s 64M)")
    if os.path.realpath(args.input) == os.path.realpath(args.output):
        raise ToolError("the output must not be the input: repair writes fresh metadata elsewhere")
    source = open_metadata(args.input)
    try:
        target = FileBlockDevice(args.output)
    except BlockDeviceError as e:
        source.close()
        raise ToolError(str(e)) from e
    emitter = RestoreEmitter(target)
    bar = ProgressBar("salvaging", err)
    bar.enabled = bar.enabled and not args.quiet
    try:
        report = salvage(source, emitter, progress=bar.update)
    except BaseException:
        emitter.fail()
        target.close()
        raise
    finally:
        bar.close()
        source.close()
    if not args.quiet:
        for line in report.lines():
            err.write(f"{line}\n")
        err.write(f"repaired: {report.devices} devices, {report.mappings} mappings kept"
                  f"{'' if report.clean else ' (see the losses above)'}\n")
    return 0


# -- ls ----------------------------------------------------------------------------------------------


def _ls(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from devmapper.thin import ls

    fields = ls.DEFAULT_FIELDS if args.format is None else tuple(f for f in args.format.split(",") if f)
    for f in fields:
        if f not in ls.FIELDS:
            raise ToolError(f"unknown field {f!r}; choose from {', '.join(ls.FIELDS)}")
    dev = open_metadata(args.device)
    try:
        bar = ProgressBar("counting", err)
        block_size, devices = ls.usage(dev, args.metadata_snap, bar.update)
        bar.close()
    finally:
        dev.close()
    out.write(ls.render(block_size, devices, fields, headers=not args.no_headers))
    return 0


# -- delta -------------------------------------------------------------------------------------------


def _delta(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from devmapper.thin.delta import delta

    if args.snap1 is None or args.snap2 is None:
        raise ToolError("--snap1 and --snap2 are both required")
    dev = open_metadata(args.device)
    try:
        delta(dev, out, args.snap1, args.snap2, metadata_snap=_metadata_snap_arg(args.metadata_snap),
              verbose=args.verbose)
    finally:
        dev.close()
    return 0


# -- registration ------------------------------------------------------------------------------------


def register(sub: Any) -> None:
    thin = sub.add_parser("thin", help="thin-provisioning-tools equivalents (check, dump, restore, ls, ...)",
                          description="Inspect, check and rebuild dm-thin pool metadata.")
    tools = thin.add_subparsers(dest="tool", metavar="TOOL", required=True)

    p = tools.add_parser("check", help="validate metadata (like thin_check, plus data reference counts)")
    p.add_argument("device", help="metadata device or file")
    p.add_argument("-q", "--quiet", action="store_true", help="no output; the exit code tells")
    p.add_argument("-m", "--metadata-snap", action="store_true", help="check the metadata snapshot's trees only")
    p.add_argument("--skip-mappings", action="store_true", help="do not walk the per-device mapping trees")
    p.add_argument("--super-block-only", action="store_true", help="check the superblock only")
    p.add_argument("--ignore-non-fatal-errors", action="store_true", help="exit 0 on leaks and other minor defects")
    p.add_argument("--clear-needs-check-flag", action="store_true", help="clear NEEDS_CHECK if the check passes")
    p.set_defaults(handler=_check)

    p = tools.add_parser("metadata-size", help="estimate the metadata size for a pool (like thin_metadata_size)",
                         add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="thin_metadata_size options: -b SIZE -s SIZE -m N ...")
    p.set_defaults(handler=_metadata_size)

    p = tools.add_parser("dump", help="dump metadata as XML (like thin_dump)")
    p.add_argument("device", help="metadata device or file")
    p.add_argument("-f", "--format", choices=["xml", "human_readable"], default="xml")
    p.add_argument("-m", "--metadata-snap", nargs="?", const=True, default=False, metavar="BLOCK",
                   help="dump the metadata snapshot (optionally naming its block)")
    p.add_argument("-o", "--output", help="write to this file instead of standard output")
    p.add_argument("--dev-id", type=int, action="append", help="dump only this device (repeatable)")
    p.add_argument("--skip-mappings", action="store_true", help="devices only, no mappings")
    p.set_defaults(handler=_dump)

    p = tools.add_parser("restore", help="build metadata from XML (like thin_restore)")
    p.add_argument("-i", "--input", required=True, help="XML produced by dump or thin_dump")
    p.add_argument("-o", "--output", required=True, help="metadata file or device (must already exist)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(handler=_restore)

    p = tools.add_parser("repair", help="salvage damaged metadata into fresh metadata (like thin_repair)",
                         description="Read everything readable from damaged metadata (INPUT) and write it as "
                                     "fresh, consistent metadata to OUTPUT, which must already exist. Damaged "
                                     "nodes are skipped with everything below them; each loss is reported.")
    p.add_argument("-i", "--input", required=True, help="the damaged metadata file or device (read only)")
    p.add_argument("-o", "--output", required=True, help="metadata file or device to write (must already exist)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no report")
    p.set_defaults(handler=_repair)

    p = tools.add_parser("ls", help="list devices with mapped/exclusive/shared usage (like thin_ls)")
    p.add_argument("device", help="metadata device or file")
    p.add_argument("-m", "--metadata-snap", action="store_true", help="use the metadata snapshot")
    p.add_argument("--no-headers", action="store_true")
    p.add_argument("-o", "--format", help="comma-separated fields: " + "DEV,MAPPED_BLOCKS,... (see thin_ls)")
    p.set_defaults(handler=_ls)

    p = tools.add_parser("delta", help="differences between two thin devices (like thin_delta)")
    p.add_argument("device", help="metadata device or file")
    p.add_argument("--snap1", "--thin1", type=int, help="left device id")
    p.add_argument("--snap2", "--thin2", type=int, help="right device id")
    p.add_argument("-m", "--metadata-snap", nargs="?", const=True, default=False, metavar="BLOCK")
    p.add_argument("--verbose", action="store_true", help="list every range with its data blocks")
    p.set_defaults(handler=_delta)
