"""A checkpoint's Hugging Face `tokenizer.json` (the fast tokenizer), for checkpoints that carry no
`tokenizer.model`: text is tokenized by the `tokenizers` library (a dependency of mxtools), as transformers
and vLLM tokenize it.

When the file's vocabulary is the Mixtral v1 one piece for piece, the tokenizer also carries the v1 SentencePiece
model, so everything that needs one (GGUF and HF writers, the chat-template check) works as with a
`tokenizer.model`; with any other vocabulary those refuse with a one-line error, and encoding still works.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .errors import FormatError
from .tokenizer import MAX_MODEL_BYTES, Tokenizer, default_model_path

MAX_JSON_BYTES = 4 * MAX_MODEL_BYTES  # a tokenizer.json holds its vocabulary and merges as text


@dataclass
class JsonTokenizer(Tokenizer):
    json_text: str = ""
    source: str = ""
    kind: ClassVar[str] = "tokenizer.json"

    @classmethod
    def from_json_file(cls, path, chat_template=None, add_bos: bool = True, add_eos: bool = False,
                       bos_token="<s>", eos_token="</s>", unk_token="<unk>") -> JsonTokenizer:
        """`path` (tokenizer.json) checked to load in the tokenizers library, its special tokens in the vocabulary."""
        path = Path(path)
        if path.stat().st_size > MAX_JSON_BYTES:
            raise FormatError(f"{path.stat().st_size} bytes is too large for a tokenizer.json", file=path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FormatError(f"cannot read text: {str(exc)[:200]}", file=path) from None
        vocab = _fast(text, str(path)).get_vocab(with_added_tokens=True)
        ids = {}
        for what, token in (("bos", bos_token), ("eos", eos_token), ("unk", unk_token)):
            if not isinstance(token, str) or token not in vocab:
                raise FormatError(f"tokenizer {what} token {str(token)[:40]!r} is not in its vocabulary", file=path)
            ids[what] = vocab[token]
        sp_model = default_model_path().read_bytes() if vocab == _v1_vocab() else b""
        return cls(sp_model, chat_template=chat_template, bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unk"],
                   add_bos=add_bos, add_eos=add_eos, json_text=text, source=str(path))

    @property
    def same_as_sentencepiece_v1(self) -> bool:
        """Whether the vocabulary is Mixtral v1's (then `sp_model` is that SentencePiece model)."""
        return bool(self.sp_model)

    def processor(self):
        if not self.sp_model:
            raise FormatError("this tokenizer.json's vocabulary is not Mixtral v1's, so no SentencePiece model can "
                              "stand for it here (give one with --tokenizer FILE)", file=self.source)
        return super().processor()

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = _fast(self.json_text, self.source).encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if (self.add_bos if bos is None else bos) else []) + list(ids)


@functools.lru_cache(maxsize=2)
def _fast(text: str, source: str):
    """The tokenizers library's Tokenizer for a tokenizer.json text (FormatError naming `source` if it cannot)."""
    try:
        from tokenizers import Tokenizer as Fast
    except ImportError:
        raise FormatError("reading a tokenizer.json needs the tokenizers package (pip install tokenizers), or give "
                          "a tokenizer.model with --tokenizer FILE", file=source) from None
    try:
        json.loads(text)  # the library's own parse errors are less precise
        return Fast.from_str(text)
    except Exception as exc:  # noqa: BLE001 - json's errors and the library's own Exception subclass
        raise FormatError(f"the tokenizers library cannot load it: {str(exc)[:160]}", file=source) from None


@functools.lru_cache(maxsize=1)
def _v1_vocab() -> dict[str, int]:
    pieces = Tokenizer.default().vocab()[0]
    return {p: i for i, p in enumerate(pieces)}
