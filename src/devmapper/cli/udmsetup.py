"""``udmsetup``: a dmsetup-like control plane for userspace devices (usage only for now).

The command set mirrors dmsetup(8) for the thin-pool and thin targets.  The control
plane behind it (``devmapper.control``) is not implemented yet, so every command reports
that and exits 1; only ``-h``/``--help`` and ``--version`` succeed.
"""

from __future__ import annotations

import sys
from typing import Final

from devmapper import __version__

PROG: Final = "udmsetup"

# (command, arguments) in dmsetup's syntax.
COMMANDS: Final[tuple[tuple[str, str], ...]] = (
    ("create", "<dev_name> [--table <table> | <table_file>]"),
    ("remove", "<dev_name>"),
    ("load", "<dev_name> [--table <table> | <table_file>]"),
    ("suspend", "<dev_name>"),
    ("resume", "<dev_name>"),
    ("table", "[<dev_name>]"),
    ("status", "[<dev_name>]"),
    ("message", "<dev_name> <sector> <message>"),
    ("ls", ""),
    ("info", "[<dev_name>]"),
)

NOT_IMPLEMENTED: Final = "the control plane is not implemented yet"


def usage() -> str:
    """Return the usage text, in the shape of dmsetup's."""
    width = max(len(name) for name, _ in COMMANDS)
    lines = [
        "Usage:",
        "",
        f"{PROG} [-h|--help] [--version] <command> [command_args]",
        "",
        "Commands:",
    ]
    lines += [f"  {name:<{width}} {args}".rstrip() for name, args in COMMANDS]
    lines += [
        "",
        f"Note: {NOT_IMPLEMENTED}; every command above currently exits with status 1.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run udmsetup with ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(usage(), file=sys.stderr)
        return 1
    first = args[0]
    if first in ("-h", "--help"):
        print(usage())
        return 0
    if first == "--version":
        print(f"{PROG} (devmapper) {__version__}")
        return 0
    known = {name for name, _ in COMMANDS}
    if first in known:
        print(f"{PROG}: {first}: {NOT_IMPLEMENTED}", file=sys.stderr)
    elif first.startswith("-"):
        print(f"{PROG}: unrecognised option '{first}' (see '{PROG} --help')", file=sys.stderr)
    else:
        print(f"{PROG}: unknown command '{first}' (see '{PROG} --help')", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
