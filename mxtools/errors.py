"""Exception types raised by the library. Only the CLI turns them into messages and exit codes."""


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


class MissingTensorError(MxError):
    """Tensors are missing from, or unexpected in, a checkpoint."""


class ShapeError(MxError):
    """A tensor has a shape or dtype that does not fit the model's config."""


class UnsafePickleError(MxError):
    """A torch pickle carries code or objects beyond plain tensors."""


class OutputError(MxError):
    """An output cannot be written (exists, would overwrite an input, disk full)."""
