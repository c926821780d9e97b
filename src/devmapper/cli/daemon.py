"""``devmapper daemon``: run the userspace device-mapper (the kernel's role) in the foreground.

The daemon holds every mapped device, serves ``<runtime dir>/control`` and keeps its devices in
``<state dir>/devices.json``, so that after a restart (even after SIGKILL) every device, pool and
table comes back.  SIGTERM, SIGINT and SIGHUP shut it down cleanly: devices are flushed and pools
committed.  ``udmsetup`` starts it on demand (in the background, logging to ``<runtime
dir>/daemon.log``) when nothing answers on the socket.

Device files: the daemon mounts ``<runtime dir>/devices`` (FUSE, direct I/O) with one file per
mapped device, sized as the device.  As root it also attaches a loop device (``--direct-io=on``) to
each file and links ``/dev/mapper/NAME`` (``--mapper-dir``) to it, so ``mkfs``/``mount`` work on
``/dev/mapper/NAME``; ``--no-loop`` keeps only the files, ``--no-device-files`` mounts nothing.
Removing a device whose loop device is mounted fails (busy) unless deferred.

NBD: every mapped device with a live table is also an NBD export named after it, on the unix socket
``<runtime dir>/nbd.sock`` (``nbd+unix:///NAME?socket=<runtime dir>/nbd.sock``) and, with
``--nbd-tcp PORT``, on 127.0.0.1; ``--no-nbd`` turns this off.  ``--nbd-tls on|require`` with
``--nbd-tls-certificates DIR`` offers or demands TLS (``nbds+unix://``, ``nbds://``); ``--nbd-poll-us``
sets how long a reader polls for a busy client's next request (0: never; see ``nbd/server.py``).
Suspending a device holds its I/O but does not freeze a filesystem on it (``sync`` first, as with
``--nolockfs``).

Directories: ``--runtime-dir``/``--state-dir`` win; then ``$DEVMAPPER_RUNTIME_DIR`` and
``$DEVMAPPER_STATE_DIR``; then, as root, ``/run/devmapper`` and ``/var/lib/devmapper``; otherwise
``$XDG_RUNTIME_DIR/devmapper`` (or ``/tmp/devmapper-<uid>``) and ``$XDG_STATE_HOME/devmapper`` (or
``~/.local/state/devmapper``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from devmapper.cli.nbd import poll_us
from devmapper.control.exports import ExportHub
from devmapper.control.nbd_exports import DeviceExports
from devmapper.control.server import Daemon, DaemonRunningError
from devmapper.errors import DevmapperError
from devmapper.nbd.server import POLL, NbdServer
from devmapper.nbd.tls import server_context

LOG_NAME = "daemon.log"
DEVICES_DIR = "devices"
NBD_SOCKET = "nbd.sock"


def runtime_dir_from_env(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("DEVMAPPER_RUNTIME_DIR"):
        return Path(env["DEVMAPPER_RUNTIME_DIR"])
    if os.geteuid() == 0:
        return Path("/run/devmapper")
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "devmapper"
    return Path(f"/tmp/devmapper-{os.getuid()}")


def state_dir_from_env(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("DEVMAPPER_STATE_DIR"):
        return Path(env["DEVMAPPER_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/devmapper")
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "devmapper"
    return Path.home() / ".local" / "state" / "devmapper"


def spawn(runtime_dir: Path, state_dir: Path) -> None:
    """Start a daemon in the background (its own session, output to the runtime dir's log)."""
    runtime_dir.mkdir(parents=True, exist_ok=True)
    with open(runtime_dir / LOG_NAME, "ab") as log_file:
        subprocess.Popen(
            [sys.executable, "-m", "devmapper.cli.main", "daemon", "--runtime-dir", str(runtime_dir),
             "--state-dir", str(state_dir)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True, close_fds=True,
        )


def register(sub: Any) -> None:
    p = sub.add_parser(
        "daemon", help="run the userspace device-mapper daemon (udmsetup starts it on demand)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runtime-dir", type=Path, help="socket and pid file (default: see above)")
    p.add_argument("--state-dir", type=Path, help="saved devices (default: see above)")
    p.add_argument("--log-file", type=Path, help="log here instead of standard error")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--monitor-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often pools with an autoextend policy are checked besides their events (1)")
    p.add_argument("--no-space-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long writes queue on a full pool before failing, 0 = forever (60)")
    p.add_argument("--no-device-files", action="store_true",
                   help="do not mount <runtime dir>/devices (one FUSE file per device)")
    p.add_argument("--no-loop", action="store_true",
                   help="no loop devices and mapper links for the device files (default as root: on)")
    p.add_argument("--mapper-dir", type=Path, default=Path("/dev/mapper"), metavar="DIR",
                   help="where NAME links to the device's loop device go (/dev/mapper)")
    p.add_argument("--no-nbd", action="store_true", help="do not serve the devices over NBD")
    p.add_argument("--nbd-tcp", type=int, metavar="PORT", help="also serve NBD on 127.0.0.1:PORT (0: any port)")
    p.add_argument("--nbd-tls", choices=("off", "on", "require"), default="off",
                   help="offer TLS on the NBD sockets, or require it (needs --nbd-tls-certificates)")
    p.add_argument("--nbd-tls-certificates", type=Path, metavar="DIR",
                   help="server-cert.pem, server-key.pem (and ca-cert.pem for --nbd-tls-verify-peer)")
    p.add_argument("--nbd-tls-verify-peer", action="store_true",
                   help="require NBD client certificates signed by DIR/ca-cert.pem")
    p.add_argument("--nbd-poll-us", type=poll_us, default=POLL * 1e6, metavar="US",
                   help="poll this long for a busy NBD client's next request before sleeping "
                        f"(default {POLL * 1e6:g}; 0: never poll)")
    p.set_defaults(handler=run)


def _setup_logging(args: argparse.Namespace, err: TextIO) -> None:
    handler: logging.Handler = logging.StreamHandler(err)
    if args.log_file is not None:
        handler = logging.FileHandler(args.log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(args.log_level)


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    runtime_dir = args.runtime_dir or runtime_dir_from_env()
    state_dir = args.state_dir or state_dir_from_env()
    _setup_logging(args, err)
    tls = None
    if args.nbd_tls != "off" and not args.no_nbd:
        if args.nbd_tls_certificates is None:
            err.write(f"devmapper daemon: --nbd-tls={args.nbd_tls} needs --nbd-tls-certificates DIR\n")
            return 2
        try:
            tls = server_context(args.nbd_tls_certificates, args.nbd_tls_verify_peer)
        except DevmapperError as e:
            err.write(f"devmapper daemon: {e}\n")
            return 1
    exports = None
    if not args.no_device_files:
        from devmapper.fuse.adapter import FuseMount  # needs mfusepy and libfuse3

        loops = not args.no_loop and os.geteuid() == 0
        exports = ExportHub(FuseMount(runtime_dir.absolute() / DEVICES_DIR),
                            args.mapper_dir.absolute() if loops else None)
    daemon = Daemon(runtime_dir.absolute(), state_dir.absolute(), monitor_interval=args.monitor_interval,
                    no_space_timeout=args.no_space_timeout, exports=exports)

    def stop(signum: int, frame: FrameType | None) -> None:
        daemon.request_shutdown()

    # Before start: libfuse installs its own handlers where it finds the default ones.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        daemon.start()
    except DaemonRunningError as e:
        err.write(f"devmapper daemon: {e}\n")
        return 1
    os.chdir("/")
    nbd = None
    if not args.no_nbd:
        nbd = _start_nbd(daemon, runtime_dir.absolute(), args.nbd_tcp, tls, args.nbd_tls, args.nbd_poll_us / 1e6)
    try:
        daemon.serve_forever()
    finally:
        if nbd is not None:
            nbd.shutdown()
        daemon.close()
    return 0


def _start_nbd(
    daemon: Daemon, runtime_dir: Path, tcp_port: int | None, tls: ssl.SSLContext | None, policy: str, poll: float
) -> NbdServer:
    server = NbdServer(DeviceExports(daemon.manager), tls=tls, tls_required=policy == "require", poll=poll)
    server.serve_unix(runtime_dir / NBD_SOCKET)
    if tcp_port is not None:
        host, port = server.serve_tcp("127.0.0.1", tcp_port)
        logging.getLogger(__name__).info("serving NBD on %s:%d", host, port)
    return server
