"""``devmapper nbd``: serve thin volumes of a pool, or a plain file, over NBD until interrupted.

    devmapper nbd --metadata META --data DATA --thin 0 [--thin 1:snap ...] --size 1G --socket S
    devmapper nbd --file disk.img [--name disk] --socket S [--tcp 127.0.0.1:10809]
    devmapper nbd ... --tls require --tls-certificates DIR [--tls-verify-peer]

Pool mode opens the pool (formatting all-zero metadata with ``--block-size``, as loading a
thin-pool table does), activates each ``--thin ID[:NAME]`` (NAME defaults to ``thinID``;
``--create`` creates missing thin devices) as a volume of ``--size``, and exports it under NAME.
File mode exports one regular file (or block device node).  The first export is also the default
(empty-name) export.  ``--tls on|require`` offers or demands STARTTLS with the certificates in DIR
(``server-cert.pem``, ``server-key.pem``, and ``ca-cert.pem`` to check client certificates), the
layout nbdkit and qemu use; URIs are then printed as ``nbds+unix://``.  SIGINT/SIGTERM stop the
server; volumes are then flushed and closed.

The adapters here (``ThinExport``, ``FileExport``) are the command's own bridge to
``devmapper.export.Export``; the daemon uses the control plane's exports instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, TextIO

from devmapper.errors import DeviceError, ToolError
from devmapper.export import Extent, merge_extents
from devmapper.format.superblock import Superblock
from devmapper.nbd.server import POLL, NbdServer
from devmapper.nbd.tls import server_context
from devmapper.thin.data_device import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate
from devmapper.thin.pool import Pool
from devmapper.thin.volume import ThinVolume
from devmapper.units import METADATA_BLOCK_SIZE, SECTOR_SIZE, parse_size

Buffer = bytes | bytearray | memoryview


class _Named:
    """The name, read-only flag and description every export of this command has."""

    def __init__(self, name: str, read_only: bool, description: str) -> None:
        self._name = name
        self._read_only = read_only
        self.description = description

    @property
    def name(self) -> str:
        return self._name

    @property
    def read_only(self) -> bool:
        return self._read_only


class ThinExport(_Named):
    """A ``ThinVolume`` as an ``Export``; block status comes from the pool's mappings (unmapped
    blocks are holes that read as zeroes, or origin data when the thin has an external origin)."""

    def __init__(self, volume: ThinVolume, name: str, read_only: bool = False) -> None:
        super().__init__(name, read_only, f"thin device {volume.dev_id} of {volume.pool.name}")
        self.volume = volume

    def size(self) -> int:
        return self.volume.size

    def _writable(self) -> None:
        if self._read_only:
            raise DeviceError(f"{self._name} is read-only", "EROFS")

    def read(self, offset: int, length: int) -> bytes:
        return self.volume.read(offset, length)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill buf from offset (the NBD server's copy-saving path for large reads)."""
        self.volume.readinto(offset, buf)

    def write_target(self, offset: int, length: int) -> AbstractContextManager[memoryview | None]:
        """Where a WRITE's payload may be received straight into (see ``ThinVolume.write_target``)."""
        self._writable()
        return self.volume.write_target(offset, length)

    def read_token(self) -> object:
        """Changes whenever the volume's bytes may have (the NBD server's read-ahead checks it)."""
        return self.volume.read_token()

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self._writable()
        self.volume.write(offset, data, fua)

    def flush(self) -> None:
        self.volume.flush()

    def discard(self, offset: int, length: int) -> None:
        self._writable()
        self.volume.discard(offset, length)

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None:
        self._writable()
        self.volume.write_zeroes(offset, length, fua, unmap)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        vol = self.volume
        if offset < 0 or length < 0 or offset + length > vol.size:
            raise DeviceError(f"block status [{offset}, {offset + length}) beyond the end ({vol.size})", "EINVAL")
        bs, end = vol.pool.block_bytes, offset + length
        unmapped_is_hole = vol.origin is None
        out: list[Extent] = []
        pos = offset
        for vblock, _data, _time in vol.pool.md.mappings(vol.dev_id, offset // bs, -(-end // bs)):
            start = max(vblock * bs, offset)
            if start > pos:
                out.append(Extent(start - pos, hole=unmapped_is_hole, zero=unmapped_is_hole))
            stop = min((vblock + 1) * bs, end)
            out.append(Extent(stop - start))
            pos = stop
        if pos < end:
            out.append(Extent(end - pos, hole=unmapped_is_hole, zero=unmapped_is_hole))
        return merge_extents(out)

    def close(self) -> None:
        self.volume.close()


class FileExport(_Named):
    """A regular file or block device node as an ``Export`` (holes found with SEEK_DATA/SEEK_HOLE)."""

    def __init__(self, path: str, name: str, read_only: bool = False) -> None:
        super().__init__(name, read_only, f"file {path}")
        self._fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)

    def size(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_END)

    def _check(self, offset: int, length: int, write: bool = False) -> None:
        if write and self._read_only:
            raise DeviceError(f"{self._name} is read-only", "EROFS")
        if offset < 0 or length < 0 or offset + length > self.size():
            raise DeviceError(f"[{offset}, {offset + length}) is beyond the end of {self._name}", "EINVAL")

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            self._check(offset, length)
            raise DeviceError(f"short read at {offset} of {self._name}", "EIO")
        return data

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill buf from offset (the NBD server's copy-saving path for large reads)."""
        self._check(offset, len(buf))
        mv, done = memoryview(buf), 0
        while done < len(mv):
            n = os.preadv(self._fd, [mv[done:]], offset + done)
            if n <= 0:
                raise DeviceError(f"short read at {offset + done} of {self._name}", "EIO")
            done += n

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self._check(offset, len(data), write=True)
        mv = memoryview(data).cast("B")
        while len(mv):
            n = os.pwritev(self._fd, [mv], offset, os.RWF_DSYNC if fua else 0)
            mv, offset = mv[n:], offset + n

    def flush(self) -> None:
        if not self._read_only:
            os.fdatasync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length, write=True)
        if self._regular and length:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None:
        self._check(offset, length, write=True)
        if not length:
            return
        if self._regular:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if unmap else FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            fallocate(self._fd, mode, offset, length)
        else:
            zeroes = bytes(min(length, 1 << 20))
            for pos in range(offset, offset + length, len(zeroes)):
                self.write(pos, zeroes[: min(len(zeroes), offset + length - pos)])
        if fua:
            os.fdatasync(self._fd)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length)
        end = offset + length
        if not self._regular:
            return [Extent(length)]
        out, pos = [], offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole follows
                data = end
            data = min(data, end)
            if data > pos:
                out.append(Extent(data - pos, hole=True, zero=True))
                pos = data
                continue
            hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            out.append(Extent(hole - pos))
            pos = hole
        return merge_extents(out)

    def close(self) -> None:
        os.close(self._fd)


def _thin_spec(text: str) -> tuple[int, str]:
    dev, _, name = text.partition(":")
    if not dev.isdigit():
        raise argparse.ArgumentTypeError(f"bad thin spec {text!r}: expected ID[:NAME]")
    return int(dev), name or f"thin{dev}"


def _size(text: str) -> int:
    try:
        return parse_size(text, default_unit="b")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _tcp_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise argparse.ArgumentTypeError(f"bad TCP address {text!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)


def poll_us(text: str) -> float:
    """``--poll-us``: microseconds, 0 or more (at most a second)."""
    try:
        us = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad polling time {text!r}: expected microseconds") from None
    if not 0 <= us <= 1e6:
        raise argparse.ArgumentTypeError(f"polling time {text} out of range: 0 to 1000000 microseconds")
    return us


def _block_size_of(metadata: str, default: int) -> int:
    """The data block size (sectors) recorded in existing metadata, else ``default``."""
    with open(metadata, "rb") as f:
        raw = f.read(METADATA_BLOCK_SIZE)
    if len(raw) < METADATA_BLOCK_SIZE or not any(raw):
        return default
    return Superblock.unpack(raw, 0).data_block_size


@contextmanager
def _pool_exports(args: argparse.Namespace) -> Iterator[list[ThinExport]]:
    if args.size is None or args.size % SECTOR_SIZE:
        raise ToolError("--size is required with --metadata (a multiple of 512 bytes)")
    block = _block_size_of(args.metadata, args.block_size)
    with Pool.open(args.metadata, args.data, block, name=args.pool_name) as pool, ExitStack() as stack:
        exports = []
        for dev_id, name in args.thin or [(0, "thin0")]:
            if args.create and not pool.md.device_exists(dev_id):
                pool.create_thin(dev_id)
            vol = pool.open_thin(dev_id, args.size // SECTOR_SIZE)
            export = ThinExport(vol, name, args.read_only)
            stack.callback(export.close)
            exports.append(export)
        yield exports


@contextmanager
def _file_exports(args: argparse.Namespace) -> Iterator[list[FileExport]]:
    export = FileExport(args.file, args.name or os.path.basename(args.file), args.read_only)
    try:
        yield [export]
    finally:
        export.close()


def _handler(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if (args.metadata is None) == (args.file is None):
        raise ToolError("give either --metadata/--data (a pool) or --file")
    if args.metadata is not None and args.data is None:
        raise ToolError("--metadata needs --data")
    if args.socket is None and args.tcp is None:
        raise ToolError("give --socket and/or --tcp")
    tls = None
    if args.tls != "off":
        if args.tls_certificates is None:
            raise ToolError(f"--tls={args.tls} needs --tls-certificates DIR")
        tls = server_context(args.tls_certificates, args.tls_verify_peer)
    stop = threading.Event()
    manager: Any = _pool_exports(args) if args.metadata is not None else _file_exports(args)
    with manager as exports:
        table = {e.name: e for e in exports}
        server = NbdServer(
            table, default_export=exports[0].name, workers=args.workers, min_block=args.min_block,
            read_only=args.read_only, tls=tls, tls_required=args.tls == "require", poll=args.poll_us / 1e6,
        )
        with server:
            where, scheme = [], "nbd" if tls is None else "nbds"
            if args.socket is not None:
                path = os.path.abspath(server.serve_unix(args.socket))
                where.append(f"{scheme}+unix:///{{name}}?socket={path}")
            if args.tcp is not None:
                host, port = server.serve_tcp(*args.tcp)
                where.append(f"{scheme}://{host}:{port}/{{name}}")
            for e in exports:
                out.write(" ".join(w.format(name=e.name) for w in where) + f"  ({e.size()} bytes)\n")
            out.flush()
            previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                while not stop.wait(3600):
                    pass
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("nbd", help="serve thin volumes of a pool, or a file, over NBD (unix socket / loopback TCP)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to serve")
    src.add_argument("--metadata", help="pool metadata file or device")
    src.add_argument("--data", help="pool data file or device")
    src.add_argument("--thin", action="append", type=_thin_spec, metavar="ID[:NAME]",
                     help="thin device to export (repeatable; default 0 as 'thin0')")
    src.add_argument("--size", type=_size, help="size of each thin volume (e.g. 1G)")
    src.add_argument("--block-size", type=int, default=128, metavar="SECTORS",
                     help="data block size when formatting new metadata (default 128 = 64 KiB)")
    src.add_argument("--pool-name", default="pool", help="pool name shown in export descriptions")
    src.add_argument("--create", action="store_true", help="create missing thin devices")
    src.add_argument("--file", help="serve this file instead of a pool")
    src.add_argument("--name", help="export name in --file mode (default: the file's base name)")
    net = p.add_argument_group("how")
    net.add_argument("--socket", help="unix socket path")
    net.add_argument("--tcp", type=_tcp_address, metavar="HOST:PORT", help="also listen on TCP (e.g. 127.0.0.1:10809)")
    net.add_argument("--read-only", action="store_true", help="export read-only")
    net.add_argument("--workers", type=int, default=4, help="worker threads per connection (0: all inline)")
    net.add_argument("--min-block", type=int, default=1, help="advertised minimum block size (power of 2)")
    net.add_argument("--poll-us", type=poll_us, default=POLL * 1e6, metavar="US",
                     help="poll this long for a busy client's next request before sleeping "
                          f"(default {POLL * 1e6:g}; 0: never poll)")
    net.add_argument("--tls", choices=("off", "on", "require"), default="off",
                     help="offer TLS (STARTTLS), or require it before any other option (default: off)")
    net.add_argument("--tls-certificates", metavar="DIR",
                     help="directory with server-cert.pem, server-key.pem (and ca-cert.pem for --tls-verify-peer)")
    net.add_argument("--tls-verify-peer", action="store_true",
                     help="require client certificates signed by DIR/ca-cert.pem")
    p.set_defaults(handler=_handler)
