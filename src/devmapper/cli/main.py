"""``devmapper``: the command-line entry point.

This package is the only place that prints, exits or reads the environment.  Each command module
registers a sub-parser and a handler ``run(args, out, err) -> int``; errors from the library become a
message on stderr and the error's exit code here, nowhere else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from devmapper import __version__
from devmapper.cli import daemon as daemon_cmd
from devmapper.cli import demo as demo_cmd
from devmapper.cli import layers as layers_cmd
from devmapper.cli import nbd as nbd_cmd
from devmapper.cli import thintools as thin_cmd
from devmapper.errors import DevmapperError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devmapper",
        description="Userspace device-mapper thin provisioning with kernel-compatible dm-thin metadata.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"devmapper {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    thin_cmd.register(sub)
    demo_cmd.register(sub)
    nbd_cmd.register(sub)
    daemon_cmd.register(sub)
    layers_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["thin", "metadata-size"]:
        # thin_metadata_size has getopt-style options with optional attached arguments that argparse
        # cannot express; they go through verbatim.
        args = parser.parse_args(["thin", "metadata-size"])
        args.args = argv[2:]
    else:
        args = parser.parse_args(argv)
    try:
        code: int = args.handler(args, out, err)
    except DevmapperError as e:
        err.write(f"{parser.prog} {args.command}: {e}\n")
        return e.exit_code
    except BrokenPipeError:
        return 1
    except OSError as e:
        err.write(f"{parser.prog} {args.command}: {e}\n")
        return 1
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
