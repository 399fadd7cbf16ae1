"""Reusable byte buffers for the streaming paths.

Fresh large buffers cost the kernel a page fault and a page clear per 4 KiB every time (measured: a fifth of all
CPU time of a bf16 -> f16 conversion). Readers take their buffers from POOL, and the pipeline gives them back
once a tensor's bytes are consumed, so a conversion touches the same few hundred MB over and over.
The pool never holds more than the pipeline had outstanding at its peak: a request that no free buffer can
hold drops the free buffers that are too small before allocating.
"""
from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

from ..core import names
from ..core.tensors import dense_nbytes
from ..core.transforms import hf_to_meta_rope, rope_heads

MIN_POOLED = 1 << 20  # smaller requests are plain allocations


class BufferPool:
    def __init__(self):
        self._lock = threading.Lock()
        self._free: list[np.ndarray] = []
        # data address -> buffer handed out; weak, so a buffer nobody gives back is simply freed
        self._out: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 array of exactly nbytes (a prefix of a pooled buffer); contents are undefined."""
        if nbytes < MIN_POOLED:
            return np.empty(nbytes, dtype=np.uint8)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.size >= nbytes]
            if fits:
                buf = self._free.pop(min(fits, key=lambda i: self._free[i].size))
            else:
                self._free.clear()  # all too small: let them go rather than grow the pool
                buf = np.empty(max(nbytes, 1), dtype=np.uint8)
            self._out[buf.ctypes.data] = buf
        return buf[:nbytes]

    def give(self, obj) -> None:
        """Return the buffer under `obj` (numpy array or torch tensor starting at a taken buffer) to the pool.

        Only call this when nothing else refers to the data. Anything not taken from the pool is ignored."""
        addr = obj.data_ptr() if hasattr(obj, "data_ptr") else obj.ctypes.data
        with self._lock:
            buf = self._out.pop(addr, None)
            if buf is not None:
                self._free.append(buf)

    def owns(self, obj) -> bool:
        """Whether `obj` starts at a buffer handed out by this pool and not given back."""
        addr = obj.data_ptr() if hasattr(obj, "data_ptr") else obj.ctypes.data
        with self._lock:
            return addr in self._out


POOL = BufferPool()


def pooled_tensor(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor whose storage comes from POOL."""
    n = dense_nbytes(shape, dtype)
    if n == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(POOL.take(n), dtype=dtype).view(tuple(shape))


def give_source(src: torch.Tensor, result) -> None:
    """Return a loaded source tensor's buffer to POOL once `result` (a tensor or array made from it) exists,
    unless `result` is that very buffer (a same-dtype write passes the source through)."""
    addr = result.data_ptr() if hasattr(result, "data_ptr") else result.ctypes.data
    if src.data_ptr() != addr:
        POOL.give(src)


def cast_for_write(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A loaded tensor as `dtype`, for a writer that gives the result back to POOL once written.

    Consumes w: narrowing casts (bf16 or f32 -> f16) of a pooled buffer run in place, so a cast never needs a
    second copy of the tensor; other casts write into a pooled buffer and give w's back. The caller must hold the
    only reference to `w` (a writer job's freshly loaded tensor) and not give it back itself."""
    from ..native import IN_PLACE_CASTS, cast_tensor
    if w.dtype == dtype:
        return w.contiguous()
    if (w.dtype, dtype) in IN_PLACE_CASTS and w.is_contiguous() and POOL.owns(w):
        head = w.reshape(-1).view(torch.uint8)[: w.numel() * dtype.itemsize]  # the buffer's first bytes
        return cast_tensor(w, dtype, head.view(dtype).view(w.shape))
    out = cast_tensor(w, dtype, pooled_tensor(w.shape, dtype))
    give_source(w, out)
    return out


def load_meta_order(t, spec) -> torch.Tensor:
    """Load the canonical LazyTensor `t` for a Meta-order layout (Mistral, GGUF) of a model with ModelSpec `spec`:
    q/k get the rotary permutation, and the buffer they were loaded into goes back to POOL."""
    heads = rope_heads(names.parse(t.name)[0].key, spec)
    w = t.load()
    if not heads:
        return w
    out = hf_to_meta_rope(w, heads)
    give_source(w, out)
    return out
