"""Docker's ``dm.*`` storage options, its size strings, and the per-container ``size`` option.

Theory of operation
-------------------
Docker's devicemapper driver took its settings as ``dm.key=value`` strings (``dockerd --storage-opt``
or ``"storage-opts"`` in daemon.json).  :meth:`DmOptions.parse` reads the same strings with the same
rules, so a daemon.json written for Docker works here unchanged:

* each string is split at its first ``=`` and both halves are trimmed; the key is lower-cased;
* options apply in order, the last one winning, except ``dm.mkfsarg`` (each value appended) and
  ``dm.mountopt`` (values joined with commas);
* any key Docker did not know is fatal: ``devmapper: Unknown option dm.foo``;
* values parse as Go parsed them: sizes with go-units ``RAMInBytes`` (:func:`ram_in_bytes`, binary
  units), booleans with ``strconv.ParseBool`` (:func:`parse_bool`), integers with
  ``strconv.ParseUint``/``ParseInt`` in base 10; error texts are Docker's, byte for byte.

Where this implementation deliberately differs from Docker:

* ``dm.fs`` defaults to ``ext4``, not to "xfs when the kernel has it".  Docker probed for xfs by
  mounting; a library that must not touch the host's module state cannot do that, and the answer
  would depend on the machine.  ext4 is also what Docker made with eager initialisation
  (``lazy_itable_init=0,lazy_journal_init=0``): the base device is formatted once, completely, and
  every snapshot shares those blocks, so nothing is left for a background thread to write into each
  container's device later -- which matters when the pool is ours, in userspace, and every write costs.
  xfs stays available with ``dm.fs=xfs``.
* ``dm.use_deferred_removal`` and ``dm.use_deferred_deletion`` default to true, as Docker 17.07+ did
  when the kernel and libdm supported them; here they are always supported.  Deletion needs removal
  (Docker's error text).  Unlike Docker, leaving deletion unset while turning removal off turns
  deletion off too instead of failing.
* The direct-lvm keys (``dm.directlvm_device``, ``dm.directlvm_device_force``, ``dm.thinp_percent``,
  ``dm.thinp_metapercent``) are recognised but refused: building an LVM volume group needs LVM,
  which this implementation does not use.  ``dm.thinp_autoextend_threshold`` and
  ``dm.thinp_autoextend_percent`` are accepted on their own (Docker insisted on a direct-lvm device
  with them) and describe the autoextend policy of our own pool; 0 means "the default", as in Docker.
* ``dm.blocksize`` is checked against the kernel's rule (a multiple of 64 KiB from 64 KiB to 1 GiB)
  here, not later by the pool; Docker silently truncated it to 32 bits and let the kernel complain.
* ``ram_in_bytes`` refuses infinities, NaN and values beyond a signed 64-bit integer, where Go's
  float-to-int64 conversion silently produced garbage.

The options used when a driver home was first set up are worth keeping (``to_json``/``from_json``):
some, like the block size, cannot change afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from devmapper.errors import DevmapperError

log = logging.getLogger(__name__)

__all__ = [
    "DmOptions",
    "OptionError",
    "human_size",
    "parse_bool",
    "parse_container_size",
    "ram_in_bytes",
]

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30

_INT64_MAX: Final = (1 << 63) - 1
_MIN_BLOCK_SIZE: Final = 64 * KiB  # the kernel's dm-thin limits on the pool's data block size
_MAX_BLOCK_SIZE: Final = 1 * GiB
LOG_LEVEL_FATAL: Final = 2  # libdm's _LOG_FATAL .. _LOG_DEBUG, the range dm.libdm_log_level accepts
LOG_LEVEL_DEBUG: Final = 7


class OptionError(DevmapperError):
    """A storage option, size string or per-container option is malformed or not allowed."""


# -- Go's scalar parsers -------------------------------------------------------------------------

# Characters Go's strings.TrimSpace removes (unicode.IsSpace); Python's str.strip() removes a few more.
_GO_SPACE: Final = " \t\n\v\f\r\x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))
_DECIMAL_FLOAT: Final = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_HEX_FLOAT: Final = re.compile(
    r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?[0-9]+", re.ASCII
)
_SPECIAL_FLOAT: Final = re.compile(r"[+-]?(?:inf|infinity)|nan", re.ASCII | re.IGNORECASE)  # Go: no sign on nan
_GO_SHORT_ESCAPES: Final = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def _go_quote(text: str) -> str:
    """``strconv.Quote``, as Go's parse errors show the offending string."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in _GO_SHORT_ESCAPES:
            out.append(_GO_SHORT_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _syntax_error(func: str, text: str) -> OptionError:
    return OptionError(f"strconv.{func}: parsing {_go_quote(text)}: invalid syntax")


def _range_error(func: str, text: str) -> OptionError:
    return OptionError(f"strconv.{func}: parsing {_go_quote(text)}: value out of range")


_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def parse_bool(text: str) -> bool:
    """Go's ``strconv.ParseBool``: 1 t T TRUE true True / 0 f F FALSE false False, nothing else."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _syntax_error("ParseBool", text)


def _parse_uint(text: str, bits: int, func: str = "ParseUint") -> int:
    """Go's ``strconv.ParseUint(text, 10, bits)``: ASCII digits only, no sign, no underscores."""
    if not text or not text.isascii() or not text.isdigit():
        raise _syntax_error(func, text)
    value = int(text)
    if value >= 1 << bits:
        raise _range_error(func, text)
    return value


def _parse_int(text: str, bits: int) -> int:
    """Go's ``strconv.ParseInt(text, 10, bits)``: an optional sign, then ASCII digits."""
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not digits or not digits.isascii() or not digits.isdigit():
        raise _syntax_error("ParseInt", text)
    value = -int(digits) if text[0] == "-" else int(digits)
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise _range_error("ParseInt", text)
    return value


def _parse_float(text: str) -> float:
    """Go's ``strconv.ParseFloat(text, 64)`` (decimal, hexadecimal with a p exponent, inf, nan)."""
    if _DECIMAL_FLOAT.fullmatch(text) or _SPECIAL_FLOAT.fullmatch(text):
        value = float(text)
    elif _HEX_FLOAT.fullmatch(text):
        try:
            value = float.fromhex(text)
        except OverflowError:
            raise _range_error("ParseFloat", text) from None
    else:
        raise _syntax_error("ParseFloat", text)
    if math.isinf(value) and not _SPECIAL_FLOAT.fullmatch(text):
        raise _range_error("ParseFloat", text)
    return value


# -- go-units sizes -------------------------------------------------------------------------------

_BINARY_UNITS: Final = {"k": KiB, "m": MiB, "g": GiB, "t": 1 << 40, "p": 1 << 50}
_DECIMAL_ABBRS: Final = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
_NUMBER_CHARS: Final = "0123456789. "


def ram_in_bytes(text: str) -> int:
    """go-units ``RAMInBytes`` (v0.5.0, the last Docker's): "10G", "10GB", "10gib", "10 GB", "1.5k".

    The number is a Go float (so "1.5k" is 1536 and "1e3" is 1000), optionally followed by one space
    and a case-insensitive ``k m g t p`` (powers of 1024), optionally followed by ``b`` or ``ib``;
    a bare ``b`` means bytes.  Fractions are truncated toward zero.
    """
    sep = max(text.rfind(ch) for ch in _NUMBER_CHARS)
    if sep == -1:
        raise OptionError(f"invalid size: '{text}'")
    number, suffix = text[: sep + 1], text[sep + 1 :]
    if text[sep] == " ":
        number = text[:sep]
    value = _parse_float(number)
    if value < 0:
        raise OptionError(f"invalid size: '{text}'")
    value *= _suffix_multiplier(suffix)
    if not math.isfinite(value) or value >= 2.0**63:
        raise OptionError(f"invalid size: '{text}'")  # Go's int64(float) would wrap silently here
    return int(value)


def _suffix_multiplier(suffix: str) -> int:
    """The unit a go-units suffix stands for; errors quote it as go-units does."""
    if not suffix:
        return 1
    if len(suffix.encode()) > 3:
        raise OptionError(f"invalid suffix: '{suffix}'")
    lower = suffix.lower()
    if lower[0] == "b":
        if len(lower) > 1:
            raise OptionError(f"invalid suffix: '{lower}'")
        return 1
    multiplier = _BINARY_UNITS.get(lower[0])
    if multiplier is None or (len(lower) == 2 and lower[1] != "b") or (len(lower) == 3 and lower[1:] != "ib"):
        raise OptionError(f"invalid suffix: '{lower}'")
    return multiplier


def human_size(n: int | float) -> str:
    """go-units ``HumanSize``: decimal units, 4 significant digits, no space ("65.54kB", "107.4GB")."""
    size = float(n)
    unit = 0
    while size >= 1000.0 and unit < len(_DECIMAL_ABBRS) - 1:
        size /= 1000.0
        unit += 1
    if math.isnan(size):
        number = "NaN"
    elif math.isinf(size):
        number = "+Inf" if size > 0 else "-Inf"
    else:
        number = f"{size:.4g}"
    return number + _DECIMAL_ABBRS[unit]


# -- dm.* options -----------------------------------------------------------------------------------

_DIRECT_LVM_KEYS: Final = frozenset(
    {"dm.directlvm_device", "dm.directlvm_device_force", "dm.thinp_percent", "dm.thinp_metapercent"}
)
_DEFERRED_DELETION_NEEDS_REMOVAL: Final = (
    "devmapper: Deferred deletion can not be enabled as deferred removal is not enabled. "
    "Enable deferred removal using --storage-opt dm.use_deferred_removal=true parameter"
)


@dataclasses.dataclass
class DmOptions:
    """The driver's settings; defaults are Docker's except where the module docstring says."""

    loopdatasize: int = 100 * GiB  # sparse data file (loopback mode)
    loopmetadatasize: int = 2 * GiB  # sparse metadata file (loopback mode)
    basesize: int = 10 * GiB  # virtual size of the base device, so of every image
    basesize_given: bool = False  # dm.basesize was set: grow the base device if it is smaller
    blocksize: int = 64 * KiB  # pool data block size in bytes
    fs: str = "ext4"
    fs_given: bool = False  # dm.fs was set: warn if the base device already has another filesystem
    mkfsarg: list[str] = dataclasses.field(default_factory=list)
    mountopt: list[str] = dataclasses.field(default_factory=list)  # each dm.mountopt value; see mount_options
    datadev: str | None = None
    metadatadev: str | None = None
    thinpooldev: str | None = None  # a pool's dm name, "/dev/mapper/" stripped
    blkdiscard: bool = True
    use_deferred_removal: bool = True
    use_deferred_deletion: bool = True
    min_free_space: int = 10  # percent of data and of metadata blocks kept free; 0 = no check
    thinp_autoextend_threshold: int = 80  # percent of data used that grows the pool; 100 = never
    thinp_autoextend_percent: int = 20  # growth in percent of the current size
    xfs_nospace_max_retries: str | None = None  # written to xfs's error/metadata/ENOSPC/max_retries
    libdm_log_level: int = LOG_LEVEL_FATAL
    override_udev_sync_check: bool = False  # accepted for compatibility; there is no udev here

    @classmethod
    def parse(cls, opts: Iterable[str]) -> DmOptions:
        """Options from ``dm.key=value`` strings, applied in order (Docker's ``NewDeviceSet`` loop)."""
        options = cls()
        given: set[str] = set()
        for opt in opts:
            key, value = _split_key_value(opt)
            key = key.lower()
            setter = _SETTERS.get(key)
            if setter is None:
                if key in _DIRECT_LVM_KEYS:
                    raise OptionError(
                        f"devmapper: {key} is not supported here: direct-lvm setup needs LVM, which this "
                        "implementation does not use; give dm.thinpooldev, dm.datadev and dm.metadatadev, "
                        "or no device at all for sparse files"
                    )
                raise OptionError(f"devmapper: Unknown option {key}")
            setter(options, value)
            given.add(key)
        options._apply_implied_defaults(given)
        options.validate()
        return options

    def _apply_implied_defaults(self, given: set[str]) -> None:
        self.basesize_given = "dm.basesize" in given
        self.fs_given = "dm.fs" in given
        # Docker: by default, don't do the blkdiscard hack on raw devices; it is rarely useful and expensive.
        if "dm.blkdiscard" not in given and (self.datadev or self.thinpooldev):
            self.blkdiscard = False
        if "dm.use_deferred_deletion" not in given and not self.use_deferred_removal:
            self.use_deferred_deletion = False

    def validate(self) -> None:
        """Check the rules that tie values together or bound them (also run on ``from_json``)."""
        if self.fs not in ("ext4", "xfs"):
            raise OptionError(f"devmapper: Unsupported filesystem {self.fs}")
        if self.blocksize % _MIN_BLOCK_SIZE or not _MIN_BLOCK_SIZE <= self.blocksize <= _MAX_BLOCK_SIZE:
            raise OptionError(
                f"devmapper: Invalid value {self.blocksize} for option dm.blocksize: the pool block size "
                "must be a multiple of 64 KiB from 64 KiB to 1 GiB"
            )
        if not 0 <= self.min_free_space < 100:
            raise OptionError(f"devmapper: Invalid value {self.min_free_space}% for option dm.min_free_space")
        for name in ("thinp_autoextend_threshold", "thinp_autoextend_percent"):
            if not 0 < getattr(self, name) <= 100:
                raise OptionError(f"dm.{name} must be greater than 0 and less than 100")
        if not LOG_LEVEL_FATAL <= self.libdm_log_level <= LOG_LEVEL_DEBUG:
            raise OptionError(f"dm.libdm_log_level must be in range [{LOG_LEVEL_FATAL},{LOG_LEVEL_DEBUG}]")
        if self.use_deferred_deletion and not self.use_deferred_removal:
            raise OptionError(_DEFERRED_DELETION_NEEDS_REMOVAL)

    @property
    def mount_options(self) -> str:
        """The dm.mountopt values joined with commas, empty ones skipped (Docker's joinMountOptions)."""
        return ",".join(v for v in self.mountopt if v)

    @property
    def blocksize_sectors(self) -> int:
        """The pool block size in 512-byte sectors, as the pool table takes it."""
        return self.blocksize >> 9

    @property
    def loopback(self) -> bool:
        """True when the pool lives on sparse files in ``<home>/devicemapper`` (no device given)."""
        return self.thinpooldev is None and self.datadev is None

    def to_json(self) -> dict[str, Any]:
        """Every field, as plain JSON values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DmOptions:
        """Options saved by ``to_json``; missing keys take defaults, unknown keys are ignored."""
        if not isinstance(data, Mapping):
            raise OptionError(f"saved options: expected a JSON object, got {type(data).__name__}")
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in data:
                values[field.name] = _checked_json_value(field.name, str(field.type), data[field.name])
        for key in data:
            if key not in values:
                log.debug("saved options: ignoring unknown key %r", key)
        options = cls(**values)
        options.validate()
        return options


def _checked_json_value(name: str, annotation: str, value: Any) -> Any:
    """``value`` if it fits the field's annotation; list values are copied."""
    ok: bool
    if annotation == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation == "bool":
        ok = isinstance(value, bool)
    elif annotation == "str":
        ok = isinstance(value, str)
    elif annotation == "str | None":
        ok = value is None or isinstance(value, str)
    elif annotation == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = list(value) if ok else value
    else:  # pragma: no cover - a new field type needs a branch above
        raise AssertionError(f"no JSON check for {annotation}")
    if not ok:
        raise OptionError(f"saved options: {name} must be {annotation}, not {value!r}")
    return value


def _split_key_value(opt: str) -> tuple[str, str]:
    """Docker's ``parsers.ParseKeyValueOpt``: split at the first "=", trim both sides."""
    key, sep, value = opt.partition("=")
    if not sep:
        raise OptionError(f"unable to parse key/value option: {opt}")
    return key.strip(_GO_SPACE), value.strip(_GO_SPACE)


# -- one setter per key: (options, value) -> None -------------------------------------------------


def _set_size(name: str) -> Callable[[DmOptions, str], None]:
    def setter(options: DmOptions, value: str) -> None:
        setattr(options, name, ram_in_bytes(value))

    return setter


def _set_bool(name: str) -> Callable[[DmOptions, str], None]:
    def setter(options: DmOptions, value: str) -> None:
        setattr(options, name, parse_bool(value))

    return setter


def _set_device(name: str) -> Callable[[DmOptions, str], None]:
    def setter(options: DmOptions, value: str) -> None:
        setattr(options, name, value or None)  # Docker treats an empty value as not given

    return setter


def _set_fs(options: DmOptions, value: str) -> None:
    if value not in ("ext4", "xfs"):
        raise OptionError(f"devmapper: Unsupported filesystem {value}")
    options.fs = value


def _set_thinpooldev(options: DmOptions, value: str) -> None:
    options.thinpooldev = value.removeprefix("/dev/mapper/") or None


def _set_blocksize(options: DmOptions, value: str) -> None:
    size = ram_in_bytes(value)
    if size % _MIN_BLOCK_SIZE or not _MIN_BLOCK_SIZE <= size <= _MAX_BLOCK_SIZE:
        raise OptionError(
            f"devmapper: Invalid value {value} for option dm.blocksize: the pool block size "
            "must be a multiple of 64 KiB from 64 KiB to 1 GiB"
        )
    options.blocksize = size


def _set_min_free_space(options: DmOptions, value: str) -> None:
    if not value.endswith("%"):
        raise OptionError("devmapper: Option dm.min_free_space requires % suffix")
    percent = _parse_uint(value[:-1], 32)
    if percent >= 100:
        raise OptionError(f"devmapper: Invalid value {value} for option dm.min_free_space")
    options.min_free_space = percent


def _set_autoextend(name: str, default: int) -> Callable[[DmOptions, str], None]:
    def setter(options: DmOptions, value: str) -> None:
        try:
            percent = _parse_uint(value.removesuffix("%"), 32)
        except OptionError as e:
            raise OptionError(f"could not parse `dm.{name}={value}`: {e}") from None
        if percent > 100:
            raise OptionError(f"dm.{name} must be greater than 0 and less than 100")
        setattr(options, name, percent or default)  # Docker: 0 means the default

    return setter


def _set_xfs_nospace_max_retries(options: DmOptions, value: str) -> None:
    _parse_uint(value, 64)
    options.xfs_nospace_max_retries = value


def _set_libdm_log_level(options: DmOptions, value: str) -> None:
    try:
        level = _parse_int(value, 32)
    except OptionError as e:
        raise OptionError(f"could not parse `dm.libdm_log_level={value}`: {e}") from None
    if not LOG_LEVEL_FATAL <= level <= LOG_LEVEL_DEBUG:
        raise OptionError(f"dm.libdm_log_level must be in range [{LOG_LEVEL_FATAL},{LOG_LEVEL_DEBUG}]")
    options.libdm_log_level = level


_SETTERS: Final[dict[str, Callable[[DmOptions, str], None]]] = {
    "dm.basesize": _set_size("basesize"),
    "dm.loopdatasize": _set_size("loopdatasize"),
    "dm.loopmetadatasize": _set_size("loopmetadatasize"),
    "dm.fs": _set_fs,
    "dm.mkfsarg": lambda options, value: options.mkfsarg.append(value),
    "dm.mountopt": lambda options, value: options.mountopt.append(value),
    "dm.metadatadev": _set_device("metadatadev"),
    "dm.datadev": _set_device("datadev"),
    "dm.thinpooldev": _set_thinpooldev,
    "dm.blkdiscard": _set_bool("blkdiscard"),
    "dm.blocksize": _set_blocksize,
    "dm.override_udev_sync_check": _set_bool("override_udev_sync_check"),
    "dm.use_deferred_removal": _set_bool("use_deferred_removal"),
    "dm.use_deferred_deletion": _set_bool("use_deferred_deletion"),
    "dm.min_free_space": _set_min_free_space,
    "dm.xfs_nospace_max_retries": _set_xfs_nospace_max_retries,
    "dm.thinp_autoextend_threshold": _set_autoextend("thinp_autoextend_threshold", 80),
    "dm.thinp_autoextend_percent": _set_autoextend("thinp_autoextend_percent", 20),
    "dm.libdm_log_level": _set_libdm_log_level,
}


# -- per-container option ---------------------------------------------------------------------------


def parse_container_size(opts: Mapping[str, str], parent_size: int) -> int:
    """Size of a new container device from ``--storage-opt`` (Docker's ``parseStorageOpt``).

    Only ``size`` (any case) is known.  A missing or zero size means the parent's size; a smaller one
    is refused.  Every key is checked, so the answer does not depend on the mapping's order.
    """
    size = 0
    for key, value in opts.items():
        if key.lower() != "size":
            raise OptionError(f"Unknown option {key.lower()}")
        size = ram_in_bytes(value)
    if size == 0:
        return parent_size
    if size < parent_size:
        raise OptionError(f"devmapper: Container size cannot be smaller than {human_size(parent_size)}")
    return size
