"""The SentencePiece tokenizer as every layout stores it: a .model file (HF, Mistral) or a GGUF vocabulary."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import sentencepiece as spm

from .errors import FormatError, reading

# SentencePiece piece types share their numbering with GGUF's tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MAX_MODEL_BYTES = 64 << 20  # a SentencePiece model is well under 1 MB for Mixtral's 32000 pieces


def default_model_path() -> Path:
    """The Mixtral v1 SentencePiece model that the mistral-common package ships (no network needed).

    Located without importing the package, so its own dependencies are not needed to read one file."""
    import importlib.util
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.origin:
        raise ModuleNotFoundError("the mistral-common package (which ships the Mixtral v1 tokenizer) is missing")
    return Path(spec.origin).parent / "data" / "tokenizer.model.v1"


@dataclass
class Tokenizer:
    sp_model: bytes                   # serialized SentencePiece ModelProto
    chat_template: str | None = None
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0
    add_bos: bool = True
    add_eos: bool = False
    kind: ClassVar[str] = "tokenizer.model"  # the file it came from (tokenizer_json.JsonTokenizer: tokenizer.json)

    @classmethod
    def from_file(cls, path, **kw) -> Tokenizer:
        """A tokenizer.model file, checked to load in SentencePiece (FormatError naming the file if not)."""
        path = Path(path)
        if path.stat().st_size > MAX_MODEL_BYTES:
            raise FormatError(f"{path.stat().st_size} bytes is too large for a SentencePiece model", file=path)
        return cls(path.read_bytes(), **kw).checked(path)

    @classmethod
    def default(cls) -> Tokenizer:
        return cls.from_file(default_model_path())

    @classmethod
    def from_vocab(cls, tokens, scores, types, source=None, **kw) -> Tokenizer:
        """Rebuild a .model from a GGUF vocabulary, keeping the v1 model's normalizer and trainer settings;
        a vocabulary SentencePiece cannot load is a FormatError naming `source`."""
        _check_vocab(tokens, scores, types, source)
        proto = _model_proto().FromString(default_model_path().read_bytes())
        del proto.pieces[:]
        for token, score, kind in zip(tokens, scores, types):
            piece = proto.pieces.add(piece=token, score=score)
            if kind != NORMAL:  # the default, left unset as SentencePiece writes it
                piece.type = kind
        return cls(proto.SerializeToString(), **kw).checked(source)

    def checked(self, source) -> Tokenizer:
        """This tokenizer if SentencePiece loads it and its special ids are in the vocabulary."""
        with reading(source):
            n = self.processor().vocab_size()
        for what, i in (("bos", self.bos_id), ("eos", self.eos_id), ("unk", self.unk_id)):
            if not 0 <= i < n:
                raise FormatError(f"tokenizer {what} id {i} is outside its vocabulary of {n}", file=source)
        return self

    def processor(self) -> spm.SentencePieceProcessor:
        return _processor(self.sp_model)

    def vocab(self) -> tuple[list[str], list[float], list[int]]:
        """(pieces, scores, types) in id order, as GGUF stores them."""
        sp = self.processor()
        pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
        scores = [sp.get_score(i) for i in range(sp.vocab_size())]
        return pieces, scores, [_piece_type(sp, i) for i in range(sp.vocab_size())]

    def hf_json(self) -> dict:
        """The Hugging Face `tokenizer.json` of this SentencePiece BPE model (the fast tokenizer transformers and
        vLLM load): byte-fallback BPE whose merges come from the vocabulary, ranked by the merged piece's score
        as transformers' SentencePiece converter ranks them; "▁" prefix and space replacement as normalizer."""
        pieces, scores, types = self.vocab()
        vocab = {p: i for i, p in enumerate(pieces)}
        merges = []
        for piece, score in sorted(zip(pieces, scores), key=lambda ps: -ps[1]):  # stable: ties keep id order
            local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
            merges += sorted(local, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        special = [i for i, t in enumerate(types) if t in (UNKNOWN, CONTROL)]
        bos, eos = pieces[self.bos_id], pieces[self.eos_id]
        seq = lambda name: {"Sequence": {"id": name, "type_id": 0}}
        tok = lambda t: {"SpecialToken": {"id": t, "type_id": 0}}
        single = ([tok(bos)] if self.add_bos else []) + [seq("A")] + ([tok(eos)] if self.add_eos else [])
        pair = single + ([tok(bos)] if self.add_bos else []) + [seq("B")] + ([tok(eos)] if self.add_eos else [])
        used = [t for t, on in ((bos, self.add_bos), (eos, self.add_eos)) if on]
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for i in special],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
            "pre_tokenizer": None,
            "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": {
                t: {"id": t, "ids": [vocab[t]], "tokens": [t]} for t in used}},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": pieces[self.unk_id],
                      "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                      "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                      "merges": [f"{a} {b}" for a, b in merges]},
        }

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self.processor().encode(text)
        return ([self.bos_id] if (self.add_bos if bos is None else bos) else []) + ids


def _piece_type(sp, i) -> int:
    if sp.is_unknown(i):
        return UNKNOWN
    if sp.is_control(i):
        return CONTROL
    if sp.is_unused(i):
        return UNUSED
    if sp.is_byte(i):
        return BYTE
    return NORMAL


def _model_proto():
    """SentencePiece's own ModelProto message class (needs the protobuf package)."""
    from sentencepiece import sentencepiece_model_pb2
    return sentencepiece_model_pb2.ModelProto


@functools.lru_cache(maxsize=4)
def _processor(sp_model: bytes) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=sp_model)


def _check_vocab(tokens, scores, types, source) -> None:
    """A GGUF vocabulary: three arrays of one length, of strings, numbers and SentencePiece piece types."""
    if not len(tokens) == len(scores) == len(types):
        raise FormatError(f"tokenizer arrays differ in length (tokens {len(tokens)}, scores {len(scores)}, "
                          f"types {len(types)})", file=source)
    if not set(map(type, tokens)) <= {str}:
        raise FormatError("tokenizer.ggml.tokens holds values that are not strings", file=source)
    if not set(map(type, scores)) <= {int, float}:
        raise FormatError("tokenizer.ggml.scores holds values that are not numbers", file=source)
    if not set(map(type, types)) <= {int} or not set(types) <= set(range(NORMAL, BYTE + 1)):
        raise FormatError(f"tokenizer.ggml.token_type holds values outside {NORMAL}..{BYTE}", file=source)
