"""Metric families as plain data: what every source returns and what the server renders.

Sources never touch a registry. They turn rows into ``Metric`` objects (prometheus-client's own
family type) through ``FamilyBuilder``, which refuses duplicate label sets: PgBouncer forks and
some versions return duplicate rows, and Prometheus rejects a whole scrape with a duplicate series.

Large families are *columnar*: a ``ColumnarFamily`` is a ``Metric`` whose samples are one shared
``LabelTable`` (the label values of many series, rendered to text once for every family that
shares it) plus one sequence of values. ``exposition()`` writes the text format or OpenMetrics
from that directly, a few C-level joins per family instead of a Python call per sample; a
family's ``samples`` list is only built if someone asks for it (tests, third-party collectors).
A SHOW POOLS of 10,000 rows becomes 12 families of 10,000 series that share one label table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Literal, cast

from isal import isal_zlib
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

MetricKind = Literal["gauge", "counter", "info"]

#: The small fixed set of reasons a collection or a check can fail for. Keeping it closed keeps
#: ``poolwatch_errors_total{reason}`` low-cardinality and alertable.
ErrorReason = Literal["connect", "auth", "timeout", "query", "privilege", "config"]
ERROR_REASONS: tuple[ErrorReason, ...] = ("connect", "auth", "timeout", "query", "privilege", "config")


def as_float(value: object) -> float | None:
    """Numbers as the console and asyncpg hand them over (int, Decimal, str, bool, None)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if not math.isnan(number) else None


def label_text(value: object) -> str:
    """A label value: NULL becomes the empty string, everything else its text form."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# ------------------------------------------------------------------------------------------------
# Columnar families
# ------------------------------------------------------------------------------------------------
def label_column(values: Iterable[object]) -> list[str]:
    """Values of one label for many series, as label text (``label_text`` of each)."""
    column = values if isinstance(values, list) else list(values)
    types = set(map(type, column))
    if types <= {str}:  # the common case: no conversion at all
        return cast(list[str], column)
    if types == {type(None)}:
        return [""] * len(column)
    if types == {int}:
        return list(map(str, column))
    if types == {str, type(None)}:
        return [v or "" for v in cast(list[str | None], column)]
    return [label_text(v) for v in column]


def escape_label_values(values: Sequence[str]) -> Sequence[str]:
    """Backslash, double quote and newline escaped, for many values in a few C-level passes."""
    joined = "\0".join(values)
    if "\\" not in joined and '"' not in joined and "\n" not in joined:
        return values
    escaped = joined.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").split("\0")
    if len(escaped) == len(values):
        return escaped
    # a value held a NUL itself: escape one by one
    return [v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values]


class LabelTable:
    """The label values of many series with the same label names, stored by label.

    Families built from one result set share one table, so the label part of each line
    (``{target="pgb",database="app",user="app"}``) is escaped and formatted once, not once per
    family.
    """

    __slots__ = ("_keys", "_text", "columns", "length", "names")

    def __init__(
        self, names: Sequence[str], columns: Sequence[Sequence[str]], length: int | None = None
    ) -> None:
        self.names = tuple(names)
        self.columns = list(columns)
        if len(self.columns) != len(self.names):
            raise ValueError(f"{len(self.columns)} label columns for {len(self.names)} label names")
        self.length = len(self.columns[0]) if self.columns else (length or 0)
        self._keys: list[tuple[str, ...]] | None = None
        self._text: list[str] | None = None

    @classmethod
    def from_keys(cls, names: Sequence[str], keys: Sequence[tuple[str, ...]]) -> LabelTable:
        columns = [list(c) for c in zip(*keys, strict=True)] if keys and names else [[] for _ in names]
        table = cls(names, columns, len(keys))
        table._keys = list(keys)
        return table

    def __len__(self) -> int:
        return self.length

    def keys(self) -> list[tuple[str, ...]]:
        if self._keys is None:
            self._keys = list(zip(*self.columns, strict=True)) if self.columns else [()] * self.length
        return self._keys

    def take(self, indexes: Sequence[int]) -> LabelTable:
        """The rows at ``indexes``, in that order."""
        return LabelTable(self.names, [[c[i] for i in indexes] for c in self.columns], len(indexes))

    def text(self) -> list[str]:
        """``{name="value",...} `` per row (a lone space when there are no labels)."""
        if self._text is None:
            if not self.names:
                self._text = [" "] * self.length
            else:
                # a label with one value in every row (target, often host or port) goes into the
                # template itself; only the varying ones are formatted per row
                parts, varying = [], []
                for name, column in zip(self.names, self.columns, strict=True):
                    escaped = escape_label_values(column)
                    if self.length and escaped.count(escaped[0]) == self.length:
                        parts.append(f'{name}="' + escaped[0].replace("%", "%%") + '"')
                    else:
                        parts.append(f'{name}="%s"')
                        varying.append(escaped)
                template = "{" + ",".join(parts) + "} "
                if not varying:
                    self._text = [template % ()] * self.length
                elif len(varying) == 1:
                    self._text = [template % (v,) for v in varying[0]]
                else:
                    self._text = [template % row for row in zip(*varying, strict=True)]
        return self._text


class BuildCache:
    """What the previous collection of one target made: label tables and families, for reuse.

    A PgBouncer's databases and users change rarely, and on most pools most columns (settings,
    waits, cancels; everything on an idle pool) are the same from one collection to the next.
    Formatting the label part of 10,000 rows costs about 10 ms per SHOW, and building and
    rendering a family about 1-3 ms. A label table whose values equal last time's is last time's
    table (a C-level comparison), and a family made from the very same objects as last time
    (labels and value column, compared by identity) is last time's family, rendered text included.
    """

    __slots__ = ("_labels", "_made")

    def __init__(self) -> None:
        self._labels: dict[str, LabelTable] = {}
        self._made: dict[str, tuple[tuple[object, ...], object]] = {}

    def made_from(self, key: str, inputs: tuple[object, ...]) -> object | None:
        """What was kept under ``key`` last collection if it was made from these very objects."""
        entry = self._made.get(key)
        if entry is not None and _same_objects(entry[0], inputs):
            return entry[1]
        return None

    def keep(self, key: str, inputs: tuple[object, ...], made: object) -> None:
        """Keep ``made`` (from ``inputs``) for ``made_from`` in the next collection. A family it
        replaces lets go of its rendered text now, so a body is never held twice while the next
        one is made."""
        old = self._made.get(key)
        if old is not None and old[1] is not made and isinstance(old[1], ColumnarFamily):
            old[1].rendered = None
        self._made[key] = (inputs, made)

    def lookup(self, key: str, names: Sequence[str], columns: Sequence[Sequence[str]]) -> LabelTable | None:
        """Last time's table (text made) when these labels are the same, else None."""
        table = self._labels.get(key)
        if table is None or table.names != tuple(names) or table.columns != list(columns):
            return None
        return table

    def store(self, key: str, table: LabelTable) -> LabelTable:
        """Remember ``table`` (its text made now) for the next collection."""
        table.text()
        self._labels[key] = table
        return table


def _same_objects(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


_SUFFIX = {"counter": "_total", "info": "_info"}


class ColumnarFamily(Metric):
    """A ``Metric`` whose samples are a ``LabelTable`` plus a value per row.

    ``values`` are int or float (never None, bool or NaN: ``numeric_column`` cleans a column).
    With a negative ``exponent`` they are integers counting units of 10**exponent (PgBouncer's
    microseconds: ``exponent=-6``) and are written as ``85817e-6``: exact, and an integer
    format instead of the shortest-float search ``repr`` runs (about five times the cost).
    ``samples`` is computed on first access and cached; ``exposition()`` never needs it.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        typ: str,
        labels: LabelTable,
        values: Sequence[int | float],
        unit: str = "",
        *,
        exponent: int = 0,
    ) -> None:
        super().__init__(name, documentation, typ, unit)
        if len(values) != len(labels):
            raise ValueError(f"{name}: {len(values)} values for {len(labels)} label sets")
        if exponent > 0 or (exponent and not set(map(type, values)) <= {int}):
            raise ValueError(f"{name}: exponent {exponent} needs integer values and exponent <= 0")
        self.labels = labels
        self.values = values
        self.exponent = exponent
        self.sample_name = self.name + _SUFFIX.get(self.type, "")
        #: (openmetrics?, body) once ``prerender`` ran: a source renders its families while the
        #: next query is in flight, and ``exposition`` then only collects the bytes
        self.rendered: tuple[bool, bytes] | None = None
        #: the sample lines (no HELP/TYPE: the same in both formats) compressed, once ``prepack``
        #: ran: what a body too large to keep as text is kept as (``packed_exposition``)
        self.packed: Fragment | None = None

    @property  # type: ignore[override]
    def samples(self) -> list[Sample]:
        cached: list[Sample] | None = self.__dict__.get("_samples")
        if cached is None:
            names, name = self.labels.names, self.sample_name
            values: Sequence[int | float] = self.values
            if self.exponent:
                divisor = 10**-self.exponent  # int / int: correctly rounded, as parsing the text is
                values = [v / divisor for v in values]
            cached = [
                Sample(name, dict(zip(names, key, strict=True)), value)
                for key, value in zip(self.labels.keys(), values, strict=True)
            ]
            self.__dict__["_samples"] = cached
        return cached

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        # Metric.__init__ assigns []; samples of a columnar family only come from its columns
        if value:
            raise TypeError("ColumnarFamily samples come from its label table and values")


def numeric_column(values: Sequence[object]) -> tuple[Sequence[int | float], list[int] | None, bool]:
    """``(numbers, kept, integers)``: values as int/float; ``kept`` lists the positions that had a
    number (None when all of them did); ``integers``: every value is an ``int`` (one type scan
    answers both). NULL, text that is not a number, NaN: no sample (``as_float``)."""
    types = set(map(type, values))
    if types <= {int}:
        return cast(Sequence[int], values), None, True
    if types <= {int, float} and (float not in types or all(v == v for v in values)):  # NaN != NaN
        return cast(Sequence[int | float], values), None, False
    kept: list[int] = []
    numbers: list[int | float] = []
    for i, value in enumerate(values):
        if type(value) is int:
            numbers.append(value)
            kept.append(i)
            continue
        number = as_float(value)
        if number is not None:
            numbers.append(number)
            kept.append(i)
    return numbers, kept, False


class FamilyBuilder:
    """Collects samples for one family; the first sample of a label set wins, later ones are counted."""

    __slots__ = ("_samples", "documentation", "duplicates", "kind", "labelnames", "name", "unit")

    def __init__(
        self,
        name: str,
        documentation: str,
        kind: MetricKind,
        labelnames: Sequence[str] = (),
        unit: str = "",
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.kind: MetricKind = kind
        self.labelnames = tuple(labelnames)
        self.unit = unit
        self._samples: dict[tuple[str, ...], float] = {}
        self.duplicates = 0

    def add(self, labelvalues: Sequence[object], value: object) -> None:
        kind = type(value)
        # int and float as they are (NaN: no sample); anything else through as_float
        plain = kind is int or kind is float
        number = cast(float | None, (value if value == value else None) if plain else as_float(value))
        if number is None:
            return
        key = cast(tuple[str, ...], tuple(labelvalues))
        try:
            "".join(key)  # a C-level check that every label value is already a str
        except TypeError:
            key = tuple(label_text(v) for v in key)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(key)} label values for {len(self.labelnames)} labels")
        if key in self._samples:
            self.duplicates += 1
            return
        self._samples[key] = number

    def add_prepared(self, key: tuple[str, ...], number: float) -> None:
        """``add`` for hot loops whose caller already has str label values and a non-NaN float.

        Skips the per-sample conversions of ``add``; duplicates are still refused the same way.
        """
        if key in self._samples:
            self.duplicates += 1
            return
        self._samples[key] = number

    def __len__(self) -> int:
        return len(self._samples)

    def build(self) -> Metric:
        labels = LabelTable.from_keys(self.labelnames, list(self._samples))
        return ColumnarFamily(
            self.name, self.documentation, self.kind, labels, list(self._samples.values()), self.unit
        )


def gauge(name: str, documentation: str, labelnames: Sequence[str] = ()) -> FamilyBuilder:
    return FamilyBuilder(name, documentation, "gauge", labelnames)


def counter(name: str, documentation: str, labelnames: Sequence[str] = ()) -> FamilyBuilder:
    """``name`` without ``_total``: prometheus-client appends it to the sample."""
    if name.endswith("_total"):
        name = name[: -len("_total")]
    return FamilyBuilder(name, documentation, "counter", labelnames)


def build_all(builders: Iterable[FamilyBuilder], *, keep_empty: bool = False) -> list[Metric]:
    return [b.build() for b in builders if keep_empty or len(b)]


# ------------------------------------------------------------------------------------------------
# Exposition
# ------------------------------------------------------------------------------------------------
_SMALL_INTS = tuple(str(i) for i in range(4096))
_INT = int.__repr__
_REPR = float.__repr__  # the shortest text that reads back as the same float


def _go_float(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return _REPR(value)


def _value_texts(values: Sequence[int | float], exponent: int = 0) -> list[str]:
    """The values as exposition text, one C-level pass where possible (never a Python call per
    value unless a value is infinite or too large for a float). Text, not bytes: ``int.__repr__``
    is twice as fast as ``b"%d" %``, and a family is encoded once, whole (see ``_lines``)."""
    n = len(values)
    if not any(values):  # an all-zero column: idle pools, unused features (NaN is truthy)
        return ["0"] * n
    if 0 in values[:64] and values.count(0) > n // 2:  # (a busy column skips the count)
        # mostly zeros (cancels, waits, idle pools' counters): zeros are one shared text and
        # only the other rows, found in C, are formatted
        texts = ["0"] * n
        others = list(compress(range(n), values))
        for i, text in zip(others, _value_texts([values[i] for i in others], exponent), strict=True):
            texts[i] = text
        return texts
    if exponent:  # integers in units of 10**exponent (ColumnarFamily checked the types)
        return list(map(f"%de{exponent}".__mod__, values))
    types = set(map(type, values))
    if types == {int}:
        if min(values) >= 0 and max(values) < len(_SMALL_INTS):
            return list(map(_SMALL_INTS.__getitem__, values))  # type: ignore[arg-type]
        return list(map(_INT, values))
    try:
        finite = math.isfinite(sum(values))
    except OverflowError:  # an int too large for a float
        finite = False
    if finite and types <= {int, float}:
        return list(map(_REPR if types == {float} else repr, values))  # repr: ints among floats
    return [_INT(v) if type(v) is int else _go_float(float(v)) for v in values]


def _help_text(documentation: str, openmetrics: bool) -> str:
    text = documentation.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if openmetrics else text


def _header(family: Metric, openmetrics: bool) -> str:
    name, typ = family.name, family.type
    if openmetrics:
        head = f"# HELP {name} {_help_text(family.documentation, True)}\n# TYPE {name} {typ}\n"
        return head + (f"# UNIT {name} {family.unit}\n" if family.unit else "")
    if typ == "counter":
        name += "_total"
    elif typ == "info":
        name, typ = name + "_info", "gauge"
    elif typ == "unknown":
        typ = "untyped"
    return f"# HELP {name} {_help_text(family.documentation, False)}\n# TYPE {name} {typ}\n"


def _lines(
    header: str,
    sample_name: str,
    label_text: Sequence[str],
    values: Sequence[int | float],
    exponent: int = 0,
) -> bytes:
    """``header`` then ``name{labels} value\\n`` per row, as UTF-8: slice assignments, one join and
    one encode, all in C (the family's text is written once, then encoded once)."""
    n = len(values)
    if n == 0:
        return header.encode()
    first = values[0]
    if values[-1] == first and values[n // 2] == first and values.count(first) == n:
        # one value in every row (an all-zero column: cancels, idle pools, pause flags; a
        # setting): the lines differ only by labels, so one join with the value as separator,
        # a third of the pieces
        text = _value_texts(values[:1], exponent)[0]
        pieces = list(label_text)  # the header and the last value ride on the first/last piece
        pieces[0] = header + sample_name + pieces[0]
        pieces[-1] += text + "\n"
        return (text + "\n" + sample_name).join(pieces).encode()
    flat: list[str | None] = [None] * (3 * n + 1)
    flat[0] = header + sample_name
    flat[1::3] = label_text
    flat[2::3] = _value_texts(values, exponent)
    sep = "\n" + sample_name
    flat[3::3] = [sep] * n
    flat[-1] = "\n"
    return "".join(flat).encode()  # type: ignore[arg-type]


_PLAIN_TYPES = frozenset({"gauge", "counter", "info", "unknown"})


def render_family(family: Metric, *, openmetrics: bool = False, header: bool = True) -> bytes:
    """One family in the text format (0.0.4) or OpenMetrics (without the final ``# EOF``), UTF-8.

    ``header=False`` leaves out the HELP/TYPE lines: the family continues one of the same name
    written just before it (the same metric from another target).
    """
    if not header:
        return _without_header(render_family(family, openmetrics=openmetrics), family, openmetrics)
    if isinstance(family, ColumnarFamily):
        done = family.rendered
        if done is not None and done[0] == openmetrics:
            return done[1]
        labels = family.labels.text()
        return _lines(
            _header(family, openmetrics), family.sample_name, labels, family.values, family.exponent
        )
    samples = family.samples
    expected = family.name + _SUFFIX.get(family.type, "")
    if family.type in _PLAIN_TYPES and all(
        s.name == expected and s.timestamp is None and s.exemplar is None and s.native_histogram is None
        for s in samples
    ):
        text = []
        for s in samples:
            pairs = ",".join(f'{k}="{escape_label_values([v])[0]}"' for k, v in s.labels.items())
            text.append(f"{{{pairs}}} " if pairs else " ")
        values: list[int | float] = [s.value for s in samples]
        return _lines(_header(family, openmetrics), expected, text, values)
    return _render_with_prometheus_client(family, openmetrics)


def _without_header(body: bytes, family: Metric, openmetrics: bool) -> bytes:
    header = _header(family, openmetrics).encode()
    if body.startswith(header):
        return body[len(header) :]
    while body.startswith(b"# "):  # prometheus-client's writer: its own header lines
        body = body.partition(b"\n")[2]
    return body


def exposition_order(families: Iterable[Metric]) -> list[tuple[Metric, bool]]:
    """``(family, header)`` in the order to write them: families sharing a name (one metric from
    several targets) next to each other under a single HELP/TYPE header, in first-seen order.
    Both text formats require a metric's samples in one group; a second header for the same
    name is an error to ``promtool check metrics`` and to Prometheus's OpenMetrics parser."""
    by_name: dict[str, list[Metric]] = {}
    for family in families:
        by_name.setdefault(family.name, []).append(family)
    return [(family, i == 0) for group in by_name.values() for i, family in enumerate(group)]


def _render_with_prometheus_client(family: Metric, openmetrics: bool) -> bytes:
    """Anything unusual (histograms, exemplars, timestamps): prometheus-client's own writer."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

    class _One:
        def collect(self) -> list[Metric]:
            return [family]

    body: bytes = (
        generate_openmetrics(_One())  # type: ignore[arg-type,no-untyped-call]
        if openmetrics
        else generate_latest(_One())  # type: ignore[arg-type]
    )
    return body.removesuffix(b"# EOF\n")


def prerender(families: Iterable[Metric], *, openmetrics: bool = False) -> int:
    """Render the columnar ``families`` now and keep the bytes on them; returns the series done.

    Sources call this while their next query is in flight, so the snapshot's ``exposition`` is
    mostly a list of ready chunks. The bytes are the same object the exposition then holds: no
    second copy of the body. A family already rendered in this format (reused from the last
    collection, ``BuildCache``) keeps its bytes.
    """
    series = 0
    for family in families:
        if isinstance(family, ColumnarFamily):
            done = family.rendered
            if done is None or done[0] != openmetrics:
                family.rendered = (openmetrics, render_family(family, openmetrics=openmetrics))
            series += len(family.values)
    return series


def unrendered_series(families: Iterable[Metric], *, openmetrics: bool = False) -> int:
    """Series of ``families`` that ``exposition`` would still have to render."""
    return sum(
        family_size(f)
        for f in families
        if not (isinstance(f, ColumnarFamily) and f.rendered is not None and f.rendered[0] == openmetrics)
    )


@dataclass(slots=True)
class Exposition:
    """A rendered scrape body as UTF-8 chunks (one per family), so no single huge copy is made."""

    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    series: int = 0

    def append(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)

    def join(self) -> bytes:
        return b"".join(self.chunks)

    def coalesce(self, small: int, block: int) -> None:
        """Join runs of chunks under ``small`` bytes into pieces of about ``block`` bytes; larger
        chunks (most families of a large PgBouncer) stay as they are, uncopied. Serving is then
        one write per piece, without a write per tiny family or a copy of the whole body."""
        pieces: list[bytes] = []
        group: list[bytes] = []
        size = 0
        for chunk in self.chunks:
            if len(chunk) >= small:
                if group:
                    pieces.append(b"".join(group))
                    group, size = [], 0
                pieces.append(chunk)
                continue
            group.append(chunk)
            size += len(chunk)
            if size >= block:
                pieces.append(b"".join(group))
                group, size = [], 0
        if group:
            pieces.append(b"".join(group))
        self.chunks = pieces


#: gzip level for scrape bodies. Label text repeats on every line, so the fastest level already
#: shrinks an exposition about 30x (6.4 MB -> 0.22 MB at 2,000 pools, in 3 ms with ISA-L; the
#: standard library's zlib takes 12 ms for the same bytes at its fastest).
GZIP_LEVEL = 1


def gzip_chunks(chunks: Iterable[bytes]) -> bytes:
    """``chunks`` joined and gzip-compressed into one member (RFC 1952), as Prometheus asks for
    it, without joining them uncompressed first."""
    deflate = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, 16 + isal_zlib.MAX_WBITS)
    return b"".join([*map(deflate.compress, chunks), deflate.flush()])


@dataclass(frozen=True, slots=True)
class Fragment:
    """Exposition text kept compressed: raw DEFLATE blocks (RFC 1951) ending on a byte boundary
    and referring to nothing before them (a full flush), with the CRC-32 and length of the text.

    Fragments compressed separately and concatenated are one valid DEFLATE stream, so a gzip body
    is assembled from kept fragments without compressing anything again (``gzip_fragments``), and
    a family unchanged since the last collection keeps its fragment. About 1/30 of the text.
    """

    data: bytes
    crc: int
    size: int


def pack(text: bytes) -> Fragment:
    deflate = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)
    data = deflate.compress(text) + deflate.flush(isal_zlib.Z_FULL_FLUSH)
    return Fragment(data, isal_zlib.crc32(text), len(text))


def unpack(fragment: Fragment) -> bytes:
    # a decompressor object: a fragment has no final block, which one-shot decompress requires
    return isal_zlib.decompressobj(-isal_zlib.MAX_WBITS).decompress(fragment.data)


def unpacked_pieces(fragments: Iterable[Fragment], size: int) -> Iterator[bytes]:
    """The fragments' text in pieces of ``size`` bytes (the last one shorter), however large
    one fragment's text is: a text scrape of a packed body holds one piece at a time."""
    pending: list[bytes] = []
    have = 0
    for fragment in fragments:
        inflate = isal_zlib.decompressobj(-isal_zlib.MAX_WBITS)
        data = fragment.data
        while True:
            text = inflate.decompress(data, size - have)
            data = inflate.unconsumed_tail
            if not text and not data:
                # all input read can still leave output inside the decompressor (the rest of a
                # back-reference cut off by the size limit): drained by the calls before this
                break
            pending.append(text)
            have += len(text)
            if have >= size:
                yield b"".join(pending)
                pending, have = [], 0
    if pending:
        yield b"".join(pending)


#: RFC 1952 member header: DEFLATE, no flags, no modification time, OS unknown
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
#: an empty final DEFLATE block: what ends a stream of concatenated fragments
_FINAL_BLOCK = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS).flush()


def gzip_fragments(fragments: Sequence[Fragment]) -> bytes:
    """One gzip member holding the fragments' texts in order (their CRCs combined, not recomputed)."""
    crc = size = 0
    for fragment in fragments:
        crc = isal_zlib.crc32_combine(crc, fragment.crc, fragment.size)
        size += fragment.size
    trailer = crc.to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")
    return b"".join([_GZIP_HEADER, *(f.data for f in fragments), _FINAL_BLOCK, trailer])


def _sample_lines(family: ColumnarFamily) -> bytes:
    """The family's text without its HELP/TYPE lines: cut from the rendered text if there is one."""
    done = family.rendered
    if done is not None:
        header = _header(family, done[0]).encode()
        if done[1].startswith(header):
            return done[1][len(header) :]
    return _lines("", family.sample_name, family.labels.text(), family.values, family.exponent)


#: Columnar families with at least this many series keep their own compressed fragment; smaller
#: ones (under ~100 KB of text) are rendered and compressed together with their neighbours at each
#: snapshot: compressed alone, a few lines would not shrink much.
PACK_ALONE_SERIES = 1000


def _packs_alone(family: ColumnarFamily) -> bool:
    return len(family.values) >= PACK_ALONE_SERIES


def prepack(families: Iterable[Metric]) -> int:
    """Compress the large columnar ``families``' sample lines now and keep the fragment on each,
    their rendered text dropped; returns the series compressed now. For a body too large to
    keep as text: a source calls it while its next query is in flight, as it would ``prerender``."""
    series = 0
    for family in families:
        if isinstance(family, ColumnarFamily) and _packs_alone(family):
            if family.packed is None:
                family.packed = pack(_sample_lines(family))
                series += len(family.values)
            family.rendered = None
    return series


def unpacked_series(families: Iterable[Metric]) -> int:
    """Series of ``families`` that ``packed_exposition`` would still have to render and compress."""
    return sum(
        family_size(f) for f in families if not (isinstance(f, ColumnarFamily) and f.packed is not None)
    )


def packed_exposition(families: Iterable[Metric], *, openmetrics: bool = False) -> list[Fragment]:
    """``exposition`` as fragments: each large columnar family's kept lines (``prepack``, done now
    where not done yet); between them, its header and the small families rendered and compressed
    together. ``unpack`` of each, joined, is ``exposition``'s body."""
    fragments: list[Fragment] = []
    texts: list[bytes] = []

    def pack_texts() -> None:
        if texts:
            fragments.append(pack(b"".join(texts)))
            texts.clear()

    for family, header in exposition_order(families):
        try:
            if isinstance(family, ColumnarFamily) and _packs_alone(family):
                if header:
                    texts.append(_header(family, openmetrics).encode())
                pack_texts()
                prepack([family])
                assert family.packed is not None
                fragments.append(family.packed)
            else:
                texts.append(render_family(family, openmetrics=openmetrics, header=header))
        except Exception as exc:
            exc.args = (*exc.args, family.name)
            raise
    if openmetrics:
        texts.append(b"# EOF\n")
    pack_texts()
    return fragments


def exposition(families: Iterable[Metric], *, openmetrics: bool = False) -> Exposition:
    """The scrape body for ``families`` in the text format 0.0.4 or OpenMetrics 1.0.0.

    Parses with ``prometheus_client.parser`` / its OpenMetrics parser and ``promtool check
    metrics``; the only differences from prometheus-client's own output are label order (kept
    as given, ``target`` first, instead of sorted) and integers written without ``.0``.
    """
    out = Exposition()
    for family, header in exposition_order(families):
        try:
            out.append(render_family(family, openmetrics=openmetrics, header=header))
        except Exception as exc:
            exc.args = (*exc.args, family.name)
            raise
        out.series += family_size(family)
    if openmetrics:
        out.append(b"# EOF\n")
    return out


def family_size(family: Metric) -> int:
    """Series in a family, without building a columnar family's samples."""
    return len(family.values) if isinstance(family, ColumnarFamily) else len(family.samples)


@dataclass(slots=True)
class CollectorOutcome:
    """How one query of one source went: feeds ``poolwatch_collector_success{target,collector}``."""

    collector: str
    ok: bool
    seconds: float = 0.0
    reason: ErrorReason | None = None
    #: a human explanation, safe to show: never a password, never a raw DSN
    detail: str | None = None


@dataclass(slots=True)
class SourceResult:
    """What one collection of one target produced."""

    target: str
    kind: str
    up: bool
    families: list[Metric] = field(default_factory=list)
    outcomes: list[CollectorOutcome] = field(default_factory=list)
    reason: ErrorReason | None = None
    detail: str | None = None
    seconds: float = 0.0
    #: the typed observation the doctor reads (PgBouncerObservation, PostgresObservation), or None
    observation: object | None = None
