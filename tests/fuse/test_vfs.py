"""``DeviceTree`` (pure) and the mfusepy adapter on a memory export (needs /dev/fuse, not root)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from devmapper.errors import DevmapperError
from devmapper.export import Extent
from devmapper.fuse.vfs import DeviceTree, VfsError


class MemoryExport:
    def __init__(self, size: int, read_only: bool = False) -> None:
        self.buf = bytearray(size)
        self.read_only = read_only
        self.name = "mem"
        self.flushes = 0
        self.fail = False

    def size(self) -> int:
        return len(self.buf)

    def read(self, offset: int, length: int) -> bytes:
        if self.fail:
            raise DevmapperError("broken")
        return bytes(self.buf[offset : offset + length])

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self.buf[offset : offset + len(data)] = data

    def flush(self) -> None:
        self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None:
        self.buf[offset : offset + length] = bytes(length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(length)]

    def close(self) -> None:
        pass


def test_tree_files_sizes_io_and_errors() -> None:
    tree = DeviceTree()
    mem = MemoryExport(8192)
    tree.add("a", mem)
    tree.add("ro", MemoryExport(512, read_only=True))
    assert tree.names() == ["a", "ro"]
    assert tree.attr("a").size == 8192 and tree.attr("a").mode & 0o777 == 0o600
    assert tree.attr("ro").mode & 0o777 == 0o400
    with pytest.raises(VfsError) as e:
        tree.add("a", mem)
    assert e.value.errno == errno.EEXIST
    assert tree.write("a", 4096, b"xyz") == 3
    assert tree.read("a", 4096, 3) == b"xyz"
    assert tree.read("a", 8190, 100) == b"\0\0"  # short read at the end
    assert tree.read("a", 9000, 10) == b""
    with pytest.raises(VfsError) as e:
        tree.write("a", 8190, b"abc")
    assert e.value.errno == errno.ENOSPC
    mem.buf.extend(bytes(4096))  # a reload grew it
    assert tree.attr("a").size == 12288
    tree.fsync("a")
    assert mem.flushes == 1
    mem.fail = True
    with pytest.raises(VfsError) as e:
        tree.read("a", 0, 1)
    assert e.value.errno == errno.EIO
    with pytest.raises(VfsError) as e:
        tree.open("ro", writable=True)
    assert e.value.errno == errno.EROFS
    tree.open("a", writable=True)
    assert tree.open_count("a") == 1
    tree.rename("a", "b")
    assert tree.names() == ["b", "ro"] and tree.open_count("b") == 1
    tree.release("b")
    assert tree.open_count("b") == 0
    with pytest.raises(VfsError) as e:
        tree.truncate("b", 1)
    assert e.value.errno == errno.EPERM
    tree.truncate("b", 12288)
    assert tree.remove("b") is mem and tree.remove("b") is None
    with pytest.raises(VfsError) as e:
        tree.attr("b")
    assert e.value.errno == errno.ENOENT


def test_adapter_serves_files_with_direct_io(tmp_path: Path) -> None:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("needs /dev/fuse and fusermount3")
    from devmapper.fuse.adapter import FuseMount

    mount = FuseMount(tmp_path / "devices")
    mount.start()
    try:
        mem = MemoryExport(1 << 20)
        mount.add("disk", mem)
        assert os.listdir(mount.directory) == ["disk"]
        assert os.stat(mount.path("disk")).st_size == 1 << 20
        fd = os.open(mount.path("disk"), os.O_RDWR | os.O_DIRECT)
        try:
            import mmap

            buf = mmap.mmap(-1, 65536)
            buf.write(b"\xa5" * 65536)
            assert os.pwritev(fd, [buf], 65536) == 65536
            assert bytes(mem.buf[65536 : 65536 * 2]) == b"\xa5" * 65536  # reached the export at once
            os.fsync(fd)
            assert mem.flushes >= 1
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"x" * 4096, 1 << 20)
            assert e.value.errno in (errno.ENOSPC, errno.EFBIG, errno.EINVAL)
        finally:
            os.close(fd)
        mem.buf.extend(bytes(1 << 20))
        assert os.stat(mount.path("disk")).st_size == 2 << 20  # no attribute caching
        mount.rename("disk", "renamed")
        assert os.listdir(mount.directory) == ["renamed"]
        mount.remove("renamed")
        assert os.listdir(mount.directory) == []
    finally:
        mount.stop()
    assert not mount.directory.exists()
