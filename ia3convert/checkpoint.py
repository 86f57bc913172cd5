"""Lazy reader and streaming writer of transformers checkpoints (safetensors, one file or sharded).

The reader parses safetensors headers itself (a few KB per file) and reads one tensor at a time, so that a
70B checkpoint costs no more memory to open than a tiny one. Raw bytes of a tensor can be copied unchanged,
which keeps untouched tensors byte-identical to the base.

The writer plans every shard's header before any data is written (all output shapes and dtypes are known
from the merge plan), then writes each tensor at its offset as it is produced: at no time does it hold more
than the tensor it is given, never a whole shard.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, OutputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAP_MIN = 1 << 20  # tensors from this size up are memory-mapped by ``CheckpointReader.get``
# errno values of copy_file_range meaning "not between these files here": fall back to read and write.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on header size

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype (safetensors name), shape and absolute byte range."""

    key: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors file's header: its tensors and its metadata. Checks every offset against the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file", hint="the file is truncated")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: header length {header_len} exceeds the file",
                                      hint="the file is truncated or not safetensors")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})", hint="check the file") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: header is not valid JSON",
                              hint="the file is damaged; download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object", hint="the file is damaged")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for {key!r}", hint="the file is damaged") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}",
                                  hint="ia3convert reads float, int8 and uint8 checkpoints")
        expected = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != expected or begin < 0 \
                or base + end > size:
            raise CheckpointError(f"{path}: tensor {key!r} has offsets outside the file or of the wrong size",
                                  hint="the file is truncated or damaged; download it again")
        tensors[key] = TensorInfo(key, path, dtype, shape, base + begin, base + end)
    return tensors, metadata


class CheckpointReader:
    """A base model directory: its config and its tensors, read one at a time.

    Accepts ``model.safetensors``, or shards listed in ``model.safetensors.index.json``. ``bytes_read``
    counts the tensor bytes read so far by ``get``, ``raw`` and ``copy_to`` (headers and configs are not counted).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.bytes_read = 0
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: does not exist", hint="give a model directory or a Hub repo id")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: is a file, not a model directory",
                                  hint="give the directory that holds config.json")
        config_file = self.path / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: has no config.json",
                                  hint="give a model directory saved by transformers") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{config_file}: cannot be read ({exc})", hint="fix or re-save the config") from None
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            tensors, _ = read_header(file)
            self.tensors.update(tensors)

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: cannot be read ({exc})", hint="fix or re-save the index") from None
            files = [self.path / n for n in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{self.path}: shard {missing[0]} listed in the index is missing",
                                      hint="download the complete checkpoint")
            return files
        single = self.path / SINGLE_NAME
        if single.is_file():
            return [single]
        if list(self.path.glob("*.bin")):
            raise CheckpointError(f"{self.path}: only PyTorch .bin weights",
                                  hint="convert the checkpoint to safetensors (save_pretrained does by default)")
        raise CheckpointError(f"{self.path}: no model.safetensors or {INDEX_NAME}",
                              hint="give a model directory saved by transformers")

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        return self.config.get("quantization_config")

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str) -> torch.Tensor:
        """One tensor. From ``MAP_MIN`` bytes up, a copy-on-write memory map of just its byte range: nothing is
        copied, only the pages a computation touches are read (a sampled check reads a few rows of a large
        layer), and the mapping goes, with its pages, when the tensor is dropped, so that mapped memory never
        exceeds the tensors in use. Smaller tensors are read into their own memory."""
        info = self.tensors[key]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        if info.nbytes >= MAP_MIN:
            self.bytes_read += info.nbytes
            return self._mapped(key, info)
        buffer = bytearray(info.nbytes)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            if f.readinto(buffer) != info.nbytes:
                raise CheckpointError(f"{info.file}: ended early while reading {key}",
                                      hint="the file changed or is truncated")
        self.bytes_read += info.nbytes
        return torch.frombuffer(buffer, dtype=info.torch_dtype).reshape(info.shape)

    @staticmethod
    def _mapped(key: str, info: TensorInfo) -> torch.Tensor:
        start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        try:
            with open(info.file, "rb") as f:
                region = mmap.mmap(f.fileno(), info.end - start, access=mmap.ACCESS_COPY, offset=start)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{info.file}: cannot map {key} ({exc})",
                                  hint="the file changed or is truncated") from None
        count = math.prod(info.shape)
        return torch.frombuffer(region, dtype=info.torch_dtype, count=count,
                                offset=info.start - start).reshape(info.shape)

    def copy_to(self, writers: list[StreamingWriter], key: str) -> None:
        """Copy a stored tensor, unchanged, into every writer from one read (counted in ``bytes_read``)."""
        info = self.tensors[key]
        copy_tensor(writers, key, info)
        self.bytes_read += info.nbytes

    def raw(self, key: str) -> bytes:
        """The tensor's bytes exactly as stored."""
        info = self.tensors[key]
        with open(info.file, "rb") as f:
            f.seek(info.start)
            data = f.read(info.nbytes)
        self.bytes_read += len(data)
        return data

    def other_files(self) -> list[Path]:
        """Every file of the directory that is not weights, index or config (tokenizer, generation config...)."""
        skip = {INDEX_NAME, "config.json", *(f.name for f in self.files)}
        return sorted(p for p in self.path.iterdir()
                      if p.is_file() and p.name not in skip and not p.name.startswith(".")
                      and not p.name.endswith((".safetensors", ".bin")) and p.name != "merge_report.json")


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, as transformers reads max_shard_size."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise OutputError(f"max shard size {text!r} is not a size", hint="write it like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    if unit not in powers:
        raise OutputError(f"max shard size {text!r} has an unknown unit", hint="use B, KB, MB, GB, KiB, MiB or GiB")
    return int(number * powers[unit])


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor whose dtype and shape are known before its data exists.

    A ``deferred`` tensor is a small 1-D uint8 tensor whose length is only known once computed (bitsandbytes'
    quant-state JSON): it is planned at ``max_bytes``, kept in memory when written, and placed at the end of
    its shard when the shard is finished.
    """

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    max_bytes: int | None = None

    @property
    def deferred(self) -> bool:
        return self.max_bytes is not None

    @property
    def nbytes(self) -> int:
        if self.max_bytes is not None:
            return self.max_bytes
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class _Shard:
    name: str
    fixed: list[PlannedTensor] = field(default_factory=list)
    deferred: list[PlannedTensor] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)
    fixed_size: int = 0
    header_room: int = 0


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write of an output file (disk full, file too large, read-only) into ``OutputError``."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc})",
                          hint="free some disk space or choose another output location") from None


def _header(entries: list[tuple[PlannedTensor, int, int, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    for item, begin, end, shape in entries:
        header[item.key] = {"dtype": DTYPE_NAMES[item.dtype], "shape": list(shape), "data_offsets": [begin, end]}
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


class StreamingWriter:
    """Writes planned tensors into sharded safetensors files, one tensor at a time, in any order.

    Shards are filled in plan order up to ``max_shard_size`` (a tensor larger than that gets a shard of its
    own, as transformers does). Each shard's header is written first with room for the final one (deferred
    tensors planned at their largest), and rewritten, space-padded as safetensors itself pads, on ``close``,
    which also checks that every planned tensor was written and writes the index.

    Writes are positional and run on a background I/O thread, so the next tensor is computed while the last
    one goes to disk; at most ``IN_FLIGHT`` bytes of given tensors wait there. A failed write surfaces as
    ``OutputError`` at a later ``write`` or at ``close``.
    """

    IN_FLIGHT = 64 * 1024 * 1024

    def __init__(self, out_dir: Path, plan: Iterable[PlannedTensor], max_shard_size: int,
                 metadata: dict[str, str] | None = None) -> None:
        self.out_dir = out_dir
        self.metadata = metadata or {"format": "pt"}
        self.plan = {p.key: p for p in plan}
        groups: list[list[PlannedTensor]] = [[]]
        size = 0
        for item in self.plan.values():
            if groups[-1] and size + item.nbytes > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += item.nbytes
        count = len(groups)
        self.shards: list[_Shard] = []
        self.where: dict[str, _Shard] = {}
        for number, group in enumerate(groups, start=1):
            shard = _Shard(SINGLE_NAME if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors")
            shard.fixed = [p for p in group if not p.deferred]
            shard.deferred = [p for p in group if p.deferred]
            offset = 0
            entries = []
            for item in shard.fixed + shard.deferred:
                shard.offsets[item.key] = offset
                shape = (item.max_bytes,) if item.deferred else item.shape
                entries.append((item, offset, offset + item.nbytes, shape))
                offset += item.nbytes
                self.where[item.key] = shard
            shard.fixed_size = sum(p.nbytes for p in shard.fixed)
            room = len(_header(entries, self.metadata))
            shard.header_room = room + (-(8 + room) % 8)  # data starts 8-byte aligned, as safetensors writes
            self.shards.append(shard)
        self._written: set[str] = set()
        self._small: dict[str, bytes] = {}
        self._fds: dict[str, int] = {}
        self._pending: deque[tuple[Future, int]] = deque()
        self._in_flight = 0
        try:
            for s in self.shards:
                with writing(out_dir / s.name):
                    self._fds[s.name] = os.open(out_dir / s.name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
                    os.ftruncate(self._fds[s.name], 8 + s.header_room + s.fixed_size)
        except OutputError:
            self.abort()
            raise

    def _slot(self, key: str, nbytes: int) -> tuple[int, Path, int]:
        """(file descriptor, path, absolute offset) where the planned fixed-size tensor ``key`` goes."""
        planned = self.plan.get(key)
        if planned is None or key in self._written or planned.deferred or planned.nbytes != nbytes:
            raise ValueError(f"{key}: cannot be copied as planned")
        shard = self.where[key]
        return self._fds[shard.name], self.out_dir / shard.name, 8 + shard.header_room + shard.offsets[key]

    def write(self, key: str, data: torch.Tensor | bytes) -> None:
        """Write one planned tensor (or its raw bytes) at its place; the tensor must not change afterwards."""
        planned = self.plan.get(key)
        if planned is None or key in self._written:
            raise ValueError(f"{key}: not planned or written twice")
        if isinstance(data, torch.Tensor):
            shape_ok = data.dim() == 1 if planned.deferred else tuple(data.shape) == planned.shape
            if data.dtype != planned.dtype or not shape_ok:
                raise ValueError(f"{key}: planned {planned.dtype} {planned.shape}, got {data.dtype} "
                                 f"{tuple(data.shape)}")
            view = _tensor_view(data)
        else:
            view = memoryview(data)
        if planned.deferred:
            if view.nbytes > planned.nbytes:
                raise ValueError(f"{key}: {view.nbytes} bytes, more than the {planned.nbytes} planned")
            self._small[key] = bytes(view)
        else:
            if view.nbytes != planned.nbytes:
                raise ValueError(f"{key}: planned {planned.nbytes} bytes, got {view.nbytes}")
            fd, path, offset = self._slot(key, planned.nbytes)
            self.submit(lambda: _pwrite(fd, path, view, offset), view.nbytes)
        self._written.add(key)

    def submit(self, job: Callable[[], None], nbytes: int = 0) -> Future:
        """Run ``job`` (I/O on this writer's files) on the I/O thread, after every job submitted before it;
        ``nbytes``: the memory it keeps alive until done. Raises the error of any failed earlier job."""
        self._collect(block=False)
        while self._pending and self._in_flight + nbytes > self.IN_FLIGHT:
            self._collect(block=True)
        future = _io_thread().submit(job)
        self._pending.append((future, nbytes))
        self._in_flight += nbytes
        return future

    def _collect(self, block: bool) -> None:
        """Retire finished jobs (with ``block``, at least the oldest), raising the first failure."""
        while self._pending and (block or self._pending[0][0].done()):
            future, nbytes = self._pending.popleft()
            self._in_flight -= nbytes
            block = False
            future.result()

    def close(self) -> list[str]:
        """Finish the files and write the index (when sharded); returns the shard file names."""
        missing = [k for k in self.plan if k not in self._written]
        if missing:
            self.abort()
            raise ValueError(f"tensors planned but never written: {missing[:5]}")
        try:
            while self._pending:
                self._collect(block=True)
            with writing(self.out_dir):
                return self._finish()
        except BaseException:
            self.abort()
            raise

    def _finish(self) -> list[str]:
        total = 0
        weight_map = {}
        for shard in self.shards:
            entries = [(p, shard.offsets[p.key], shard.offsets[p.key] + p.nbytes, p.shape) for p in shard.fixed]
            offset = shard.fixed_size
            fd, path = self._fds[shard.name], self.out_dir / shard.name
            for item in shard.deferred:
                data = self._small[item.key]
                entries.append((item, offset, offset + len(data), (len(data),)))
                _pwrite(fd, path, memoryview(data), 8 + shard.header_room + offset)
                offset += len(data)
            header = _header(entries, self.metadata)
            if len(header) > shard.header_room:
                raise ValueError(f"{shard.name}: header outgrew its room")
            os.ftruncate(fd, 8 + shard.header_room + offset)
            head = struct.pack("<Q", shard.header_room) + header + b" " * (shard.header_room - len(header))
            _pwrite(fd, path, memoryview(head), 0)
            os.close(self._fds.pop(shard.name))
            total += offset
            weight_map.update({p.key: shard.name for p in shard.fixed + shard.deferred})
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [s.name for s in self.shards]

    def abort(self) -> None:
        """Wait for the queued I/O (a copy may feed other writers too), then close every file without finishing
        it (the caller removes them); errors are ignored."""
        while self._pending:
            future, _ = self._pending.popleft()
            with suppress(Exception):
                future.result()
        self._in_flight = 0
        for fd in self._fds.values():
            with suppress(OSError):
                os.close(fd)
        self._fds.clear()


_IO: ThreadPoolExecutor | None = None
_IO_LOCK = threading.Lock()


def _io_thread() -> ThreadPoolExecutor:
    """The process's one I/O thread: writes and copies run there in submission order while Python computes
    (file I/O releases the GIL)."""
    global _IO
    with _IO_LOCK:
        if _IO is None:
            _IO = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ia3convert-io")
        return _IO


def _pwrite(fd: int, path: Path, data: memoryview, offset: int) -> None:
    with writing(path):
        data = data.cast("B")
        while data:
            done = os.pwrite(fd, data, offset)
            data, offset = data[done:], offset + done


_KERNEL_COPY = [hasattr(os, "copy_file_range")]  # cleared when the file systems here refuse it


def _copy_range(src: int, src_path: Path, start: int, dst: int, dst_path: Path, offset: int, nbytes: int,
                key: str, chunk: int = 16 * 1024 * 1024) -> None:
    """Copy ``nbytes`` from ``src`` at ``start`` to ``dst`` at ``offset``: inside the kernel where the file
    systems allow (no user-space buffer at all), else through one reused buffer of ``chunk`` bytes."""
    done = 0
    if _KERNEL_COPY[0]:
        try:
            while done < nbytes:
                n = os.copy_file_range(src, dst, nbytes - done, start + done, offset + done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise OutputError(f"{dst_path}: cannot be written ({exc.strerror or exc})",
                                  hint="free some disk space or choose another output location") from None
            _KERNEL_COPY[0] = False
    buffer = memoryview(bytearray(min(chunk, max(nbytes - done, 1))))
    while done < nbytes:
        n = os.preadv(src, [buffer[: min(len(buffer), nbytes - done)]], start + done)
        if n == 0:
            break
        _pwrite(dst, dst_path, buffer[:n], offset + done)
        done += n
    if done < nbytes:
        raise CheckpointError(f"{src_path}: ended early while copying {key}", hint="the file changed or is truncated")


def copy_tensor(writers: list[StreamingWriter], key: str, source: TensorInfo) -> None:
    """Copy a stored tensor's bytes unchanged into several writers: the base is read once, into the first
    writer's file, and the others copy from there (a batch writes every adapter's output from one read)."""
    slots = [w._slot(key, source.nbytes) for w in writers]

    def job() -> None:
        src = os.open(source.file, os.O_RDONLY)
        try:
            _copy_range(src, source.file, source.start, *slots[0], source.nbytes, key)
        finally:
            os.close(src)
        first_fd, first_path, first_offset = slots[0]
        for fd, path, offset in slots[1:]:
            _copy_range(first_fd, first_path, first_offset, fd, path, offset, source.nbytes, key)

    # Queued on every writer's list: each one's close (or abort) waits for it.
    future = writers[0].submit(job)
    for w in writers[1:]:
        w._pending.append((future, 0))
    for w in writers:
        w._written.add(key)


def _tensor_view(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes in little-endian row-major order (what safetensors stores), without a copy when the
    tensor is contiguous on the CPU."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if not flat.numel():
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def copy_file(src: Path, dst: Path, chunk: int = 16 * 1024 * 1024) -> None:
    """Copy in large blocks (no metadata: the output is a new file)."""
    with open(src, "rb") as fin, writing(dst), open(dst, "wb") as fout:
        while block := fin.read(chunk):
            fout.write(block)


def fsync_dir(path: Path) -> None:
    """Make a rename durable where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
