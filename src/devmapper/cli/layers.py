"""``devmapper layers``: Docker-devicemapper-style images and containers on a userspace thin pool.

The store lives in a Docker root (``--root``; default ``$DEVMAPPER_LAYERS_ROOT``, else
``<state dir>/docker``) laid out as ``/var/lib/docker`` was: ``devicemapper/`` (sparse data and
metadata files, one JSON file per thin device, mount points) and ``image/devicemapper/`` (layers,
images, tags, containers).  Devices live in the devmapper daemon (started on demand, as udmsetup
does; as root it gives each device a loop device so filesystems mount), so mounts outlive a command.

Storage options are Docker's (``--storage-opt dm.basesize=20G``, repeatable).  Those given to
``init`` are saved in ``devicemapper/storage-opts.json`` and apply to later commands; options given
to a later command override them for that command (``dm.basesize`` grows the base device).

Rescue: ``--read-only --root /var/lib/docker`` opens an existing Docker devicemapper directory
without writing to it; ``devices`` lists its thin devices and ``export-device HASH -o FILE`` writes a
device's root filesystem as a tar.

Exit codes: 0 success, 1 failure (message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from devmapper.cli.daemon import runtime_dir_from_env, spawn, state_dir_from_env
from devmapper.cli.progress import ProgressBar
from devmapper.errors import DevmapperError
from devmapper.layers.dm import Dm
from devmapper.layers.info import render
from devmapper.layers.options import DmOptions, human_size, parse_container_size
from devmapper.layers.store import LayerStore

OPTS_FILE = "storage-opts.json"


def register(sub: Any) -> None:
    p = sub.add_parser("layers", help="Docker-devicemapper-style images and containers on a thin pool",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, help="Docker root directory (see above)")
    p.add_argument("--storage-opt", action="append", default=[], metavar="dm.KEY=VALUE",
                   help="a Docker devicemapper storage option (repeatable)")
    p.add_argument("--read-only", action="store_true", help="open an existing directory without writing to it")
    p.add_argument("--runtime-dir", type=Path, help="the devmapper daemon's runtime directory")
    cmds = p.add_subparsers(dest="layers_command", metavar="SUBCOMMAND", required=True)

    def add(name: str, help_: str, fn: Callable[..., int]) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = cmds.add_parser(name, help=help_, description=help_)
        q.set_defaults(layers_fn=fn)
        # the global options are accepted after the subcommand too
        q.add_argument("--root", dest="sub_root", type=Path, default=None, help=argparse.SUPPRESS)
        q.add_argument("--storage-opt", dest="sub_storage_opt", action="append", default=[],
                       metavar="dm.KEY=VALUE", help="a Docker devicemapper storage option (repeatable)")
        q.add_argument("--read-only", dest="sub_read_only", action="store_true", help=argparse.SUPPRESS)
        q.add_argument("--runtime-dir", dest="sub_runtime_dir", type=Path, default=None, help=argparse.SUPPRESS)
        return q

    add("init", "create the pool and the base device (idempotent; saves --storage-opt)", _init)
    add("info", "the `docker info` devicemapper block, plus pool health", _info)
    q = add("import", "import a `docker save` tarball or an OCI image layout (directory or tar)", _import)
    q.add_argument("archive", type=Path)
    add("images", "list images", _images)
    q = add("rmi", "remove an image (untag; delete layers nothing else uses)", _rmi)
    q.add_argument("image")
    q.add_argument("-f", "--force", action="store_true")
    q = add("create", "create a container from an image; prints its id", _create)
    q.add_argument("image")
    q.add_argument("--name", help="container id (default: random 64 hex digits)")
    q.add_argument("--size", help="container size (Docker's --storage-opt size=), at least the image's")
    add("ps", "list containers", _ps)
    q = add("mount", "mount a container (reference-counted); prints its rootfs path", _mount)
    q.add_argument("container")
    q = add("unmount", "drop one mount reference of a container", _unmount)
    q.add_argument("container")
    for name, help_ in (("diff", "the container's changes as a tar with whiteouts"),
                        ("export", "the container's root filesystem as a tar")):
        q = add(name, help_, _diff if name == "diff" else _export)
        q.add_argument("container")
        q.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")
    q = add("commit", "make a new image from a container's changes; prints the image id", _commit)
    q.add_argument("container")
    q.add_argument("tag", nargs="?")
    q = add("grow", "grow a container's device and filesystem", _grow)
    q.add_argument("container")
    q.add_argument("size")
    q = add("rm", "remove a container", _rm)
    q.add_argument("container")
    add("devices", "list thin devices (hash, id, size, mapped/exclusive/shared, state)", _devices)
    q = add("export-device", "write any device's rootfs as a tar (works with --read-only)", _export_device)
    q.add_argument("hash", help="device hash ('base' for the base device)")
    q.add_argument("-o", "--output", type=Path)
    q = add("reconcile", "compare pool, device files and layer records; --fix repairs", _reconcile)
    q.add_argument("--fix", action="store_true")
    add("shutdown", "unmount everything, deactivate devices and remove the pool (as dockerd's exit)", _shutdown)
    p.set_defaults(handler=run)


def _root(args: argparse.Namespace, env: Mapping[str, str]) -> Path:
    if args.root is not None:
        return Path(args.root).absolute()
    if env.get("DEVMAPPER_LAYERS_ROOT"):
        return Path(env["DEVMAPPER_LAYERS_ROOT"]).absolute()
    return state_dir_from_env(env).absolute() / "docker"


def _options(root: Path, given: list[str], *, save: bool) -> DmOptions:
    path = root / "devicemapper" / OPTS_FILE
    saved: list[str] = []
    try:
        saved = [str(o) for o in json.loads(path.read_text())]
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        raise DevmapperError(f"{path}: unreadable ({e})") from e
    opts = DmOptions.parse(saved + given)  # later values win; validation as Docker's
    if save and given:
        keys = {o.split("=", 1)[0].lower() for o in given}
        merged = [o for o in saved if o.split("=", 1)[0].lower() not in keys] + given
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text(json.dumps(merged))
    return opts


@contextmanager
def _store(args: argparse.Namespace, *, save_opts: bool = False) -> Iterator[LayerStore]:
    env = os.environ
    root = _root(args, env)
    given = list(args.storage_opt)
    opts = _options(root, given, save=save_opts and not args.read_only)
    if not given:
        opts.basesize_given = False  # saved options describe the pool; they never re-trigger a grow
    runtime = args.runtime_dir or runtime_dir_from_env(env)
    state = state_dir_from_env(env)
    start = None if env.get("DEVMAPPER_NO_AUTOSTART") else (lambda: spawn(runtime, state))
    dm = Dm.connect(runtime, start)
    try:
        store = LayerStore(root, dm, opts, read_only=args.read_only)
        store.open()
        try:
            yield store
        finally:
            store.close()
    finally:
        dm.close()


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    args.root = args.sub_root or args.root
    args.storage_opt = [*args.storage_opt, *args.sub_storage_opt]
    args.read_only = args.read_only or args.sub_read_only
    args.runtime_dir = args.sub_runtime_dir or args.runtime_dir
    fn: Callable[[argparse.Namespace, TextIO, TextIO], int] = args.layers_fn
    return fn(args, out, err)


@contextmanager
def _output(path: Path | None, out: TextIO) -> Iterator[BinaryIO]:
    if path is None:
        stream = getattr(out, "buffer", None)
        if stream is None:
            raise DevmapperError("standard output is not binary; use -o FILE")
        yield stream
        stream.flush()
        return
    with open(path, "wb") as f:
        yield f


def _init(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args, save_opts=True) as s:
        out.write(f"{s.devices.pool}\n")
    return 0


def _info(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s:
        out.write(render(s.devices))
    return 0


def _import(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    bar = ProgressBar("importing", err)
    with _store(args) as s:
        try:
            ids = s.import_archive(args.archive, progress=lambda what, done, total: bar.stage(what, done, total))
        finally:
            bar.close()
        for image_id in ids:
            tags = s.image(image_id).tags
            out.write(f"Loaded image: {', '.join(tags) if tags else image_id}\n")
    return 0


def _images(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s:
        out.write(f"{'REPOSITORY:TAG':<40} {'IMAGE ID':<12} {'LAYERS':>6}\n")
        for img in s.images():
            short = img.image_id.removeprefix("sha256:")[:12]
            for tag in img.tags or ["<none>:<none>"]:
                out.write(f"{tag:<40} {short:<12} {len(img.layers):>6}\n")
    return 0


def _rmi(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s:
        removed = s.remove_image(args.image, force=args.force)
        out.write(f"Untagged: {args.image}\n")
        for cache_id in removed:
            out.write(f"Deleted layer device: {cache_id}\n")
    return 0


def _create(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s:
        size = None
        if args.size is not None:
            image = s.image(s.resolve_image(args.image))
            parent = s.devices.info(image.top_cache_id or "").size
            size = parse_container_size({"size": args.size}, parent)
        out.write(s.create_container(args.image, container_id=args.name, size=size) + "\n")
    return 0


def _ps(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s:
        out.write(f"{'CONTAINER ID':<14} {'IMAGE':<14} {'SIZE':>9} {'MOUNTED':>7}\n")
        for c in s.containers():
            image = (c.image_id or "<gone>").removeprefix("sha256:")[:12]
            out.write(f"{c.container_id[:12]:<14} {image:<14} {human_size(c.size):>9} {c.mounted:>7}\n")
    return 0


def _mount(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s:
        out.write(f"{s.mount_container(args.container)}\n")
    return 0


def _unmount(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s:
        s.unmount_container(args.container)
    return 0


def _diff(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s, _output(args.output, out) as f:
        s.diff_container(args.container, f)
    return 0


def _export(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s, _output(args.output, out) as f:
        s.export_container(args.container, f)
    return 0


def _commit(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s:
        out.write(s.commit_container(args.container, args.tag) + "\n")
    return 0


def _grow(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s:
        info = s.container(args.container)
        s.grow_container(args.container, parse_container_size({"size": args.size}, info.size))
    return 0


def _rm(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s:
        s.remove_container(args.container)
    return 0


def _devices(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s:
        ds = s.devices
        usage = ds.usage()
        bs = ds.block_size
        out.write(f"{'HASH':<20} {'ID':>8} {'SIZE':>9} {'MAPPED':>9} {'EXCLUSIVE':>9} {'SHARED':>9} STATE\n")
        for hash_, d in sorted(ds.devices.items(), key=lambda kv: kv[1].device_id):
            u = usage.get(d.device_id)
            state = "deleted" if d.deleted else ("missing-in-pool" if u is None else "ok")
            cells = ["-", "-", "-"] if u is None else [
                human_size(u.mapped_blocks * bs), human_size(u.exclusive_blocks * bs),
                human_size(u.shared_blocks * bs)]
            label = hash_ or "base"
            out.write(f"{label[:20]:<20} {d.device_id:>8} {human_size(d.size):>9} {cells[0]:>9} {cells[1]:>9} "
                      f"{cells[2]:>9} {state}\n")
    return 0


def _export_device(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    hash_ = "" if args.hash == "base" else args.hash
    with _store(args) as s, _output(args.output, out) as f:
        s.export_device(hash_, f)
    return 0


def _reconcile(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s:
        report = s.reconcile(fix=args.fix)
        rows = [("orphan thin ids in the pool", [str(i) for i in report.devices.orphan_ids]),
                ("device files without a thin device", report.devices.dangling),
                ("devices no layer or container uses", report.unreferenced),
                ("records whose device is gone", report.missing),
                ("unfinished layers or containers", report.incomplete),
                ("pending deferred deletions", report.devices.deleted)]
        for label, items in rows:
            out.write(f"{label}: {len(items)}{'  ' + ' '.join(items) if items else ''}\n")
        if report.clean:
            out.write("clean\n")
            return 0
        out.write("fixed\n" if args.fix else "run with --fix to repair\n")
        return 0 if args.fix else 1


def _shutdown(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _store(args) as s:
        s.devices.shutdown()
    return 0

