"""Positional reads into pooled buffers, so reading a tensor never maps (and keeps resident) a whole shard."""
from __future__ import annotations

import os

import numpy as np
import torch

from ..core.errors import FormatError
from .buffers import POOL


class RawFile:
    """A file read by offset with pread; thread-safe, releases the GIL while reading."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise FormatError(f"cannot open: {exc.strerror}", file=path) from None
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, nbytes: int, tensor=None) -> np.ndarray:
        """Exactly `nbytes` from `offset` as a uint8 array (from POOL); a short read is a truncated file."""
        if offset + nbytes > self.size:
            raise FormatError(f"file is truncated: needs {offset + nbytes} bytes, has {self.size}",
                              file=self.path, tensor=tensor)
        buf = POOL.take(nbytes)
        view, done = memoryview(buf), 0
        while done < nbytes:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise FormatError("unexpected end of file", file=self.path, tensor=tensor)
            done += n
        return buf

    def read_tensor(self, offset, nbytes, dtype: torch.dtype, shape, tensor=None) -> torch.Tensor:
        buf = self.read(offset, nbytes, tensor)
        if nbytes == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).view(tuple(shape))

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_MADV_DONTNEED = 4


def release_pages(t: torch.Tensor) -> None:
    """Drop the resident pages of a memory-mapped tensor (they are re-read from the file if touched again),
    so streaming through a mapped checkpoint does not accumulate resident memory."""
    import ctypes
    import mmap as _mmap
    nbytes = t.numel() * t.element_size()
    if nbytes < _mmap.PAGESIZE:
        return
    start = t.data_ptr() - t.data_ptr() % _mmap.PAGESIZE
    end = t.data_ptr() + nbytes
    end -= end % _mmap.PAGESIZE
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
