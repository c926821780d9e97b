"""thin_dump's XML and human-readable formats: two writers and one streaming reader.

Writers are ``MetadataVisitor`` s that print exactly what thin-provisioning-tools 0.9.0 prints
(``xml_format.cc`` and ``human_readable_format.cc``, fed by ``metadata_dumper.cc``):

* XML: ``<superblock>`` at column 0, ``<device>`` indented 2 spaces, mappings 4; every element is one
  ``\\n``-terminated line, so the text ends with ``</superblock>\\n``.  ``flags`` and ``version`` are
  always printed; ``metadata_snap`` only when the ``SuperblockInfo`` carries one (thin_dump's reader
  never passes it, so thin_dump never prints it, even when the superblock holds a snapshot).
* human readable: ``begin superblock: "uuid", time, transaction, flags, version, data_block_size,
  nr_data_blocks[, metadata_snap]``, five ``key: value`` lines per device, a blank line closing each
  device, ``    (o..o+n-1) -> (d..d+n-1), time`` or ``    o -> d, time``, then ``end superblock``.

Mappings are merged as thin_dump's ``mapping_emit_visitor`` merges them: a mapping joins the pending
run iff its origin and data block both continue the run and its time is equal; runs of length 1 are
printed as single mappings.  Writers accept runs of any length and re-merge them, so the same text
comes out whether the runs arrive maximal (from our metadata reader) or split (from a parsed file).
Zero-length runs carry no mapping and are ignored.

The reader (``parse_xml``) drives a visitor from a file with bounded memory: pyexpat (the parser
thin_restore uses) is fed fixed-size chunks and calls back per element.  It accepts what
thin_restore 0.9.0 accepts: numbers are boost ``lexical_cast`` s (ASCII decimal, optional sign, a
leading ``-`` wrapping modulo the type's width, no spaces, overflow rejected), unknown attributes
are ignored, ``flags`` (default 0), ``version`` (default 1) and ``metadata_snap`` are optional, and
character data is ignored.  It is stricter in one respect: elements must nest as
superblock > device > mapping (thin_restore misbehaves on other nestings instead of failing cleanly).
Every error is an ``XmlFormatError`` naming the input line.  Errors raised by the visitor pass through
unchanged, with a note naming the line being processed.
"""

from __future__ import annotations

import abc
import os
import re
from collections.abc import Callable
from typing import BinaryIO, TextIO
from xml.parsers import expat

from devmapper.errors import MetadataError
from devmapper.thin.ir import DeviceInfo, MetadataVisitor, Run, SuperblockInfo

__all__ = ["HumanReadableWriter", "XmlFormatError", "XmlWriter", "parse_xml"]

_CHUNK = 1 << 20


class XmlFormatError(MetadataError):
    """The XML is malformed or is not a pool description thin_restore would accept."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"XML line {line}: {message}")
        self.line = line
        self.message = message


# --------------------------------------------------------------------------------------------------
# Writers


class _RunMerger(abc.ABC):
    """Run merging shared by both writers (mirrors ``mapping_emit_visitor`` in metadata_dumper.cc)."""

    def __init__(self) -> None:
        self._origin = self._data = self._length = self._time = 0

    def map(self, run: Run) -> None:
        if run.length == 0:
            return
        length = self._length
        if (
            length
            and run.origin_begin == self._origin + length
            and run.data_begin == self._data + length
            and run.time == self._time
        ):
            self._length = length + run.length
            return
        self._flush_run()
        self._origin, self._data, self._length, self._time = run.origin_begin, run.data_begin, run.length, run.time

    def _flush_run(self) -> None:
        if self._length == 1:
            self._single(self._origin, self._data, self._time)
        elif self._length:
            self._range(self._origin, self._data, self._length, self._time)
        self._length = 0

    @abc.abstractmethod
    def _single(self, origin: int, data: int, time: int) -> None:
        """Emit one single mapping."""

    @abc.abstractmethod
    def _range(self, origin: int, data: int, length: int, time: int) -> None:
        """Emit one range mapping of length >= 2."""


def _xml_attr(text: str) -> str:
    """Escape an attribute value (thin_dump prints the uuid raw, but always prints it empty)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


class XmlWriter(_RunMerger):
    """MetadataVisitor printing thin_dump 0.9.0's XML to ``out``."""

    def __init__(self, out: TextIO) -> None:
        super().__init__()
        self.out = out

    def superblock_b(self, sb: SuperblockInfo) -> None:
        snap = "" if sb.metadata_snap is None else f' metadata_snap="{sb.metadata_snap}"'
        self.out.write(
            f'<superblock uuid="{_xml_attr(sb.uuid)}" time="{sb.time}" transaction="{sb.transaction}"'
            f' flags="{sb.flags}" version="{sb.version}" data_block_size="{sb.data_block_size}"'
            f' nr_data_blocks="{sb.nr_data_blocks}"{snap}>\n'
        )

    def superblock_e(self) -> None:
        self._flush_run()
        self.out.write("</superblock>\n")

    def device_b(self, dev: DeviceInfo) -> None:
        self._flush_run()
        self.out.write(
            f'  <device dev_id="{dev.dev_id}" mapped_blocks="{dev.mapped_blocks}"'
            f' transaction="{dev.transaction}" creation_time="{dev.creation_time}"'
            f' snap_time="{dev.snap_time}">\n'
        )

    def device_e(self) -> None:
        self._flush_run()
        self.out.write("  </device>\n")

    def _single(self, origin: int, data: int, time: int) -> None:
        self.out.write(f'    <single_mapping origin_block="{origin}" data_block="{data}" time="{time}"/>\n')

    def _range(self, origin: int, data: int, length: int, time: int) -> None:
        self.out.write(
            f'    <range_mapping origin_begin="{origin}" data_begin="{data}" length="{length}" time="{time}"/>\n'
        )

    def eof(self) -> None:
        self._flush_run()
        self.out.flush()


class HumanReadableWriter(_RunMerger):
    """MetadataVisitor printing ``thin_dump -f human_readable`` 0.9.0 output to ``out``."""

    def __init__(self, out: TextIO) -> None:
        super().__init__()
        self.out = out

    def superblock_b(self, sb: SuperblockInfo) -> None:
        snap = "" if sb.metadata_snap is None else f", {sb.metadata_snap}"
        self.out.write(
            f'begin superblock: "{sb.uuid}", {sb.time}, {sb.transaction}, {sb.flags}, {sb.version},'
            f" {sb.data_block_size}, {sb.nr_data_blocks}{snap}\n"
        )

    def superblock_e(self) -> None:
        self._flush_run()
        self.out.write("end superblock\n")

    def device_b(self, dev: DeviceInfo) -> None:
        self._flush_run()
        self.out.write(
            f"device: {dev.dev_id}\nmapped_blocks: {dev.mapped_blocks}\ntransaction: {dev.transaction}\n"
            f"creation time: {dev.creation_time}\nsnap time: {dev.snap_time}\n"
        )

    def device_e(self) -> None:
        self._flush_run()
        self.out.write("\n")

    def _single(self, origin: int, data: int, time: int) -> None:
        self.out.write(f"    {origin} -> {data}, {time}\n")

    def _range(self, origin: int, data: int, length: int, time: int) -> None:
        self.out.write(f"    ({origin}..{origin + length - 1}) -> ({data}..{data + length - 1}), {time}\n")

    def eof(self) -> None:
        self._flush_run()
        self.out.flush()


# --------------------------------------------------------------------------------------------------
# Reader

_NUMBER = re.compile(r"([+-]?)([0-9]+)", re.ASCII)

# Each element and the element it must sit in (None: it must be the document element).
_PARENT: dict[str, str | None] = {
    "superblock": None,
    "device": "superblock",
    "range_mapping": "device",
    "single_mapping": "device",
}


class _Attrs:
    """Typed access to one element's attributes, as xml_utils' get_attr / get_opt_attr."""

    __slots__ = ("attrs", "parser", "tag")

    def __init__(self, tag: str, attrs: dict[str, str], parser: expat.XMLParserType) -> None:
        self.tag, self.attrs, self.parser = tag, attrs, parser

    def error(self, message: str) -> XmlFormatError:
        return XmlFormatError(self.parser.CurrentLineNumber, f"<{self.tag}>: {message}")

    def text(self, key: str) -> str:
        value = self.attrs.get(key)
        if value is None:
            raise self.error(f"could not find attribute: {key}")
        return value

    def uint(self, key: str, bits: int) -> int:
        value = self.attrs.get(key)
        if value is not None and len(value) < 20 and value.isdigit() and value.isascii():  # the common case
            number = int(value)
            if not number >> bits:
                return number
        return self._cast(key, self.text(key), bits)

    def opt_uint(self, key: str, bits: int) -> int | None:
        return None if key not in self.attrs else self.uint(key, bits)

    def _cast(self, key: str, value: str, bits: int) -> int:
        """boost::lexical_cast<uint{bits}_t>: ``-n`` is accepted and wraps, like strtoull."""
        match = _NUMBER.fullmatch(value)
        digits = "" if match is None else match[2].lstrip("0") or "0"
        if match is None or len(digits) > 20 or int(digits) >> bits:  # (int() refuses > 4300 digits)
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise self.error(f"attribute {key}={shown!r} is not a {bits}-bit unsigned integer")
        number = int(digits)
        return (-number) & ((1 << bits) - 1) if match[1] == "-" else number


class _XmlReader:
    """Turns pyexpat element events into visitor events, checking nesting and attributes."""

    def __init__(self, visitor: MetadataVisitor) -> None:
        self.visitor = visitor
        self.stack: list[str] = []
        self.parser = expat.ParserCreate()
        self.parser.StartElementHandler = self._start
        self.parser.EndElementHandler = self._end
        self._starts: dict[str, Callable[[_Attrs], None]] = {
            "superblock": self._superblock,
            "device": self._device,
            "range_mapping": self._range_mapping,
            "single_mapping": self._single_mapping,
        }

    def feed(self, data: str | bytes, final: bool = False) -> None:
        try:
            self.parser.Parse(data, final)
        except expat.ExpatError as e:
            raise XmlFormatError(e.lineno, expat.ErrorString(e.code) or "malformed XML") from None
        except Exception as e:
            if not isinstance(e, XmlFormatError):
                e.add_note(f"while processing XML line {self.parser.CurrentLineNumber}")
            raise

    def _start(self, tag: str, attrs: dict[str, str]) -> None:
        stack = self.stack
        parent = stack[-1] if stack else None
        if _PARENT.get(tag, "") != parent:
            self._misplaced(tag, parent)
        stack.append(tag)
        self._starts[tag](_Attrs(tag, attrs, self.parser))

    def _misplaced(self, tag: str, parent: str | None) -> None:
        line = self.parser.CurrentLineNumber
        if tag not in _PARENT:
            raise XmlFormatError(line, f"unknown tag type <{tag}>")
        where = "as the document element" if parent is None else f"inside <{parent}>"
        raise XmlFormatError(line, f"<{tag}> is not allowed {where}")

    def _end(self, tag: str) -> None:
        self.stack.pop()
        if tag == "superblock":
            self.visitor.superblock_e()
        elif tag == "device":
            self.visitor.device_e()

    def _superblock(self, a: _Attrs) -> None:
        flags, version = a.opt_uint("flags", 32), a.opt_uint("version", 32)
        self.visitor.superblock_b(
            SuperblockInfo(
                uuid=a.text("uuid"),
                time=a.uint("time", 64),
                transaction=a.uint("transaction", 64),
                flags=0 if flags is None else flags,
                version=1 if version is None else version,
                data_block_size=a.uint("data_block_size", 32),
                nr_data_blocks=a.uint("nr_data_blocks", 64),
                metadata_snap=a.opt_uint("metadata_snap", 64),
            )
        )

    def _device(self, a: _Attrs) -> None:
        self.visitor.device_b(
            DeviceInfo(
                dev_id=a.uint("dev_id", 32),
                mapped_blocks=a.uint("mapped_blocks", 64),
                transaction=a.uint("transaction", 64),
                creation_time=a.uint("creation_time", 64),
                snap_time=a.uint("snap_time", 64),
            )
        )

    def _range_mapping(self, a: _Attrs) -> None:
        run = Run(a.uint("origin_begin", 64), a.uint("data_begin", 64), a.uint("length", 64), a.uint("time", 32))
        if run.length:
            self.visitor.map(run)

    def _single_mapping(self, a: _Attrs) -> None:
        self.visitor.map(Run(a.uint("origin_block", 64), a.uint("data_block", 64), 1, a.uint("time", 32)))


def parse_xml(
    source: TextIO | BinaryIO | str | os.PathLike[str], visitor: MetadataVisitor, *, chunk_size: int = _CHUNK
) -> None:
    """Drive ``visitor`` from the XML in ``source`` (a path, or a binary or text stream).

    Reads ``chunk_size`` at a time, so memory stays bounded whatever the number of mappings.  Events
    reach the visitor as elements are read: on an error (``XmlFormatError``) the visitor has already
    seen everything before the bad line.  ``visitor.eof()`` is called only after a complete document.
    """
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            _parse_stream(f, visitor, chunk_size)
    else:
        _parse_stream(source, visitor, chunk_size)


def _parse_stream(stream: TextIO | BinaryIO, visitor: MetadataVisitor, chunk_size: int) -> None:
    reader = _XmlReader(visitor)
    chunk: str | bytes = stream.read(chunk_size)
    while chunk:
        reader.feed(chunk)
        chunk = stream.read(chunk_size)
    reader.feed(chunk, final=True)
    visitor.eof()
