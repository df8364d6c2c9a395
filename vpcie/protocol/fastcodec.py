"""Fast codecs derived from construct definitions (STYLE.md habit 7).

construct is the single source of truth for every wire format, but parsing a
small record with it costs ~11 µs. The hot paths use codecs that this module
*derives* from the same construct ``Struct`` objects: field order, sizes and
endianness are read off the definitions, never written twice. Differential
tests (tests/unit/test_protocol_fast.py) prove the derived codec and construct
agree on random and hostile inputs, errors included.

Supported members of a derivable ``Struct`` (all the formats in vpcie use only
these):

* runs of fixed-size ``FormatField`` (Int8ul .. Int64ul, Float32l, Float64l),
  merged into one ``struct.Struct``;
* ``Bytes(n)`` with a constant ``n``;
* ``PascalString(FormatField, encoding)``;
* ``Prefixed(FormatField, GreedyBytes)``;
* ``Array(this.<earlier field>, <derivable Struct of fixed fields>)``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import construct as c

from vpcie.errors import ProtocolError

Decoded = tuple[Any, ...]


@dataclass(frozen=True)
class _Fixed:
    names: tuple[str, ...]
    st: struct.Struct


@dataclass(frozen=True)
class _Str:
    name: str
    length: struct.Struct
    encoding: str | None  # None: raw bytes (Prefixed GreedyBytes)


@dataclass(frozen=True)
class _Arr:
    name: str
    count_field: str
    item: FastStruct


_Step = _Fixed | _Str | _Arr


def _format_of(sub: c.Construct) -> str | None:
    """struct format character(s) for a fixed-size leaf, or None."""
    if isinstance(sub, c.FormatField):
        fmt: str = sub.fmtstr
        if fmt[0] != "<" and fmt[1:] not in ("B", "b"):
            raise TypeError(f"field {fmt!r} is not little-endian")
        return fmt[1:]
    if isinstance(sub, c.Bytes) and isinstance(sub.length, int):
        return f"{sub.length}s"
    return None


def _name_of_path(expr: Any) -> str:
    text = repr(expr)  # this['name']
    if not (text.startswith("this['") and text.endswith("']")):
        raise TypeError(f"unsupported Array count {text}")
    return text[6:-2]


class FastStruct:
    """A struct codec derived from a construct ``Struct`` of supported members.

    ``decode(buf, pos)`` returns ``(values, new_pos)``; values are in field
    order (strings decoded, arrays as lists of item tuples). ``encode(values)``
    is its inverse. Both raise ProtocolError on truncated or invalid input,
    exactly where construct raises.
    """

    def __init__(self, definition: c.Struct) -> None:
        if not isinstance(definition, c.Struct):
            raise TypeError("FastStruct needs a construct Struct")
        self.definition = definition
        steps: list[_Step] = []
        names: list[str] = []
        fmt_run = ""
        run_names: list[str] = []

        def flush() -> None:
            nonlocal fmt_run, run_names
            if run_names:
                steps.append(_Fixed(tuple(run_names), struct.Struct("<" + fmt_run)))
            fmt_run, run_names = "", []

        for member in definition.subcons:
            if not isinstance(member, c.Renamed) or not member.name:
                raise TypeError(f"unnamed member {member!r}")
            name, sub = member.name, member.subcon
            names.append(name)
            leaf = _format_of(sub)
            if leaf is not None:
                fmt_run += leaf
                run_names.append(name)
                continue
            flush()
            if isinstance(sub, c.StringEncoded) and isinstance(sub.subcon, c.Prefixed):
                steps.append(_Str(name, _length_struct(sub.subcon.lengthfield), sub.encoding))
            elif isinstance(sub, c.Prefixed) and isinstance(sub.subcon, c.GreedyBytes.__class__):
                steps.append(_Str(name, _length_struct(sub.lengthfield), None))
            elif isinstance(sub, c.Array) and isinstance(sub.subcon, c.Struct):
                steps.append(_Arr(name, _name_of_path(sub.count), FastStruct(sub.subcon)))
            else:
                raise TypeError(f"member {name!r} ({type(sub).__name__}) is not derivable")
        flush()
        self.names: tuple[str, ...] = tuple(names)
        self._steps = tuple(steps)
        self.fixed_size: int | None = (
            self._steps[0].st.size
            if len(self._steps) == 1 and isinstance(self._steps[0], _Fixed)
            else (0 if not self._steps else None)
        )
        self._single = (
            self._steps[0].st
            if len(self._steps) == 1 and isinstance(self._steps[0], _Fixed)
            else None
        )

    def fixed_struct(self) -> struct.Struct:
        """The one struct.Struct of an all-fixed-size definition (hot paths)."""
        if self._single is None:
            raise TypeError(f"{self._label()} is not fixed-size")
        return self._single

    # -- decoding ---------------------------------------------------------
    def decode(self, buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[Decoded, int]:
        single = self._single
        if single is not None:
            end = pos + single.size
            if end > len(buf):
                raise ProtocolError(f"truncated {self._label()}: need {single.size} bytes")
            return single.unpack_from(buf, pos), end
        values: list[Any] = []
        for step in self._steps:
            if isinstance(step, _Fixed):
                end = pos + step.st.size
                if end > len(buf):
                    raise ProtocolError(f"truncated {self._label()} at {step.names[0]}")
                values.extend(step.st.unpack_from(buf, pos))
                pos = end
            elif isinstance(step, _Str):
                lend = pos + step.length.size
                if lend > len(buf):
                    raise ProtocolError(f"truncated {self._label()} at {step.name}")
                (n,) = step.length.unpack_from(buf, pos)
                end = lend + n
                if end > len(buf):
                    raise ProtocolError(f"truncated {self._label()}: {step.name} overruns")
                raw = bytes(buf[lend:end])
                if step.encoding is None:
                    values.append(raw)
                else:
                    try:
                        values.append(raw.decode(step.encoding))
                    except UnicodeDecodeError as exc:
                        raise ProtocolError(f"{step.name}: not {step.encoding}") from exc
                pos = end
            else:
                count = values[self.names.index(step.count_field)]
                items = []
                for _ in range(count):
                    item, pos = step.item.decode(buf, pos)
                    items.append(item)
                values.append(items)
        return tuple(values), pos

    # -- encoding ---------------------------------------------------------
    def encode(self, values: Sequence[Any]) -> bytes:
        single = self._single
        if single is not None:
            try:
                return single.pack(*values)
            except (struct.error, OverflowError) as exc:  # OverflowError: f32 out of range
                raise ProtocolError(f"cannot encode {self._label()}: {exc}") from exc
        parts: list[bytes] = []
        i = 0
        for step in self._steps:
            try:
                if isinstance(step, _Fixed):
                    n = len(step.names)
                    parts.append(step.st.pack(*values[i : i + n]))
                    i += n
                elif isinstance(step, _Str):
                    v = values[i]
                    raw = v.encode(step.encoding) if step.encoding is not None else bytes(v)
                    parts.append(step.length.pack(len(raw)))
                    parts.append(raw)
                    i += 1
                else:
                    items = values[i]
                    count = values[self.names.index(step.count_field)]
                    if count != len(items):
                        raise ProtocolError(f"{step.count_field}={count} but {len(items)} items")
                    parts.extend(step.item.encode(it) for it in items)
                    i += 1
            except (struct.error, OverflowError) as exc:  # OverflowError: f32 out of range
                raise ProtocolError(f"cannot encode {self._label()}: {exc}") from exc
        return b"".join(parts)

    def _label(self) -> str:
        return "/".join(self.names[:2]) + ("..." if len(self.names) > 2 else "")


def _length_struct(field: c.Construct) -> struct.Struct:
    fmt = _format_of(field)
    if fmt is None or fmt.endswith("s"):
        raise TypeError("length prefix must be an integer FormatField")
    return struct.Struct("<" + fmt)


def construct_decode(definition: c.Struct) -> Callable[[bytes], Decoded]:
    """The reference decoder: construct itself, giving FastStruct-shaped tuples.

    Used by the differential tests; raises ProtocolError where construct fails.
    """
    names = [m.name for m in definition.subcons]

    def norm(v: Any) -> Any:
        if isinstance(v, c.ListContainer):
            return [tuple(norm(x[k]) for k in x if not k.startswith("_")) for x in v]
        return v

    def decode(data: bytes) -> Decoded:
        try:
            obj = definition.parse(data)
        except c.ConstructError as exc:
            raise ProtocolError(f"construct: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"construct: {exc}") from exc
        return tuple(norm(obj[n]) for n in names)

    return decode
