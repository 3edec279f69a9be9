"""The safetensors file format, written and read without copying tensor data in Python.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(padded with spaces to a multiple of 8), then the raw little-endian tensor bytes. The
encoder here returns the header followed by zero-copy views of each tensor's own memory,
so a backend can hand them to ``write``/``writev`` directly; the decoder reads the header
once and ``readinto`` each tensor's freshly allocated storage. Files written here are
byte-identical to ``safetensors.torch.save`` for single-tensor files and readable by
``safetensors`` (and mi_crow 1.0) in every case.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

import torch

from mi_crow.store.errors import CorruptFileError
from mi_crow.store.limits import MAX_HEADER_BYTES, MAX_JSON_DEPTH, MAX_NDIM

try:  # zlib-ng's CRC-32 uses carry-less multiply (SSE4.2/AVX-512 or ARMv8 CRC): the same values as
    # the standard library's, about 5x faster (34 vs 6.5 GB/s on the benchmark machine).
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - a platform without zlib-ng wheels
    from zlib import crc32

# The dtypes that torch and safetensors share, with safetensors' codes.
_DTYPE_CODES: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2": "F8_E5M2",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "complex64": "C64",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
}
DTYPE_TO_CODE: dict[torch.dtype, str] = {
    getattr(torch, name): code for name, code in _DTYPE_CODES.items() if hasattr(torch, name)
}
CODE_TO_DTYPE: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPE_TO_CODE.items()}

# In ``__metadata__``: JSON ``{tensor name: CRC-32 of its bytes as 8 hex digits}``. safetensors
# and mi_crow 1.0 ignore ``__metadata__`` when loading, so they read our files unchanged.
CRC_FIELD = "mi_crow_store.crc32"
# In ``__metadata__``: the CRC-32 (8 hex digits) of everything else a reader interprets in the
# header: every tensor's name, dtype, shape and offsets, and every other ``__metadata__`` field
# (the data CRCs, an append entry's JSON, a run batch's container kind). Computed over a canonical
# serialisation of the parsed values (:func:`header_digest`), not over the header's bytes, so it
# needs no placeholder and is checked from the parsed header alone.
HEADER_CRC_FIELD = "mi_crow_store.header_crc32"
# Largest tensor: numel x element size must fit int64, as torch's stride arithmetic needs.
_MAX_TENSOR_BYTES = 2**63 - 1

Buffer = bytes | bytearray | memoryview


def prepare_tensor(value: Any, where: str) -> torch.Tensor:
    """Check that ``value`` can be stored and return it as a dense contiguous CPU tensor.

    The result shares memory with ``value`` whenever ``value`` is already a contiguous
    CPU tensor; otherwise exactly one copy is made (to CPU, or to contiguous layout).

    Args:
        value: The object the caller passed as a tensor.
        where: Where it was passed, for the error message (e.g. ``"tensor_metadata['l']['k']"``).

    Raises:
        ValueError: If ``value`` is not a ``torch.Tensor``, is sparse, nested or on the
            ``meta`` device, or has a dtype safetensors cannot store.
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_nested:
        raise ValueError(f"{where} is a nested tensor; store its components as separate tensors")
    if value.layout != torch.strided:
        raise ValueError(
            f"{where} has layout {value.layout}; only dense (strided) tensors can be stored, call `.to_dense()` first"
        )
    if value.device.type == "meta":
        raise ValueError(f"{where} is on the 'meta' device and has no data to store")
    if value.dtype not in DTYPE_TO_CODE:
        supported = ", ".join(str(d).removeprefix("torch.") for d in DTYPE_TO_CODE)
        raise ValueError(f"{where} has dtype {value.dtype}, which safetensors cannot store; supported: {supported}")
    if value.dim() > MAX_NDIM:
        raise ValueError(f"{where} has {value.dim()} dimensions; at most {MAX_NDIM} are stored")
    t = value.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor's data."""
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data


# Below this many data bytes the CRC is computed inline; above, on a helper thread while the
# backend writes the data (the CRC releases the GIL), which hides most of its time. With
# zlib-ng's CRC (~30 us per MiB) the handoff only pays from a few MiB on: 1 MiB appends took
# 374 us with the thread and 331 us inline, 4 MiB the same, 16 MiB 785 vs 895 us.
_CRC_THREAD_MIN = 4 << 20
_crc_pool: ThreadPoolExecutor | None = None
_crc_pool_pid = -1


def _crc_executor() -> ThreadPoolExecutor:
    global _crc_pool, _crc_pool_pid
    if _crc_pool is None or _crc_pool_pid != os.getpid():  # threads do not survive fork
        _crc_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mi-crow-store-crc")
        _crc_pool_pid = os.getpid()
    return _crc_pool


class Payload:
    """The contents of one file as a backend writes it: a head, then data buffers.

    The head may be computed late (a safetensors header waits for the checksums being
    computed while the data is written); its size is known from the start, so a backend can
    write the data at ``head_size`` first and the head at offset 0 last.
    """

    __slots__ = ("_finish", "_head", "data", "head_size")

    def __init__(
        self,
        head: bytes | None,
        data: Sequence[Buffer] = (),
        *,
        head_size: int | None = None,
        finish: Callable[[], bytes] | None = None,
    ):
        self._head = head
        self._finish = finish
        self.head_size = len(head) if head is not None else int(head_size or 0)
        self.data = list(data)

    def head(self) -> bytes:
        """The head, waiting for it if it is still being computed."""
        if self._head is None:
            assert self._finish is not None
            head = self._finish()
            if len(head) != self.head_size:  # pragma: no cover - would corrupt the file
                raise AssertionError(f"head is {len(head)} bytes, {self.head_size} were reserved")
            self._head = head
        return self._head

    def head_ready(self) -> bool:
        """Whether the head is known without waiting."""
        return self._head is not None

    def buffers(self) -> list[Buffer]:
        """Head and data, for a backend that writes everything at once."""
        return [self.head(), *self.data]

    def nbytes(self) -> int:
        return self.head_size + sum(memoryview(d).nbytes for d in self.data)


def checksum_of(data: Buffer) -> int:
    """The CRC-32 of ``data`` (zlib-ng's where installed)."""
    return crc32(data)


def _crc_all(views: Sequence[memoryview]) -> list[int]:
    return [crc32(v) for v in views]


def header_digest(entries: Mapping[str, tuple[str, Sequence[int], int, int]], metadata: Mapping[str, str]) -> int:
    """The CRC-32 of what a reader interprets in a header: ``(dtype code, shape, begin, end)`` of
    every tensor and every ``__metadata__`` field except :data:`HEADER_CRC_FIELD` itself."""
    canon = json.dumps(
        [
            sorted((k, v) for k, v in metadata.items() if k != HEADER_CRC_FIELD),
            sorted((name, code, list(shape), b, e) for name, (code, shape, b, e) in entries.items()),
        ],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return crc32(canon.encode("utf-8", "surrogatepass"))


def encode(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, checksums: bool = True
) -> Payload:
    """Encode prepared tensors as a safetensors file: a header, then each tensor's own memory.

    Tensors are laid out by decreasing element size, then by name, so every tensor's data
    starts at a multiple of its element size (as safetensors does). With ``checksums``, the
    CRC-32 of every tensor goes into ``__metadata__``; for large tensors it is computed on a
    helper thread while the caller writes the data, and the header waits for it.
    """
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    entries: dict[str, Any] = {}
    views: list[memoryview] = []
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        entries[name] = {
            "dtype": DTYPE_TO_CODE[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        views.append(tensor_bytes(t))

    def header(crcs: Sequence[int] | None) -> bytes:
        meta = dict(metadata or {})
        if crcs is not None:
            meta[CRC_FIELD] = json.dumps(
                {name: f"{crc:08x}" for name, crc in zip(order, crcs, strict=True)},
                separators=(",", ":"),
                ensure_ascii=False,
            )
            described = {name: (e["dtype"], e["shape"], *e["data_offsets"]) for name, e in entries.items()}
            meta[HEADER_CRC_FIELD] = f"{header_digest(described, meta):08x}"
        head = {"__metadata__": meta, **entries} if meta else entries
        raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def checked(head: bytes) -> bytes:
        if len(head) - 8 > MAX_HEADER_BYTES:
            raise ValueError(
                f"the safetensors header would be {len(head) - 8:,} bytes (tensor names and metadata); "
                f"at most {MAX_HEADER_BYTES:,} can be read back; nothing was written"
            )
        return head

    data = [v for v in views if v.nbytes]
    if not checksums:
        return Payload(checked(header(None)), data)
    if offset < _CRC_THREAD_MIN:
        return Payload(checked(header(_crc_all(views))), data)
    # Every CRC prints as exactly 8 hex digits, so the header's size is known before its values.
    size = len(checked(header([0] * len(views))))
    pending = _crc_executor().submit(_crc_all, views)
    return Payload(None, data, head_size=size, finish=lambda: header(pending.result()))


class TensorEntry(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(slots=True)
class Header:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    where: str
    prefix: bytes | memoryview = b""  # the file's first bytes, as read with the header (small files: all)
    # True when ``prefix`` is the whole file in memory that this read alone holds (an object fetched
    # in one GET): tensors are then views of it instead of copies.
    borrow: bool = False
    _checksums: dict[str, int] | None = None

    def checksum(self, name: str) -> int | None:
        """The CRC-32 recorded for tensor ``name``; None for files written without them.

        The first call also checks the header's own CRC (:data:`HEADER_CRC_FIELD`), so a
        verified read never trusts a dtype, shape or offset that changed after writing.
        """
        if self._checksums is None:
            self.check_header()
            self._checksums = {}
            if CRC_FIELD in self.metadata:  # parsed only when asked: plain reads skip it
                try:
                    raw = json.loads(self.metadata[CRC_FIELD])
                    if type(raw) is not dict:
                        raise TypeError("not a JSON object")
                    self._checksums = {k: int(v, 16) for k, v in raw.items()}
                except (AttributeError, TypeError, ValueError, RecursionError) as e:
                    raise _corrupt(self.where, f"bad {CRC_FIELD!r} in __metadata__ ({e})") from None
        return self._checksums.get(name)

    def check_header(self) -> None:
        """Raise :class:`CorruptFileError` if the header's recorded CRC-32 does not match it.

        Files without one (written with ``checksums=False``, by mi_crow 1.0 or by an earlier
        version of this package) are only checked structurally, by :func:`parse_header`.
        """
        recorded = self.metadata.get(HEADER_CRC_FIELD)
        if recorded is None:
            return
        described = {name: (DTYPE_TO_CODE[e.dtype], e.shape, e.begin, e.end) for name, e in self.tensors.items()}
        actual = header_digest(described, self.metadata)
        if recorded != f"{actual:08x}":
            raise _corrupt(
                self.where,
                f"header checksum mismatch: the header (dtypes, shapes, offsets, metadata) has CRC-32 {actual:08x}, "
                f"{recorded} was recorded when it was written",
            )


# The first read of a file asks for this much: the header, and all the data of a small file.
PREFETCH = 64 * 1024


def _corrupt(where: str, why: str) -> CorruptFileError:
    return CorruptFileError(where, why)


def _read_exact(f: BinaryIO, n: int, where: str) -> bytes:
    data = f.read(n)
    if data is None or len(data) != n:
        got = 0 if data is None else len(data)
        raise _corrupt(where, f"expected {n} bytes, found {got}")
    return data


def read_header(f: BinaryIO, where: str) -> Header:
    """Parse and validate the header of the safetensors file open as ``f``.

    Every tensor's byte range is checked against its dtype and shape and against the
    file's size, so a truncated file raises here instead of failing later. A file object
    with a ``whole`` attribute (the entire file as an immutable buffer this read alone holds,
    as ``ObjectStore`` returns) is parsed in place and its tensors borrow that buffer.

    Raises:
        CorruptFileError: If the file is truncated or its header is not valid safetensors.
    """
    whole = getattr(f, "whole", None)
    if isinstance(whole, memoryview):
        return parse_header(whole, len(whole), None, where, borrow=True)
    f.seek(0)
    prefix = f.read(PREFETCH) or b""
    if len(prefix) < PREFETCH:
        return parse_header(prefix, len(prefix), None, where)
    return parse_header(prefix, f.seek(0, 2), f, where)


def parse_header(
    prefix: bytes | memoryview, size: int, rest: BinaryIO | None, where: str, *, borrow: bool = False
) -> Header:
    """:func:`read_header` given the file's first bytes and its size: the format reader needs
    nothing else of a file (no descriptor, no seeks for the size).

    ``rest`` is the open file when ``size`` is more than ``prefix`` holds (its header or data
    are read from it as needed); ``None`` when ``prefix`` is the whole file. ``borrow``: the
    tensors may be views of ``prefix`` (memory no one else holds or changes).
    """
    if rest is None and size != len(prefix):
        raise ValueError(f"parse_header: {len(prefix)} bytes of a {size}-byte file and no file to read the rest")
    if size < 8:
        raise _corrupt(where, f"file is {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or n > size - 8:
        raise _corrupt(
            where, f"truncated or not safetensors: header length {n} exceeds the file size {size} or the 100 MB limit"
        )
    if 8 + n <= len(prefix):
        header_bytes = bytes(prefix[8 : 8 + n])
    else:
        assert rest is not None  # the header lies within the file, which is longer than prefix
        rest.seek(8)
        header_bytes = _read_exact(rest, n, where)
    try:
        raw = json.loads(header_bytes.decode("utf-8"))
    except RecursionError:
        raise _corrupt(where, f"header JSON is nested too deeply (the store writes at most {MAX_JSON_DEPTH})") from None
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, an integer of more than 4300 digits
        raise _corrupt(where, f"header is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise _corrupt(where, "header is not a JSON object")
    data_len = size - 8 - n
    metadata = raw.pop("__metadata__", None) or {}
    if type(metadata) is not dict:
        raise _corrupt(where, "__metadata__ is not a map of strings")
    for v in metadata.values():  # plain loops: this runs once per file read (a few us in all)
        if type(v) is not str:
            raise _corrupt(where, "__metadata__ is not a map of strings")
    tensors: dict[str, TensorEntry] = {}
    for name, info in raw.items():
        try:
            if type(info) is not dict:
                raise TypeError("not a JSON object")
            dtype = CODE_TO_DTYPE[info["dtype"]]
            raw_shape = info["shape"]
            if type(raw_shape) is not list or len(raw_shape) > MAX_NDIM:
                raise ValueError(f"shape must be a list of at most {MAX_NDIM} dimensions")
            shape = tuple(raw_shape)
            begin, end = info["data_offsets"]  # anything but two items raises
            if type(begin) is not int or type(end) is not int:
                raise ValueError("non-integer data offsets")
            # Exact type checks (JSON gives int, never bool): a shape of ints >= 0 only, whose extent
            # (zero dimensions counted as 1, as torch's strides are) times the element size fits int64.
            nbytes = extent = dtype.itemsize
            for d in shape:
                if type(d) is not int or d < 0:
                    raise ValueError("negative or non-integer dimension")
                nbytes *= d
                extent *= d or 1
            if extent > _MAX_TENSOR_BYTES:
                raise ValueError("the shape's extent does not fit int64")
        except (KeyError, TypeError, ValueError) as e:
            shown = repr(info)
            raise _corrupt(where, f"bad header entry for tensor {name!r}: {shown[:200]} ({e})") from None
        if end - begin != nbytes or begin < 0:
            raise _corrupt(where, f"tensor {name!r} has offsets {begin}..{end} but needs {nbytes} bytes")
        if end > data_len:
            raise _corrupt(where, f"truncated: tensor {name!r} ends at byte {end} of a {data_len}-byte data section")
        tensors[name] = TensorEntry(dtype, shape, begin, end)
    return Header(tensors, metadata, 8 + n, where, prefix, borrow)


def _map_tensor(f: BinaryIO, header: Header, entry: TensorEntry) -> torch.Tensor | None:
    """Map the tensor's bytes copy-on-write (MAP_PRIVATE); ``None`` if ``f`` is not a real file.

    The header was checked against the file's size before this is called, so the mapping
    never extends past the end of the file. A private mapping keeps the file's pages even
    when the file is later replaced by rename or deleted, and the caller's writes to the
    tensor never reach the file.
    """
    try:
        fd = f.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    start = header.data_start + entry.begin
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(fd, header.data_start + entry.end - aligned, access=mmap.ACCESS_COPY, offset=aligned)
    numel = math.prod(entry.shape)
    return torch.frombuffer(mapped, dtype=entry.dtype, count=numel, offset=start - aligned).reshape(entry.shape)


def _read_into_new(f: BinaryIO | None, entry: TensorEntry, start: int, name: str, where: str) -> torch.Tensor:
    out = torch.empty(entry.shape, dtype=entry.dtype)
    nbytes = entry.end - entry.begin
    if nbytes and f is not None:
        view = tensor_bytes(out)
        f.seek(start)
        done = 0
        while done < nbytes:
            got = f.readinto(view[done:])  # type: ignore[attr-defined]  # BinaryIO's stub lacks it
            if not got:
                raise _corrupt(where, f"tensor {name!r} ends after {done} of {nbytes} bytes")
            done += got
    return out


def read_tensor(
    f: BinaryIO | None, header: Header, name: str, where: str, *, verify: bool = False, mmap_min: int | None = None
) -> torch.Tensor:
    """Read tensor ``name`` of the file ``f`` into a new CPU tensor.

    Tensors of at least ``mmap_min`` bytes in a real file are memory-mapped copy-on-write
    (pages are read when touched, nothing is copied); others are read with one ``readinto``
    into newly allocated memory. Either way the result is independent of the file: writes to
    it never reach the file, and a later overwrite or deletion of the file never changes it.

    With ``verify``, the bytes are checked against the CRC-32 recorded at write time (files
    without one, such as mi_crow 1.0's, are only checked for size).

    Raises:
        CorruptFileError: If the file is truncated, or with ``verify`` if the checksum differs.
    """
    try:
        entry = header.tensors[name]
    except KeyError:
        raise _corrupt(where, f"no tensor named {name!r} (it has {sorted(header.tensors)})") from None
    nbytes = entry.end - entry.begin
    start = header.data_start + entry.begin
    out = _map_tensor(f, header, entry) if f is not None and mmap_min is not None and nbytes >= mmap_min else None
    if out is None and nbytes and start + nbytes <= len(header.prefix):
        view = memoryview(header.prefix)[start : start + nbytes]
        if header.borrow:  # the whole object, held by this read alone: a view, no copy
            with warnings.catch_warnings():
                # The buffer is flagged read-only because the client hands it out so; no one else
                # holds it, so writes to the tensor change nothing but the tensor.
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                out = torch.frombuffer(view, dtype=entry.dtype)
        else:  # already read with the header: one copy into memory the tensor owns
            out = torch.frombuffer(bytearray(view), dtype=entry.dtype)
        if len(entry.shape) != 1:
            out = out.reshape(entry.shape)
    if out is None and nbytes and f is not None:
        borrow = getattr(f, "borrow_range", None)  # a ranged read whose buffer the tensor may keep
        borrowed = borrow(start, start + nbytes) if borrow is not None else None
        if borrowed is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                out = torch.frombuffer(borrowed, dtype=entry.dtype)
            if len(entry.shape) != 1:
                out = out.reshape(entry.shape)
    if out is None:
        if f is None and nbytes:  # pragma: no cover - parse_header checked the data lies in prefix
            raise _corrupt(where, f"tensor {name!r} lies beyond the bytes read")
        out = _read_into_new(f, entry, start, name, where)
    expected = header.checksum(name) if verify else None
    if expected is not None:
        crc = crc32(tensor_bytes(out))
        if crc != expected:
            raise _corrupt(
                where,
                f"checksum mismatch: tensor {name!r} has CRC-32 {crc:08x}, "
                f"{expected:08x} was recorded when it was written",
            )
    return out


def read_all(
    f: BinaryIO, where: str, *, verify: bool = False, mmap_min: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor of a file and its ``__metadata__``; names sorted, as safetensors does."""
    header = read_header(f, where)
    if verify:
        header.check_header()  # also for a file without tensors
    in_file_order = sorted(header.tensors, key=lambda k: header.tensors[k].begin)
    loaded = {name: read_tensor(f, header, name, where, verify=verify, mmap_min=mmap_min) for name in in_file_order}
    return {name: loaded[name] for name in sorted(loaded)}, header.metadata
