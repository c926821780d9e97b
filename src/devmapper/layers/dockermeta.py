"""Docker's per-device bookkeeping in ``<home>/metadata/``, its device names, and its id allocator.

Theory of operation
-------------------
``home`` is the driver home, ``<docker root>/devicemapper``.  Its ``metadata/`` directory holds one
small JSON file per thin device, named by the device's hash (the layer or container id; the base
device, hash ``""``, lives in ``base``), plus two bookkeeping files:

* ``transaction-metadata`` -- the one-slot intent log written before each pool change
  (:class:`TransactionRecord`);
* ``deviceset-metadata`` -- the allocator's next-id hint and the base device's UUID and filesystem
  (:class:`DeviceSetRecord`).

Every file is written as Docker wrote it, byte for byte: Go's ``encoding/json`` output, compact, keys
in struct-field order, with Go's string escaping.  Keys this module does not know (Red Hat's fork
added ``filesystem``) are kept and written back after the known ones.  Reading is as lenient as Go's
decoder (keys match case-insensitively, ``null`` means the zero value) but a file that Go could not
decode either is an error naming the file, never silently skipped.

Writes are atomic the way Docker made them -- a ``.tmpXXXX`` file in ``metadata/``, written, fsynced,
renamed over the target -- and then, unlike Docker, the directory is fsynced too, so a crash cannot
lose a rename that the pool's transaction id already counts on.  A crash between the write and the
rename leaves a ``.tmp*`` file; loading ignores it (the name starts with "."), :meth:`cleanup_temp`
removes it.  A directory opened ``read_only`` refuses every change.

Names: the device prefix ``docker-MAJ:MIN-INODE`` comes from ``stat(home)`` with Docker's own
major/minor arithmetic (not glibc's, which differs for large device numbers).  Thin ids are 24 bits;
:class:`IdAllocator` is Docker's bitmap with a moving hint: each allocation starts just after the last
id handed out and wraps around, so a fresh install gives the base device id 1, and after a wrap id 0
can be handed out too (Docker did the same; the kernel accepts it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from devmapper.control.files import fsync_dir, replace_file
from devmapper.errors import DeviceError, DevmapperError, ReadOnlyError
from devmapper.units import MAX_DEV_ID

log = logging.getLogger(__name__)

__all__ = [
    "BASE_FILE",
    "DEVICESET_FILE",
    "TRANSACTION_FILE",
    "DevInfo",
    "DeviceSetRecord",
    "IdAllocator",
    "MetadataDir",
    "MetadataFileError",
    "TransactionRecord",
    "device_name",
    "device_prefix",
    "file_name",
    "go_json",
    "pool_name",
]

BASE_FILE: Final = "base"
DEVICESET_FILE: Final = "deviceset-metadata"
TRANSACTION_FILE: Final = "transaction-metadata"
_BOOKKEEPING: Final = frozenset({DEVICESET_FILE, TRANSACTION_FILE})
_TEMP_PREFIX: Final = ".tmp"
_NAME_MAX: Final = 255  # bytes in one path component on Linux

_INT64: Final = (-(1 << 63), (1 << 63) - 1)
_UINT64: Final = (0, (1 << 64) - 1)


class MetadataFileError(DevmapperError):
    """A file in the metadata directory cannot be read, decoded or written, or a name is not allowed."""


# -- Go encoding/json --------------------------------------------------------------------------------

_STRING_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _go_string(text: str) -> str:
    """A JSON string the way Go's encoder writes it (HTML-safe: <, > and & escaped)."""
    text = _SURROGATE.sub("\ufffd", text)  # Go writes invalid UTF-8 as U+FFFD
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _STRING_ESCAPES:
            out.append(_STRING_ESCAPES[ch])
        elif code < 0x20 or ch in "<>&" or code in (0x2028, 0x2029):
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _go_float(value: float) -> str:
    """A float64 as Go's encoder writes it: shortest digits, 'e' form only outside [1e-6, 1e21)."""
    if not math.isfinite(value):
        raise MetadataFileError(f"cannot encode {value} in JSON")
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):
        text = repr(value)
        return re.sub(r"e-0(\d)$", r"e-\1", text)
    return format(Decimal(repr(value)).normalize(), "f")


def go_json(value: Any) -> str:
    """Compact JSON as Go's ``json.Marshal`` writes it; dict keys keep their order (struct order)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{_go_string(str(k))}:{go_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(go_json(v) for v in value) + "]"
    raise MetadataFileError(f"cannot encode {type(value).__name__} in JSON")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode_object(raw: bytes, source: str) -> dict[str, Any]:
    """The JSON object in ``raw``; anything else (not JSON, not an object) names ``source``."""
    try:
        value = json.loads(raw.decode("utf-8", errors="replace"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise MetadataFileError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise MetadataFileError(f"{source}: expected a JSON object, found {go_json(value)[:40]}")
    return value


# (attribute, JSON key, Go kind) in Go struct-field order.
_Field = tuple[str, str, str]


_Split = tuple[dict[str, Any], dict[str, Any]]  # (known attribute values, unknown keys)


def _decode_fields(obj: dict[str, Any], fields: tuple[_Field, ...], source: str) -> _Split:
    """Split ``obj`` into known attribute values and unknown keys, matching keys like Go does."""
    by_key = {key: (attr, kind) for attr, key, kind in fields}
    by_folded = {key.lower(): (attr, kind) for attr, key, kind in fields}
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in obj.items():
        match = by_key.get(key) or by_folded.get(key.lower())
        if match is None:
            extra[key] = value
        elif value is not None:  # Go leaves the zero value for null
            attr, kind = match
            values[attr] = _checked(value, kind, key, source)
    return values, extra


def _checked(value: Any, kind: str, key: str, source: str) -> Any:
    """``value`` if Go could store it in a field of ``kind`` ("int", "uint64", "bool", "string")."""
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "string":
        ok = isinstance(value, str)
    else:
        lo, hi = _INT64 if kind == "int" else _UINT64
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    if not ok:
        raise MetadataFileError(f"{source}: {key} must be a JSON {kind}, found {go_json(value)[:40]}")
    return value


def _zero(kind: str) -> Any:
    return {"bool": False, "string": ""}.get(kind, 0)


def _decode_record(raw: bytes, fields: tuple[_Field, ...], source: str) -> _Split:
    values, extra = _decode_fields(_decode_object(raw, source), fields, source)
    return {attr: values.get(attr, _zero(kind)) for attr, _, kind in fields}, extra


def _encode_record(record: Any, fields: tuple[_Field, ...], extra: dict[str, Any] | None = None) -> bytes:
    obj = {key: getattr(record, attr) for attr, key, _ in fields}
    for key, value in (extra or {}).items():
        obj.setdefault(key, value)
    return go_json(obj).encode()


# -- the three records -------------------------------------------------------------------------------

_DEVINFO_FIELDS: Final[tuple[_Field, ...]] = (
    ("device_id", "device_id", "int"),
    ("size", "size", "uint64"),
    ("transaction_id", "transaction_id", "uint64"),
    ("initialized", "initialized", "bool"),
    ("deleted", "deleted", "bool"),
)


@dataclasses.dataclass
class DevInfo:
    """``metadata/<hash>``: one thin device (Docker's ``devInfo``; the hash is the file name)."""

    hash: str
    device_id: int  # 24-bit thin id in the pool
    size: int  # virtual size in bytes
    transaction_id: int  # the pool transaction open when the device was created
    initialized: bool = False  # base device only: mkfs finished
    deleted: bool = False  # deferred deletion pending
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # unknown keys, kept on rewrite

    def to_json(self) -> bytes:
        """The file's exact bytes: ``{"device_id":12,"size":...,"deleted":false}`` then any extra keys."""
        return _encode_record(self, _DEVINFO_FIELDS, self.extra)

    @classmethod
    def from_json(cls, hash: str, raw: bytes, source: str = "device metadata") -> DevInfo:
        """Decode a device file; errors name ``source``."""
        values, extra = _decode_record(raw, _DEVINFO_FIELDS, source)
        if values["device_id"] < 0:
            raise MetadataFileError(f"{source}: device_id {values['device_id']} is negative")
        return cls(hash=hash, extra=extra, **values)


_TRANSACTION_FIELDS: Final[tuple[_Field, ...]] = (
    ("open_transaction_id", "open_transaction_id", "uint64"),
    ("device_hash", "device_hash", "string"),
    ("device_id", "device_id", "int"),
)


@dataclasses.dataclass(frozen=True)
class TransactionRecord:
    """``metadata/transaction-metadata``: the pool change in progress (or the last one)."""

    open_transaction_id: int
    device_hash: str
    device_id: int

    def to_json(self) -> bytes:
        return _encode_record(self, _TRANSACTION_FIELDS)

    @classmethod
    def from_json(cls, raw: bytes, source: str = TRANSACTION_FILE) -> TransactionRecord:
        values, _ = _decode_record(raw, _TRANSACTION_FIELDS, source)
        return cls(**values)


_DEVICESET_FIELDS: Final[tuple[_Field, ...]] = (
    ("next_device_id", "next_device_id", "int"),
    ("base_device_uuid", "BaseDeviceUUID", "string"),  # no JSON tags in Go: the field names
    ("base_device_filesystem", "BaseDeviceFilesystem", "string"),
)


@dataclasses.dataclass(frozen=True)
class DeviceSetRecord:
    """``metadata/deviceset-metadata``: the id allocator's hint and the base device's identity."""

    next_device_id: int
    base_device_uuid: str = ""  # blkid UUID of the base device's filesystem (Docker 1.8+)
    base_device_filesystem: str = ""  # "ext4" or "xfs" (Docker 1.10+)

    def to_json(self) -> bytes:
        return _encode_record(self, _DEVICESET_FIELDS)

    @classmethod
    def from_json(cls, raw: bytes, source: str = DEVICESET_FILE) -> DeviceSetRecord:
        values, _ = _decode_record(raw, _DEVICESET_FIELDS, source)
        return cls(**values)


# -- names -------------------------------------------------------------------------------------------


def file_name(hash: str) -> str:
    """The metadata file of device ``hash``: ``base`` for ``""``; names that would clash are refused."""
    if hash == "":
        return BASE_FILE
    problem = None
    if "/" in hash or "\0" in hash:
        problem = "contains '/' or NUL"
    elif hash.startswith("."):
        problem = "starts with '.' (such files are ignored on load)"
    elif hash.endswith(".migrated"):
        problem = "ends with '.migrated' (such files are ignored on load)"
    elif hash in _BOOKKEEPING or hash == BASE_FILE:
        problem = "is reserved for a bookkeeping file"
    elif len(hash.encode("utf-8", errors="surrogateescape")) > _NAME_MAX:
        problem = f"is longer than {_NAME_MAX} bytes"
    if problem:
        raise MetadataFileError(f"device hash {hash!r} cannot name a metadata file: it {problem}")
    return hash


def _hash_of(name: str) -> str:
    return "" if name == BASE_FILE else name


def _docker_major(dev: int) -> int:
    return (dev >> 8) & 0xFFF


def _docker_minor(dev: int) -> int:
    return (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def device_prefix(home: Path) -> str:
    """``docker-MAJ:MIN-INODE`` from ``stat(home)``, with Docker's major/minor arithmetic."""
    st = os.stat(home)
    return f"docker-{_docker_major(st.st_dev)}:{_docker_minor(st.st_dev)}-{st.st_ino}"


def device_name(prefix: str, hash: str) -> str:
    """The dm name of a thin device: ``<prefix>-base`` for the base device, else ``<prefix>-<hash>``."""
    return f"{prefix}-{hash or BASE_FILE}"


def pool_name(prefix: str) -> str:
    """The dm name of a pool the driver builds itself."""
    return f"{prefix}-pool"


# -- the directory ------------------------------------------------------------------------------------


class MetadataDir:
    """``<home>/metadata``: load, save and remove the device files and the two bookkeeping files."""

    def __init__(self, home: Path, *, read_only: bool = False) -> None:
        self.home = Path(home)
        self.path = self.home / "metadata"
        self.read_only = read_only

    def file_path(self, hash: str) -> Path:
        return self.path / file_name(hash)

    # -- device files --

    def load_all(self) -> dict[str, DevInfo]:
        """Every device file, by hash (deleted ones included); a missing directory is empty."""
        devices: dict[str, DevInfo] = {}
        for name in self._device_file_names():
            info = self._load_file(self.path / name, _hash_of(name))
            if info is not None:
                devices[info.hash] = info
        return devices

    def load(self, hash: str) -> DevInfo | None:
        """One device file, or None if there is none (or its id is beyond 24 bits, as Docker did)."""
        return self._load_file(self.file_path(hash), hash)

    def save(self, info: DevInfo) -> None:
        """Write ``metadata/<hash>`` atomically and durably."""
        self._write(file_name(info.hash), info.to_json())

    def remove(self, hash: str) -> None:
        """Delete ``metadata/<hash>`` durably; a missing file is fine."""
        self._unlink(file_name(hash))

    # -- bookkeeping files --

    def transaction(self) -> TransactionRecord | None:
        raw = self._read(self.path / TRANSACTION_FILE)
        return None if raw is None else TransactionRecord.from_json(raw, str(self.path / TRANSACTION_FILE))

    def save_transaction(self, rec: TransactionRecord) -> None:
        self._write(TRANSACTION_FILE, rec.to_json())

    def remove_transaction(self) -> None:
        self._unlink(TRANSACTION_FILE)

    def deviceset(self) -> DeviceSetRecord | None:
        raw = self._read(self.path / DEVICESET_FILE)
        return None if raw is None else DeviceSetRecord.from_json(raw, str(self.path / DEVICESET_FILE))

    def save_deviceset(self, rec: DeviceSetRecord) -> None:
        self._write(DEVICESET_FILE, rec.to_json())

    def cleanup_temp(self) -> int:
        """Remove ``.tmp*`` files a crash left behind; returns how many."""
        self._check_writable("remove temporary files")
        count = 0
        for entry in self._entries():
            if entry.name.startswith(_TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise MetadataFileError(f"{entry.path}: cannot remove ({e.strerror})") from e
                log.info("removed leftover temporary file %s", entry.path)
                count += 1
        if count:
            self._fsync_dir()
        return count

    # -- internals --

    def _entries(self) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(self.path) as it:
                return sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise MetadataFileError(f"{self.path}: cannot list ({e.strerror})") from e

    def _device_file_names(self) -> list[str]:
        """Docker's walk: skip dot files, ``*.migrated``, the bookkeeping files and directories."""
        names = []
        for entry in self._entries():
            name = entry.name
            if name.startswith(".") or name.endswith(".migrated") or name in _BOOKKEEPING:
                continue
            if entry.is_dir():
                continue
            names.append(name)
        return names

    def _load_file(self, path: Path, hash: str) -> DevInfo | None:
        raw = self._read(path)
        if raw is None:
            return None
        info = DevInfo.from_json(hash, raw, str(path))
        if info.device_id > MAX_DEV_ID:
            log.warning("Ignoring Invalid DeviceId=%d in %s", info.device_id, path)
            return None
        return info

    def _read(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise MetadataFileError(f"{path}: cannot read ({e.strerror})") from e

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.path} is open read-only: cannot {what}")

    def _write(self, name: str, data: bytes) -> None:
        """Temporary file, write, fsync, rename, fsync the directory; the temp file never survives a failure."""
        self._check_writable(f"write {name}")
        target = self.path / name
        try:
            self._ensure_dir()
            replace_file(target, data, 0o600, tmp_prefix=_TEMP_PREFIX)
        except OSError as e:
            raise MetadataFileError(f"{target}: cannot write ({e.strerror})") from e

    def _unlink(self, name: str) -> None:
        self._check_writable(f"remove {name}")
        target = self.path / name
        try:
            os.unlink(target)
        except FileNotFoundError:
            return
        except OSError as e:
            raise MetadataFileError(f"{target}: cannot remove ({e.strerror})") from e
        self._fsync_dir()

    def _ensure_dir(self) -> None:
        if not self.path.is_dir():
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsync_dir(self.home)

    def _fsync_dir(self) -> None:
        try:
            fsync_dir(self.path)
        except OSError as e:
            raise MetadataFileError(f"{self.path}: cannot fsync the directory ({e.strerror})") from e


# -- device ids ----------------------------------------------------------------------------------------

_NOT_FULL: Final = re.compile(b"[^\xff]")


class IdAllocator:
    """Docker's device-id bitmap with a next-id hint, over ids ``0..max_id``.

    ``allocate`` starts one past ``next_hint`` (the last id handed out), wraps after ``max_id`` and
    covers the whole space once; it costs O(ids scanned / 8) in C, not a Python loop per id.
    """

    def __init__(self, used: Iterable[int], next_hint: int = 0, *, max_id: int = MAX_DEV_ID) -> None:
        if max_id < 0:
            raise DeviceError(f"max_id {max_id} is negative")
        self.max_id = max_id
        self._size = max_id + 1
        self._bits = bytearray((self._size + 7) // 8)
        for pad in range(self._size, len(self._bits) * 8):  # ids past max_id never look free
            self._bits[pad >> 3] |= 1 << (pad & 7)
        self._next_hint = next_hint % self._size
        for device_id in used:
            self.mark_used(device_id)

    @property
    def next_hint(self) -> int:
        """The last id handed out (``next_device_id`` in deviceset-metadata); the next scan starts after it."""
        return self._next_hint

    def allocate(self) -> int:
        """Mark and return the first free id after the hint, wrapping around; DeviceError if none."""
        start = (self._next_hint + 1) % self._size
        found = self._first_free(start, self._size)
        if found is None:
            found = self._first_free(0, start)
        if found is None:
            raise DeviceError("devmapper: Unable to find a free device ID", "ENOSPC")
        self.mark_used(found)
        self._next_hint = found
        return found

    def mark_used(self, id: int) -> None:
        self._check(id)
        self._bits[id >> 3] |= 1 << (id & 7)

    def release(self, id: int) -> None:
        self._check(id)
        self._bits[id >> 3] &= ~(1 << (id & 7)) & 0xFF

    def is_used(self, id: int) -> bool:
        self._check(id)
        return bool(self._bits[id >> 3] >> (id & 7) & 1)

    def _check(self, id: int) -> None:
        if not 0 <= id <= self.max_id:
            raise DeviceError(f"device id {id} is outside 0..{self.max_id}")

    def _first_free(self, lo: int, hi: int) -> int | None:
        """The lowest free id in ``[lo, hi)``, or None."""
        i = lo
        while i < hi and i & 7:
            if not self._bits[i >> 3] >> (i & 7) & 1:
                return i
            i += 1
        if i >= hi:
            return None
        match = _NOT_FULL.search(self._bits, i >> 3, (hi + 7) >> 3)
        if match is None:
            return None
        byte_index = match.start()
        byte = self._bits[byte_index]
        bit = (~byte & (byte + 1)).bit_length() - 1  # lowest clear bit
        found = byte_index * 8 + bit
        return found if found < hi else None
