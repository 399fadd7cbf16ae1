"""An output file written with O_DIRECT from a background thread, through two aligned staging buffers.

Buffered writes of a multi-GB output cost as much CPU as the conversion itself (the kernel copies every byte into
freshly allocated page-cache pages: a third of all CPU time of a bf16 -> f16 conversion) and get throttled once
dirty pages pile up. With O_DIRECT the disk reads our staging buffer itself, while the caller fills the other one.
Where the file system refuses O_DIRECT (tmpfs, some network file systems) it falls back to a plain file.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading

import numpy as np

ALIGN = 4096
STAGE = 16 << 20  # bytes per staging buffer


class DirectFile:
    """write(bytes-like) appends; close() writes the tail and trims the file to its exact length.

    A write error in the background thread (ENOSPC, EIO) is raised by the next write() or close()."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            self.direct = True
        except OSError:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.direct = False
        self._bufs = [_aligned(STAGE), _aligned(STAGE)]
        self._cur, self._fill, self._offset = 0, 0, 0  # staging buffer in use, bytes in it, file offset of it
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        done = 0
        while done < mv.nbytes:
            n = min(STAGE - self._fill, mv.nbytes - done)
            self._bufs[self._cur][self._fill:self._fill + n] = np.frombuffer(mv[done:done + n], dtype=np.uint8)
            self._fill += n
            done += n
            if self._fill == STAGE:
                self._flush(STAGE)
        return mv.nbytes

    def _flush(self, nbytes: int) -> None:
        """Hand the current staging buffer (nbytes, a multiple of ALIGN) to the writer thread; switch buffers."""
        self._wait()
        buf, offset = self._bufs[self._cur], self._offset
        self._thread = threading.Thread(target=self._pwrite, args=(buf, nbytes, offset), daemon=True)
        self._thread.start()
        self._cur, self._fill, self._offset = 1 - self._cur, 0, offset + nbytes

    def _pwrite(self, buf: np.ndarray, nbytes: int, offset: int) -> None:
        try:
            view, done = memoryview(buf)[:nbytes], 0
            while done < nbytes:
                try:
                    done += os.pwrite(self.fd, view[done:], offset + done)
                except OSError as exc:  # a device wanting larger alignment: continue without O_DIRECT
                    if exc.errno != errno.EINVAL or not self.direct:
                        raise
                    fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    self.direct = False
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            self._error = exc

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            size = self._offset + self._fill
            tail = -self._fill % ALIGN if self.direct else 0
            if self._fill:
                self._bufs[self._cur][self._fill:self._fill + tail] = 0
                self._flush(self._fill + tail)
            self._wait()
            if tail:
                os.ftruncate(self.fd, size)
        finally:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        """Stop without finishing (the caller removes the file); errors of the pending write are dropped."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._error = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):  # a writer abandoned by an exception closes its descriptor
        if getattr(self, "fd", -1) >= 0:
            self.abort()


def _aligned(nbytes: int) -> np.ndarray:
    """An ALIGN-aligned, page-backed uint8 buffer (anonymous memory maps are page aligned)."""
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)
