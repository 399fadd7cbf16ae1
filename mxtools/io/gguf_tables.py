"""The GGUF side of Mixtral as llama.cpp runs it (`general.architecture = llama`), from gguf-py's own constants:
tensor names (gguf.TENSOR_NAMES), metadata keys (gguf.Keys) and file types. The GGUF layout, the importance
matrix files, the mixes and verify's thresholds all read these; no GGUF name or key is spelled anywhere else.
"""
from __future__ import annotations

import gguf
import torch
from gguf import MODEL_TENSOR as M
from gguf import GGMLQuantizationType as Q

from ..core.names import NameTable

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]  # "llama": llama.cpp runs Mixtral as llama with experts

# canonical tensor kind -> llama.cpp's tensor (LLM_ARCH_LLAMA with experts)
_TENSORS = {
    "token_embd": M.TOKEN_EMBD, "attn_norm": M.ATTN_NORM, "attn_q": M.ATTN_Q, "attn_k": M.ATTN_K,
    "attn_v": M.ATTN_V, "attn_output": M.ATTN_OUT, "ffn_norm": M.FFN_NORM, "ffn_gate_inp": M.FFN_GATE_INP,
    "ffn_gate": M.FFN_GATE_EXP, "ffn_down": M.FFN_DOWN_EXP, "ffn_up": M.FFN_UP_EXP,  # [E, F, D] / [E, D, F]
    "output_norm": M.OUTPUT_NORM, "output": M.OUTPUT,
}
# Files written by llama.cpp between Dec 2023 and Apr 2024 kept one 2-D tensor per expert (blk.i.ffn_gate.E).
_LEGACY = {"ffn_gate": M.FFN_GATE, "ffn_down": M.FFN_DOWN, "ffn_up": M.FFN_UP}


def _template(t: M, expert: bool = False) -> str:
    return gguf.TENSOR_NAMES[t].replace("{bid}", "{i}") + (".{e}" if expert else "") + ".weight"


TABLE = NameTable({k: _template(t) for k, t in _TENSORS.items()})
LEGACY_TABLE = NameTable({**TABLE.rows, **{k: _template(t, expert=True) for k, t in _LEGACY.items()}})


def key(template: str) -> str:
    """A gguf.Keys template ("{arch}.context_length") for this architecture."""
    return template.format(arch=ARCH)


FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
OUTTYPE_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16}  # block-quant mixes bring their own (recipes/gguf)

# llama.cpp's own keys for the importance matrix a file was quantized with (src/llama-quant.cpp,
# LLM_KV_QUANTIZE_IMATRIX_*); gguf-py does not list them.
IMATRIX_FILE, IMATRIX_DATASET = "quantize.imatrix.file", "quantize.imatrix.dataset"
IMATRIX_ENTRIES, IMATRIX_CHUNKS = "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"
