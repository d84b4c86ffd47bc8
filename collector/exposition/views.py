"""Views of the exposition: shards, blocks and gzip members, rebuilt only where lines changed."""

from __future__ import annotations

import bisect
import itertools
import logging
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from gpufleet.collector.http import gzip_member

log = logging.getLogger(__name__)


def shard_of(node_id: str, shards: int) -> int:
    """Stable shard of a node, so that scrape jobs can split the per-node series."""
    return zlib.crc32(node_id.encode()) % shards


# -- scrapes -----------------------------------------------------------------------------

# Text is written and compressed in blocks of about this size: never one large
# buffer for a whole scrape, and a gzip member per block.
BLOCK_BYTES = 512 * 1024


class _Segment:
    """One family's lines in one view: its header and every node's chunk (references, not a copy).

    The text is joined block by block when written; each block's gzip member is
    made once and kept as long as the segment (until the family's lines change).
    """

    __slots__ = ("_bounds", "_members", "_pieces", "length")

    def __init__(self, header: bytes, chunks: list[bytes]) -> None:
        pieces = [header, *chunks]
        ends = list(itertools.accumulate(map(len, pieces)))
        bounds = [0]
        start = 0  # where the current block starts, in bytes
        while True:
            # The block ends after the piece that takes it to BLOCK_BYTES.
            cut = bisect.bisect_left(ends, start + BLOCK_BYTES) + 1
            if cut >= len(pieces):
                break
            bounds.append(cut)
            start = ends[cut - 1]
        bounds.append(len(pieces))
        self._pieces = pieces
        self._bounds = bounds
        self._members: list[bytes | None] = [None] * (len(bounds) - 1)
        self.length = ends[-1]

    def blocks(self) -> Iterator[bytes]:
        pieces = self._pieces
        for start, end in itertools.pairwise(self._bounds):
            yield b"".join(pieces[start:end])

    def pending(self) -> int:
        """Bytes not compressed yet."""
        if all(member is not None for member in self._members):
            return 0
        ends = [0, *itertools.accumulate(map(len, self._pieces))]
        return sum(
            ends[end] - ends[start]
            for (start, end), member in zip(itertools.pairwise(self._bounds), self._members, strict=True)
            if member is None
        )

    def members(self) -> list[bytes]:
        """The gzip member of every block, compressing those not made yet."""
        members = self._members
        for block, member in enumerate(members):
            if member is None:
                start, end = self._bounds[block], self._bounds[block + 1]
                members[block] = gzip_member(b"".join(self._pieces[start:end]))
        return [member for member in members if member is not None]


class Body:
    """A scrape's exposition text, in pieces: one segment per metric family, then a tail.

    Written block by block, never joined into one large buffer. The gzip form is
    a gzip member per block (Prometheus, like every HTTP client, accepts several
    members in a row), kept until the family's lines change: a scrape compresses
    only what changed since the previous one. ``bytes(body)`` gives the whole text.
    """

    __slots__ = ("_length", "_segments", "_tail")

    def __init__(self, segments: Sequence[_Segment], tail: bytes = b"") -> None:
        # Segments are never changed once made (a change makes new ones): a body
        # can be written or compressed while the event loop renders newer lines.
        self._segments = tuple(segments)
        self._tail = tail
        self._length = sum(segment.length for segment in self._segments) + len(tail)

    def __len__(self) -> int:
        return self._length

    def __bytes__(self) -> bytes:
        return b"".join(self.chunks())

    def chunks(self) -> Iterator[bytes]:
        """The text, block by block."""
        for segment in self._segments:
            yield from segment.blocks()
        if self._tail:
            yield self._tail

    def gzip_pending(self) -> int:
        """How many bytes ``gzip_chunks`` has yet to compress."""
        return sum(segment.pending() for segment in self._segments) + len(self._tail)

    def gzip_chunks(self) -> list[bytes]:
        """The gzip form, member by member, compressing what is not yet (safe in another thread)."""
        members = [member for segment in self._segments for member in segment.members()]
        if self._tail or not members:
            members.append(gzip_member(self._tail))
        return members

    def gzip(self) -> bytes:
        return b"".join(self.gzip_chunks())


class Chunked(Protocol):
    """One node's lines for a view: a chunk of text per family, and a stable hash for its shard."""

    @property
    def crc(self) -> int: ...

    @property
    def chunks(self) -> Sequence[bytes]: ...


class _View:
    """The nodes of one shard and their lines, one segment per family, built on demand."""

    def __init__(self, members: list[Chunked], families: int) -> None:
        self.members = members
        self.segments: list[_Segment | None] = [None] * families
        self.built = [False] * families
        self.body: Body | None = None

    def invalidate(self, families: Iterable[int]) -> None:
        built = self.built
        for family in families:
            built[family] = False
        self.body = None

    def build(self, headers: Sequence[bytes]) -> list[_Segment]:
        """The view's segments, those of families that changed made again."""
        segments = self.segments
        for family, built in enumerate(self.built):
            if not built:
                chunks = list(filter(None, [lines.chunks[family] for lines in self.members]))
                segments[family] = _Segment(headers[family], chunks) if chunks else None
                self.built[family] = True
        return [segment for segment in segments if segment is not None]


class ShardViews:
    """The shard views of one exposition (shard I of N), kept up to date as nodes change.

    The least recently scraped views are dropped past ``max_views``. Both the gpufleet
    exposition and the dcgm-compatible one serve their scrapes from here: bodies with their
    gzip members, rebuilt only for families whose lines changed.
    """

    def __init__(self, headers: Sequence[bytes], max_views: int = 64) -> None:
        self.headers = list(headers)
        self.members: dict[str, Chunked] = {}
        self._max_views = max_views
        self._views: dict[tuple[int, int], _View] = {}
        # How many views there are for each shard count.
        self._shard_counts: Counter[int] = Counter()

    def _views_of(self, lines: Chunked) -> Iterator[_View]:
        for shards in self._shard_counts:
            view = self._views.get((lines.crc % shards, shards))
            if view is not None:
                yield view

    def changed(self, node_id: str, lines: Chunked, families: Iterable[int]) -> None:
        """``lines`` (new, or already a member) changed in ``families``."""
        added = node_id not in self.members
        self.members[node_id] = lines
        families = list(families)
        for view in self._views_of(lines):
            if added:
                view.members.append(lines)
            view.invalidate(families)

    def removed(self, node_id: str) -> None:
        lines = self.members.pop(node_id, None)
        if lines is None:
            return
        for view in self._views_of(lines):
            view.members.remove(lines)
            view.invalidate(family for family, chunk in enumerate(lines.chunks) if chunk)

    def __len__(self) -> int:
        """How many views are kept."""
        return len(self._views)

    def view(self, shard: int, shards: int) -> _View:
        key = (shard, shards)
        view = self._views.pop(key, None)
        if view is None:
            members = [lines for lines in self.members.values() if lines.crc % shards == shard]
            view = _View(members, len(self.headers))
            self._shard_counts[shards] += 1
            if len(self._views) >= self._max_views:
                oldest = next(iter(self._views))
                del self._views[oldest]
                self._shard_counts[oldest[1]] -= 1
                if not self._shard_counts[oldest[1]]:
                    del self._shard_counts[oldest[1]]
        self._views[key] = view
        return view

    def body(self, shard: int = 0, shards: int = 1) -> Body:
        view = self.view(shard, shards)
        if view.body is None:
            view.body = Body(view.build(self.headers))
        return view.body

    def segments(self, shard: int = 0, shards: int = 1) -> list[_Segment]:
        return self.view(shard, shards).build(self.headers)
