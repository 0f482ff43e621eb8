"""WebDataset tar shards: shard specs to URLs, and the raw samples of one shard.

webdataset supplies the stream opener (``gopen``: local files, ``pipe:`` commands, http(s), s3/gs via their
CLIs) and the tar member naming (``base_plus_ext``); the reading is written out here so that every kind of
damage (a missing or unreadable shard, a tar cut part way) becomes a counted skip with a named reason.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator, Sequence

import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from ldm.data.resume import tar_index
from ldm.data.skips import SkipCounter

# The modification time ldm writes into shard members: an integer keeps tarfile from adding a pax header to
# every member (a float time needs one), which halves the headers a reader parses; a fixed one makes the same
# input give byte-identical shards.
SHARD_MTIME = 0


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Shard specs -> list of URLs. A spec is a brace pattern (``/data/{00000..00099}.tar``,
    ``pipe:aws s3 cp s3://bucket/{000..999}.tar -``); a string may join several with ``::``
    (webdataset's convention), or pass a list."""
    specs = shards.split("::") if isinstance(shards, str) else list(shards)
    urls = [url for spec in specs if spec.strip() for url in braceexpand.braceexpand(spec.strip())]
    if not urls:
        raise ValueError(f"shards={shards!r} names no shard; give a path pattern like '/data/{{00000..00099}}.tar'")
    return urls


class _TailRecorder:
    """A read-only stream wrapper that keeps the last 512 bytes read (to see a tar's end marker)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if data:
            self.tail = (self.tail + data)[-tarfile.BLOCKSIZE :]
        return data

    def close(self) -> None:
        self.stream.close()


def read_tar_samples(
    url: str, skip_counter: SkipCounter, count_shard_errors: bool = True
) -> Iterator[dict[str, bytes | str]]:
    """Raw samples of one tar shard: ``{"__key__", "__url__", ext: bytes, ...}``, files grouped by key.

    An unreadable shard (missing, not a tar) is skipped as ``unreadable_shard``; a read error part
    way (truncated or damaged tar) ends the shard as ``truncated_tar`` and drops the sample whose
    file it cut (a sample whose files were all read before the cut is still yielded).
    ``count_shard_errors=False``: such errors are not counted (another reader of the shard counts them).
    """

    def shard_error(reason: str, error: Exception) -> None:
        if count_shard_errors:
            skip_counter.add(reason, f"{url}: {type(error).__name__}: {error}", shard=url)

    try:
        stream = _TailRecorder(gopen(url))
    except Exception as error:  # missing file, no permission, failed command...
        shard_error("unreadable_shard", error)
        return
    try:
        archive = tarfile.open(fileobj=stream, mode="r|*")
    except Exception as error:  # not a tar archive
        shard_error("unreadable_shard", error)
        _close_quietly(stream)
        return
    current: dict | None = None
    member_being_read = None
    abandoned = False
    try:
        for member in archive:
            if not member.isreg():
                continue
            key, extension = base_plus_ext(member.name)
            if key is None:
                continue
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            member_being_read = member.name
            current[extension.lower()] = archive.extractfile(member).read()
            member_being_read = None
            archive.members = []  # stream mode would otherwise keep every header in memory
        # tarfile takes a cut at a 512-byte block boundary for the end of the archive (common when a
        # copy stops between buffers); a whole plain tar ends in zero blocks, so check for them.
        while stream.read(1 << 16):
            pass
        if getattr(archive.fileobj, "comptype", None) == "tar" and stream.tail != bytes(tarfile.BLOCKSIZE):
            raise tarfile.ReadError("the archive ends without its end-of-archive blocks")
    except GeneratorExit:  # the consumer stopped reading (e.g. at the end of an epoch)
        abandoned = True
        raise
    except Exception as error:
        shard_error("truncated_tar", error)
        if member_being_read is not None:
            current = None  # one of its files was cut; the files of a sample read whole are kept
    finally:
        if abandoned:
            _close_quietly(stream)  # a pipe: command cut short would report a failure that is none
        else:
            try:
                stream.close()
            except Exception as error:  # a pipe: command that failed reports it on close
                shard_error("unreadable_shard", error)
    if current is not None:
        yield current


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:
        pass


def shard_samples(url: str, counter: SkipCounter) -> Iterator[dict]:
    """The raw samples of one shard. A local, plain, undamaged tar gives header-only entries (``tar_index``),
    whose files ``ShardStream._decoded`` reads when it needs them: a resumed stream walks over consumed samples
    without reading them, and a read costs a seek instead of tarfile's header parsing. Other shards (remote,
    compressed, damaged) are read by ``read_tar_samples``, which counts their damage."""
    index = tar_index(url)
    if index is None:
        yield from read_tar_samples(url, counter)
        return
    yield from index
