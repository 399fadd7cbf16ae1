"""How quantized HF-style checkpoints name Mixtral's experts and router, found from the tensor names alone
(docs/FORMATS.md, section 9).

The tools that write them spell the MoE block three ways: the canonical transformers 4.x names
`block_sparse_moe.experts.{e}.w1|w3|w2` ("vllm": vLLM's loader, transformers' bitsandbytes serialization),
transformers 5's `mlp.experts.{e}.gate_proj|up_proj|down_proj` ("transformers") and transformers 5's expert
names under the 4.x block, `block_sparse_moe.experts.{e}.gate_proj|up_proj|down_proj` ("autoround": AutoRound,
llm-compressor). The router is `block_sparse_moe.gate` or `mlp.gate`, whichever is stored. Each naming is a
NameTable over names.KINDS in which only the router and expert rows differ from the canonical ones.
"""
from __future__ import annotations

import re

from .errors import FormatError
from .names import CANONICAL_TABLE, NameTable

# naming -> (MoE block, gate, up, down, default router)
SPELLINGS = {
    "vllm": ("block_sparse_moe", "w1", "w3", "w2", "block_sparse_moe.gate"),
    "transformers": ("mlp", "gate_proj", "up_proj", "down_proj", "mlp.gate"),
    "autoround": ("block_sparse_moe", "gate_proj", "up_proj", "down_proj", "block_sparse_moe.gate"),
}
ROUTERS = ("block_sparse_moe.gate", "mlp.gate")
DEFAULT_NAMING = "vllm"


def name_table(naming: str, router: str | None = None) -> NameTable:
    """The name table of `naming` (a SPELLINGS key), the router under `router` (default: the naming's own)."""
    block, gate, up, down, default_router = SPELLINGS[naming]
    layer, experts = "model.layers.{i}.", f"model.layers.{{i}}.{block}.experts.{{e}}."
    return NameTable({**CANONICAL_TABLE.rows, "ffn_gate_inp": f"{layer}{router or default_router}.weight",
                      "ffn_gate": f"{experts}{gate}.weight", "ffn_up": f"{experts}{up}.weight",
                      "ffn_down": f"{experts}{down}.weight"})


def _expert_keys(naming: str) -> re.Pattern:
    block, gate, up, down, _ = SPELLINGS[naming]
    return re.compile(rf"model\.layers\.\d+\.{block}\.experts\.\d+\.({gate}|{up}|{down})\.")


def naming_of(keys, source=None) -> tuple[str, str]:
    """(naming, router) from tensor names only: the naming whose expert names the keys use (vllm when none
    does), the router spelling the keys use (else the naming's own). Two expert namings at once: a FormatError
    naming `source`."""
    keys = list(keys)
    found = [n for n in SPELLINGS if any(_expert_keys(n).match(k) for k in keys)]
    if len(found) > 1:
        raise FormatError(f"expert tensors are named in two ways ({' and '.join(found)})", file=source)
    naming = found[0] if found else DEFAULT_NAMING
    routers = [r for r in ROUTERS if any(re.match(rf"model\.layers\.\d+\.{re.escape(r)}\.", k) for k in keys)]
    return naming, routers[0] if routers else SPELLINGS[naming][4]


def canonical_key(key: str, table: NameTable) -> str:
    """The canonical name of a stored key under `table`: `x.weight` or a quantized part of it (`x.qweight`,
    `x.scales` ...) keeps its suffix, `x` mapped as `x.weight` is; an unknown key is returned as it is."""
    base, _, suffix = key.rpartition(".")
    hit = table.to_canonical(base + ".weight")
    return hit[0].removesuffix("weight") + suffix if hit else key
