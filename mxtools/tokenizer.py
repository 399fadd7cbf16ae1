"""The SentencePiece tokenizer as every layout stores it: a .model file (HF, Mistral) or a GGUF vocabulary."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

# SentencePiece piece types share their numbering with GGUF's tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


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

    @classmethod
    def from_file(cls, path, **kw) -> Tokenizer:
        return cls(Path(path).read_bytes(), **kw)

    @classmethod
    def default(cls) -> Tokenizer:
        return cls.from_file(default_model_path())

    @classmethod
    def from_vocab(cls, tokens, scores, types, **kw) -> Tokenizer:
        """Rebuild a .model from a GGUF vocabulary, keeping the v1 model's normalizer and trainer settings."""
        template = default_model_path().read_bytes()
        return cls(replace_pieces(template, tokens, scores, types), **kw)

    def processor(self) -> spm.SentencePieceProcessor:
        return spm.SentencePieceProcessor(model_proto=self.sp_model)

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


# --- minimal protobuf wire handling: a ModelProto is field 1 (pieces) plus other fields kept verbatim ---

def _varint(b: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = b[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _fields(b: bytes):
    """Yield (field number, raw bytes of the whole field) for a message of length-delimited fields."""
    pos = 0
    while pos < len(b):
        start = pos
        tag, pos = _varint(b, pos)
        if tag & 7 != 2:
            raise ValueError("unexpected wire type in SentencePiece model")
        n, pos = _varint(b, pos)
        pos += n
        yield tag >> 3, b[start:pos]


def _enc_piece(piece: str, score: float, kind: int) -> bytes:
    raw = piece.encode()
    body = b"\x0a" + _enc_varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score)
    if kind != NORMAL:
        body += b"\x18" + _enc_varint(kind)
    return b"\x0a" + _enc_varint(len(body)) + body


def replace_pieces(model: bytes, tokens, scores, types) -> bytes:
    """A copy of `model` whose vocabulary is (tokens, scores, types); other settings unchanged."""
    rest = [raw for num, raw in _fields(model) if num != 1]
    pieces = b"".join(_enc_piece(t, float(s), int(k)) for t, s, k in zip(tokens, scores, types))
    return pieces + b"".join(rest)
