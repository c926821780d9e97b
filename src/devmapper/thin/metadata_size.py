"""thin_metadata_size 0.9.0, quirks included: argument parsing, the estimate, the output text.

The estimate (``thin_metadata_size.cc``) counts 4 KiB metadata blocks as

    blocks = 1 + (2 * pool_sectors) // block_sectors // 252 + max_thins

in 64-bit unsigned arithmetic (wrapping), converts that to a C double, multiplies by 4096 and
divides by the output unit's factor.  A whole result is printed as ``%llu`` (a result of 2**64 or
more, or infinity from a unit whose factor wrapped to 0, prints as 0, as the x86-64 conversion
does); otherwise ``%0.2e`` when the fraction is below 0.01, else ``%0.2f``.

Sizes are ``<digits>[unit]``.  Units are one character of ``bskKmMgGtTpPeEzZyY`` or a prefix of at
least two characters of a unit name (``ki`` = kibibytes); lower case is binary, upper case decimal;
factors are 64-bit and wrap (``z`` and ``y`` become 0).  Digits saturate like ``atoll``.  Block and
pool sizes are converted to sectors (rounding down); ``--max-thins`` is a count, so a unit multiplies
it by the unit's bytes.  The summary line echoes each size as its digits followed by the full unit
name; a size given without unit is echoed with the *current output unit's* name (so ``-u m -b 128``
echoes ``128mebibytes``) except ``--max-thins``, which is echoed bare.

Options are processed strictly in order as getopt_long would deliver them (``b:s:m:u:n::hV``, long
options by any unambiguous prefix, non-options ignored, ``--`` ends options): the first error wins,
``-h`` and ``-V`` act when reached.  Nothing here prints or exits: ``parse_metadata_size_args``
returns options or raises ``MetadataSizeError`` (whose ``render`` gives the exact stderr line) and
``format_metadata_size`` returns the exact stdout text.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterator, Sequence

from devmapper.errors import ToolError

PROG = "thin_metadata_size"
TOOLS_VERSION = "0.9.0"

_U64 = (1 << 64) - 1
_LLONG_MAX = (1 << 63) - 1
_SECTOR = 512
_MAPPINGS_PER_BLOCK = (4096 - 64) // 16  # 252, as the tool computes it

UNIT_CHARS = "bskKmMgGtTpPeEzZyY"
UNIT_NAMES = (
    "bytes", "sectors",
    "kibibytes", "kilobytes", "mebibytes", "megabytes",
    "gibibytes", "gigabytes", "tebibytes", "terabytes",
    "pebibytes", "petabytes", "ebibytes", "exabytes",
    "zebibytes", "zetabytes", "yobibytes", "yottabytes",
)  # fmt: skip


def _unit_factors() -> tuple[int, ...]:
    factors = [1, 512, 1024, 1000]
    while len(factors) < len(UNIT_NAMES):
        factors += [factors[-2] * 1024 & _U64, factors[-1] * 1000 & _U64]
    return tuple(factors)


UNIT_FACTORS = _unit_factors()
_SECTORS = UNIT_NAMES.index("sectors")


class Action(enum.Enum):
    ESTIMATE = "estimate"
    HELP = "help"
    VERSION = "version"


class Numeric(enum.IntEnum):
    """``-n``: none (full sentence), bare number, number + unit char, number + unit name."""

    NO_NUMBER = 0
    NUMBER = 1
    SHORT = 2
    LONG = 3


class MetadataSizeError(ToolError):
    """A usage error.  ``getopt`` errors print as ``argv0: msg``; the tool's own as ``prog - msg``."""

    def __init__(self, message: str, *, from_getopt: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.from_getopt = from_getopt

    def render(self, argv0: str = f"/usr/sbin/{PROG}", prog: str = PROG) -> str:
        """The exact line the real tool writes to stderr (it then exits with status 1)."""
        return f"{argv0}: {self.message}\n" if self.from_getopt else f"{prog} - {self.message}\n"


@dataclasses.dataclass(frozen=True, slots=True)
class MetadataSizeOptions:
    action: Action = Action.ESTIMATE
    block_sectors: int = 0
    pool_sectors: int = 0
    max_thins: int = 0
    unit_idx: int = _SECTORS
    numeric: Numeric = Numeric.NO_NUMBER
    block_text: str = ""  # as echoed in the summary line
    pool_text: str = ""
    max_thins_text: str = ""


def unit_index(spec: str) -> int:
    """Index into UNIT_NAMES for a unit character or name prefix; -1 if none matches."""
    if len(spec) == 1:
        return UNIT_CHARS.find(spec)
    return next((i for i, name in enumerate(UNIT_NAMES) if name.startswith(spec)), -1)


def _to_size(arg: str, unit_idx: int, *, count: bool) -> tuple[int, str]:
    """(value, echo text) for a size argument, as the tool's ``to_bytes`` + ``check_size``."""
    digits = arg[: len(arg) - len(arg.lstrip("0123456789"))]
    suffix = arg[len(digits) :]
    idx = unit_index(suffix) if suffix else _SECTORS
    if idx < 0:
        raise MetadataSizeError("Invalid unit specifier!")
    significant = digits.lstrip("0")
    raw = _LLONG_MAX if len(significant) > 19 else min(int(significant or "0"), _LLONG_MAX)  # atoll saturates
    value = raw * UNIT_FACTORS[idx] & _U64
    if not suffix or not count:
        value //= _SECTOR
    if suffix:
        return value, digits + UNIT_NAMES[idx]
    return value, digits if count else digits + UNIT_NAMES[unit_idx]


def estimate_blocks(opts: MetadataSizeOptions) -> int:
    """``2 * pool / block / 252 + max_thins`` in 64-bit wrapping arithmetic (the tool adds the 1 in double)."""
    per_tree = (2 * opts.pool_sectors & _U64) // opts.block_sectors // _MAPPINGS_PER_BLOCK
    return per_tree + opts.max_thins & _U64


def estimate(opts: MetadataSizeOptions) -> float:
    """The estimate in the output unit, as the tool's double arithmetic computes it."""
    r = (1.0 + float(estimate_blocks(opts))) * float(8 * _SECTOR)
    factor = float(UNIT_FACTORS[opts.unit_idx])
    return r / factor if factor else math.inf


def format_number(r: float) -> str:
    """``print_precision``'s number: %llu for whole values, else %0.2e / %0.2f."""
    if math.isinf(r) or r == math.floor(r):
        return str(int(r)) if r < 2.0**64 else "0"
    return ("%0.2e" if r - math.floor(r) < 1e-2 else "%0.2f") % r


def format_metadata_size(opts: MetadataSizeOptions, prog: str = PROG) -> str:
    """The exact stdout text of the real tool for these options (help, version or estimate)."""
    if opts.action is Action.HELP:
        return help_text(prog)
    if opts.action is Action.VERSION:
        return TOOLS_VERSION + "\n"
    number = format_number(estimate(opts))
    name = UNIT_NAMES[opts.unit_idx]
    if opts.numeric is Numeric.NO_NUMBER:
        return (
            f"{prog} - {number} {name} estimated metadata area size for "
            f'"--block-size={opts.block_text} --pool-size={opts.pool_text} --max-thins={opts.max_thins_text}"\n'
        )
    suffix = {Numeric.NUMBER: "", Numeric.SHORT: UNIT_CHARS[opts.unit_idx], Numeric.LONG: name}[opts.numeric]
    return f"{number}{suffix}\n"


def help_text(prog: str = PROG) -> str:
    def line(short: str, long: str, text: str, units: str = "") -> str:
        return f"\t{short:<4}{long + units:<44}{text}\n"

    opt, req = f"[{UNIT_CHARS}]", f"{{{UNIT_CHARS}}}"
    return (
        f"Thin Provisioning Metadata Device Size Calculator.\nUsage: {prog} [options]\n"
        + line("-b", "--block-size BLOCKSIZE", "Block size of thin provisioned devices.", opt)
        + line("-s", "--pool-size SIZE", "Size of pool device.", opt)
        + line("-m", "--max-thins #MAXTHINS", "Maximum sum of all thin devices and snapshots.", opt)
        + line("-u", "--unit ", "Output unit specifier.", req)
        + line("-n", "--numeric-only [short|long]",
               "Output numeric value only (optionally with short/long unit identifier).")
        + line("-h", "--help", "This help.")
        + line("-V", "--version", "Print thin provisioning tools version.")
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Argument parsing: a getopt_long("b:s:m:u:n::hV") emulation feeding the tool's option handlers.

_LONG = {  # name -> (short option, argument: "required" | "optional" | "none")
    "block-size": ("b", "required"),
    "pool-size": ("s", "required"),
    "max-thins": ("m", "required"),
    "unit": ("u", "required"),
    "numeric-only": ("n", "optional"),
    "help": ("h", "none"),
    "version": ("V", "none"),
}
_SHORT_ARG = {"b": "required", "s": "required", "m": "required", "u": "required", "n": "optional"}


class _Getopt:
    """Yields (option char, argument) in order, as getopt_long returns them; errors as getopt's.

    A generator, so an error in a later argument surfaces only after the earlier options have
    been acted on (``-hx`` prints help; ``-xh`` fails), as in the real tool.
    """

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.i = 0

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        while self.i < len(self.argv):
            arg = self.argv[self.i]
            self.i += 1
            if arg == "--":
                return
            if arg.startswith("--"):
                yield self._long(arg[2:])
            elif arg.startswith("-") and arg != "-":
                yield from self._short(arg[1:])

    def _take(self) -> str | None:
        """The next argv element as a separate option argument (getopt takes it whatever it is)."""
        if self.i >= len(self.argv):
            return None
        self.i += 1
        return self.argv[self.i - 1]

    def _long(self, body: str) -> tuple[str, str | None]:
        name, eq, value = body.partition("=")
        matches = [n for n in _LONG if n == name] or [n for n in _LONG if n.startswith(name)]
        if not matches:
            raise MetadataSizeError(f"unrecognized option '--{body}'", from_getopt=True)
        if len(matches) > 1:
            listing = " ".join(f"'--{n}'" for n in matches)
            raise MetadataSizeError(f"option '--{body}' is ambiguous; possibilities: {listing}", from_getopt=True)
        full = matches[0]
        char, kind = _LONG[full]
        if kind == "none" and eq:
            raise MetadataSizeError(f"option '--{full}' doesn't allow an argument", from_getopt=True)
        if kind == "required" and not eq:
            taken = self._take()
            if taken is None:
                raise MetadataSizeError(f"option '--{full}' requires an argument", from_getopt=True)
            return char, taken
        return char, value if eq else None

    def _short(self, cluster: str) -> Iterator[tuple[str, str | None]]:
        for pos, char in enumerate(cluster):
            kind = _SHORT_ARG.get(char) or ("none" if char in "hV" else None)
            if kind is None:
                raise MetadataSizeError(f"invalid option -- '{char}'", from_getopt=True)
            if kind == "none":
                yield char, None
                continue
            rest = cluster[pos + 1 :] or None
            if rest is None and kind == "required":
                rest = self._take()
                if rest is None:
                    raise MetadataSizeError(f"option requires an argument -- '{char}'", from_getopt=True)
            yield char, rest
            return


def _numeric(arg: str | None) -> Numeric:
    if arg is None:
        return Numeric.NUMBER
    if arg and "long".startswith(arg):
        return Numeric.LONG
    if not arg or not "short".startswith(arg):
        raise MetadataSizeError("-n invalid option argument")
    return Numeric.SHORT


def _apply_size(opts: MetadataSizeOptions, char: str, arg: str) -> MetadataSizeOptions:
    if (opts.block_sectors, opts.pool_sectors, opts.max_thins)["bsm".index(char)]:
        raise MetadataSizeError("option already given!")
    value, text = _to_size(arg, opts.unit_idx, count=char == "m")
    if char == "b":
        return dataclasses.replace(opts, block_sectors=value, block_text=text)
    if char == "s":
        return dataclasses.replace(opts, pool_sectors=value, pool_text=text)
    return dataclasses.replace(opts, max_thins=value, max_thins_text=text)


def _apply(opts: MetadataSizeOptions, char: str, arg: str | None) -> MetadataSizeOptions:
    """One option's effect, as the tool's check_size / check_unit / check_numeric_option."""
    if char in "bsm":
        return _apply_size(opts, char, arg or "")
    if char == "u":
        idx = unit_index(arg or "")
        if idx < 0:
            raise MetadataSizeError("output unit specifier invalid!")
        return dataclasses.replace(opts, unit_idx=idx)
    if opts.numeric is not Numeric.NO_NUMBER:
        raise MetadataSizeError("-n already given!")
    return dataclasses.replace(opts, numeric=_numeric(arg))


def _check(opts: MetadataSizeOptions) -> None:
    if not opts.block_sectors:
        raise MetadataSizeError("block size required!")
    if not opts.pool_sectors:
        raise MetadataSizeError("pool size required!")
    if not opts.max_thins:
        raise MetadataSizeError("max thins required!")
    if opts.block_sectors & (opts.block_sectors - 1):
        raise MetadataSizeError("block size must be 2^^N")
    if opts.pool_sectors <= opts.block_sectors:
        raise MetadataSizeError("pool size must be larger than block size")


def parse_metadata_size_args(argv: Sequence[str]) -> MetadataSizeOptions:
    """Parse the arguments (without the program name); raises MetadataSizeError on a usage error."""
    opts = MetadataSizeOptions()
    for char, arg in _Getopt(argv):
        if char == "h":
            return dataclasses.replace(opts, action=Action.HELP)
        if char == "V":
            return dataclasses.replace(opts, action=Action.VERSION)
        opts = _apply(opts, char, arg)
    _check(opts)
    return opts
