"""Exception types raised by the library. Only the CLI turns them into messages and exit codes."""
from __future__ import annotations

import contextlib


class MxError(Exception):
    """Base error: a problem with the user's input or environment, reported in one line."""

    def __init__(self, message: str, file=None, tensor=None):
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        self.message = message
        super().__init__(self.line())

    def line(self) -> str:
        where = [w for w in (self.file, self.tensor and f"tensor {self.tensor}") if w]
        return f"{': '.join(where)}: {self.message}" if where else self.message


class FormatError(MxError):
    """A file is truncated, corrupt, or not in the format it claims to be."""


class LayoutError(MxError):
    """A directory or file is not a layout mxtools recognises."""


class NotMixtralError(MxError):
    """The model is readable but is not a Mixtral-architecture model."""


class TensorSetError(MxError):
    """A checkpoint's set of tensors is not the model's: some are missing, or some are unexpected."""


class ShapeError(MxError):
    """A tensor has a shape or dtype that does not fit the model's config."""


class NonFiniteError(MxError):
    """A weight holds NaN or infinite values where the output cannot represent them (block quants, GPTQ)."""


class UnsafePickleError(MxError):
    """A pickle (torch's or Paddle's) carries code or objects beyond plain tensors."""


class OutputError(MxError):
    """An output cannot be written (exists, would overwrite an input, disk full)."""


@contextlib.contextmanager
def reading(path, tensor=None):
    """The second line of defence around a reader: an unexpected exception raised while reading `path` becomes
    a FormatError naming it (readers check what they read first; this catches only what they missed).
    OSError, MemoryError and Ctrl-C pass through unchanged."""
    try:
        yield
    except (MxError, OSError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # any other failure while parsing means the file is corrupt
        raise FormatError(f"corrupt or unreadable file ({type(exc).__name__}: {exc})", file=path,
                          tensor=tensor) from exc
