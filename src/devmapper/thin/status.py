"""Table and status lines of the thin-pool and thin targets, byte for byte as ``dm-thin.c`` emits them.

What the kernel prints (``pool_status``, ``emit_flags``, ``thin_status``)
-----------------------------------------------------------------------
* pool table:  ``<meta dev> <data dev> <block size> <low water> <#features> [<feature> ]*`` -- every
  field followed by one space, so the line ends in a space; features in the fixed order
  skip_block_zeroing, ignore_discard, no_discard_passdown, read_only, error_if_no_space, from the
  features *requested* in the table.
* pool status: ``<trans id> <used meta>/<total meta> <used data>/<total data> <held root|-> <mode>
  <discard> <no-space policy> <needs_check|-> <metadata low water> `` -- again each field followed by
  a space; or just ``Fail`` when the pool failed.
* thin table: ``<pool dev> <dev id>[ <origin dev>]`` and thin status ``<mapped sectors> <highest
  mapped sector|->`` -- no trailing space; ``Fail`` when the pool failed.

``dmsetup`` shows each as ``<start> <length> <target> <params>``; ``target_line`` builds that form.

The feature words are parsed as ``parse_pool_features`` does: case-insensitive, at most 4 of them.
Device names are whatever strings the caller uses (``253:0``, a path); nothing here opens them.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

from devmapper.errors import DeviceError
from devmapper.units import MAX_DATA_BLOCK_SIZE, MAX_DEV_ID, MIN_DATA_BLOCK_SIZE

MAX_FEATURE_ARGS = 4  # the kernel's dm_arg limit, although five feature words exist


class PoolMode(enum.IntEnum):
    """The pool's modes, ordered by degradation (``enum pool_mode``)."""

    WRITE = 0
    OUT_OF_DATA_SPACE = 1
    OUT_OF_METADATA_SPACE = 2  # behaves and reports like READ_ONLY, but a metadata resize recovers it
    READ_ONLY = 3
    FAIL = 4

    @property
    def status_word(self) -> str:
        if self is PoolMode.OUT_OF_DATA_SPACE:
            return "out_of_data_space"
        if self in (PoolMode.OUT_OF_METADATA_SPACE, PoolMode.READ_ONLY):
            return "ro"
        return "rw"


@dataclasses.dataclass(frozen=True, slots=True)
class PoolFeatures:
    """The optional feature words of a thin-pool table line."""

    skip_block_zeroing: bool = False
    ignore_discard: bool = False
    no_discard_passdown: bool = False
    read_only: bool = False
    error_if_no_space: bool = False

    WORDS = ("skip_block_zeroing", "ignore_discard", "no_discard_passdown", "read_only", "error_if_no_space")

    @classmethod
    def parse(cls, words: Sequence[str]) -> PoolFeatures:
        """Feature words without their count; unknown words -> EINVAL ("Unrecognised pool feature")."""
        if len(words) > MAX_FEATURE_ARGS:
            raise DeviceError("Invalid number of pool feature arguments", "EINVAL")
        chosen: dict[str, bool] = {}
        for word in words:
            name = word.lower()
            if name not in cls.WORDS:
                raise DeviceError(f"Unrecognised pool feature requested: {word}", "EINVAL")
            chosen[name] = True
        return cls(**chosen)

    def words(self) -> list[str]:
        return [w for w in self.WORDS if getattr(self, w)]

    def emit(self) -> str:
        """``emit_flags``: the count and the words, each followed by a space."""
        words = self.words()
        return "".join(f"{w} " for w in [str(len(words)), *words])


def _decimal(text: str, what: str, limit: int = (1 << 64) - 1) -> int:
    """Parse like ``kstrtoull(s, 10)``: optional '+', decimal digits, optional trailing newline."""
    s = text[:-1] if text.endswith("\n") else text
    s = s[1:] if s.startswith("+") else s
    if not s.isascii() or not s.isdigit() or int(s) > limit:
        raise DeviceError(f"Invalid {what}: {text}", "EINVAL")
    return int(s)


def parse_dev_id(text: str) -> int:
    """A thin device id as the pool messages read it (``read_dev_id``): decimal, at most 2^24-1."""
    return _decimal(text, "device id", MAX_DEV_ID)


def parse_u64(text: str, what: str) -> int:
    return _decimal(text, what)


def check_data_block_size(sectors: int) -> None:
    if not (MIN_DATA_BLOCK_SIZE <= sectors <= MAX_DATA_BLOCK_SIZE and sectors % MIN_DATA_BLOCK_SIZE == 0):
        raise DeviceError(f"Invalid block size {sectors}", "EINVAL")


@dataclasses.dataclass(frozen=True, slots=True)
class PoolTable:
    """The parameters of a thin-pool table line."""

    metadata_dev: str
    data_dev: str
    data_block_size: int  # sectors
    low_water_mark: int  # data blocks
    features: PoolFeatures = PoolFeatures()

    def __post_init__(self) -> None:
        if self.metadata_dev == self.data_dev:
            raise DeviceError("Error setting metadata or data device", "EINVAL")
        check_data_block_size(self.data_block_size)

    @classmethod
    def parse(cls, params: str) -> PoolTable:
        """``pool_ctr``'s argument checks on the text after ``thin-pool``."""
        argv = params.split()
        if len(argv) < 4:
            raise DeviceError("Invalid argument count", "EINVAL")
        features: list[str] = []
        if len(argv) > 4:
            count = _decimal(argv[4], "number of pool feature arguments")
            if count > MAX_FEATURE_ARGS or len(argv) != 5 + count:
                raise DeviceError("Invalid number of pool feature arguments", "EINVAL")
            features = argv[5:]
        if argv[0] == argv[1]:
            raise DeviceError("Error setting metadata or data device", "EINVAL")
        block_size = _decimal(argv[2], "block size")
        low_water = _decimal(argv[3], "low water mark")
        return cls(argv[0], argv[1], block_size, low_water, PoolFeatures.parse(features))

    def format(self) -> str:
        return f"{self.metadata_dev} {self.data_dev} {self.data_block_size} {self.low_water_mark} " + (
            self.features.emit()
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ThinTable:
    """The parameters of a thin table line."""

    pool_dev: str
    dev_id: int
    origin_dev: str | None = None

    @classmethod
    def parse(cls, params: str) -> ThinTable:
        argv = params.split()
        if len(argv) not in (2, 3):
            raise DeviceError("Invalid argument count", "EINVAL")
        if len(argv) == 3 and argv[0] == argv[2]:
            raise DeviceError("Error setting origin device", "EINVAL")
        try:
            dev_id = parse_dev_id(argv[1])
        except DeviceError:
            raise DeviceError("Invalid device id", "EINVAL") from None
        return cls(argv[0], dev_id, argv[2] if len(argv) == 3 else None)

    def format(self) -> str:
        origin = f" {self.origin_dev}" if self.origin_dev is not None else ""
        return f"{self.pool_dev} {self.dev_id}{origin}"


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStatus:
    """Every field of a thin-pool status line."""

    transaction_id: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    used_data_blocks: int
    total_data_blocks: int
    held_root: int  # 0 = none
    mode: PoolMode
    discard: str  # ignore_discard | discard_passdown | no_discard_passdown
    error_if_no_space: bool
    needs_check: bool
    metadata_low_water_mark: int

    def format(self) -> str:
        if self.mode is PoolMode.FAIL:
            return "Fail"
        fields = [
            str(self.transaction_id),
            f"{self.used_metadata_blocks}/{self.total_metadata_blocks}",
            f"{self.used_data_blocks}/{self.total_data_blocks}",
            str(self.held_root) if self.held_root else "-",
            self.mode.status_word,
            self.discard,
            "error_if_no_space" if self.error_if_no_space else "queue_if_no_space",
            "needs_check" if self.needs_check else "-",
            str(self.metadata_low_water_mark),
        ]
        return "".join(f"{f} " for f in fields)


@dataclasses.dataclass(frozen=True, slots=True)
class ThinStatus:
    """A thin device's status: mapped sectors and the last sector of the highest mapped block."""

    mapped_sectors: int
    highest_mapped_sector: int | None
    failed: bool = False

    def format(self) -> str:
        if self.failed:
            return "Fail"
        highest = "-" if self.highest_mapped_sector is None else str(self.highest_mapped_sector)
        return f"{self.mapped_sectors} {highest}"


def target_line(start: int, length: int, target: str, params: str) -> str:
    """The ``dmsetup table``/``status`` form of one target."""
    return f"{start} {length} {target} {params}"


def metadata_reserve(total_blocks: int) -> int:
    """Blocks hidden from the reported free metadata (``__set_metadata_reserve``)."""
    return min(4096, total_blocks // 10)


def metadata_low_water_mark(metadata_dev_blocks: int) -> int:
    """The metadata threshold (``calc_metadata_threshold``): min(4 MiB of blocks, a quarter of the device)."""
    return min(1024, metadata_dev_blocks // 4)
