"""An output file written with O_DIRECT by background threads, through a few aligned staging buffers.

Buffered writes of a multi-GB output cost as much CPU as the conversion itself (the kernel copies every byte into
freshly allocated page-cache pages: a third of all CPU time of a bf16 -> f16 conversion) and get throttled once
dirty pages pile up. With O_DIRECT the disk reads our staging buffers itself, while the caller fills another one.
Where the file system refuses O_DIRECT (tmpfs, some network file systems) it falls back to a plain file.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ALIGN = 4096
STAGE = 16 << 20  # bytes per staging buffer
IN_FLIGHT = 4  # writes outstanding at once


class DirectFile:
    """write(bytes-like) appends; close() writes the tail and trims the file to its exact length.

    Filled staging buffers are written by IN_FLIGHT threads at once (this VM's disk takes 1.2 GB/s with one
    outstanding write, 1.6 GB/s with two, 1.85 GB/s with four). A write error in the background (ENOSPC, EIO)
    is raised by the next write() or close()."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            self.direct = True
        except OSError:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.direct = False
        self._pool = ThreadPoolExecutor(IN_FLIGHT)
        self._free = [_aligned(STAGE) for _ in range(IN_FLIGHT + 1)]
        self._busy: deque = deque()  # (buffer, future) of writes in flight, oldest first
        self._buf = self._free.pop()
        self._fill, self._offset = 0, 0  # bytes in the current buffer, file offset where it goes

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        done = 0
        while done < mv.nbytes:
            n = min(STAGE - self._fill, mv.nbytes - done)
            self._buf[self._fill:self._fill + n] = np.frombuffer(mv[done:done + n], dtype=np.uint8)
            self._fill += n
            done += n
            if self._fill == STAGE:
                self._flush(STAGE)
        return mv.nbytes

    def _flush(self, nbytes: int) -> None:
        """Queue the current buffer (nbytes, a multiple of ALIGN unless it is the tail) and take a free one."""
        self._busy.append((self._buf, self._pool.submit(self._pwrite, self._buf, nbytes, self._offset)))
        self._offset += nbytes
        self._fill = 0
        if not self._free:
            self._reap()
        self._buf = self._free.pop()

    def _reap(self) -> None:
        """Wait for the oldest write; its buffer becomes free. Raises that write's error."""
        buf, fut = self._busy.popleft()
        self._free.append(buf)
        fut.result()

    def _pwrite(self, buf: np.ndarray, nbytes: int, offset: int) -> None:
        view, done = memoryview(buf)[:nbytes], 0
        while done < nbytes:
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as exc:  # a device wanting larger alignment: continue without O_DIRECT
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            size = self._offset + self._fill
            tail = -self._fill % ALIGN if self.direct else 0
            if self._fill:
                self._buf[self._fill:self._fill + tail] = 0
                self._flush(self._fill + tail)
            while self._busy:
                self._reap()
            if tail:
                os.ftruncate(self.fd, size)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop without finishing (the caller removes the file); errors of pending writes are dropped."""
        self._pool.shutdown(wait=True)
        self._busy.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):  # a writer abandoned by an exception closes its descriptor
        if getattr(self, "fd", -1) >= 0:
            self.abort()


def _aligned(nbytes: int) -> np.ndarray:
    """An ALIGN-aligned, page-backed uint8 buffer (anonymous memory maps are page aligned)."""
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)
