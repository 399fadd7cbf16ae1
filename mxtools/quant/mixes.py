"""llama.cpp's quantization mixes (q4_k_m, q5_k_s, ...) as data: recipes/gguf/<mix>.yaml, interpreted here.

A mix file names its `file_type` (general.file_type), a `default` GGML type, and per tensor kind (the kind
keys of mxtools.core.names) an ordered list of rules `{when: {condition: value, ...}, type: T}`; the first rule
whose conditions all hold gives the type. Condition words (each mirrors a test in llama.cpp's
src/llama-quant.cpp, `llama_tensor_get_type_impl`):
  n_experts: N        the model has N experts ("hparams.n_expert == 8")
  experts_at_least: N the model has N experts or more ("hparams.n_expert >= 4")
  model_type: 70B     llama.cpp classes the model LLM_TYPE_70B (80 layers, GQA, not 8 experts)
  more_bits: true     use_more_bits(layer, n_layers): i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2
  first_eighth: true  layer < n_layers / 8 (integer division)
  first_sixteenth: true  layer < n_layers / 16 (integer division)
  last_eighth: true   layer >= 7 * n_layers / 8 (integer division)
  gqa_at_least: N     n_heads / n_kv_heads >= N (integer division, llama.cpp's n_gqa())
  layer_below: N      layer < N
  imatrix: true       an importance matrix is given (llama.cpp's qs.has_imatrix)
  dim_multiple_of: N  the model width (n_embd: the row length of output and token_embd) is a multiple of N
Layer conditions are false for global tensors. For merged-expert tensors llama.cpp parses the layer from the
tensor name, and its attn_v (and, for the IQ1/IQ2 mixes, ffn_down) counter equals the layer because it visits
tensors sorted by layer, one tensor per kind and layer, so both are the `layer` argument here.

What is the same for every mix is no data in the files: the tensors llama.cpp keeps F32 (norms, router, any 1-D
tensor: core.names.gguf_f32), the fallback it applies when a row length is no multiple of the chosen type's block
(ROW_LENGTH_FALLBACK, here), and the types it refuses to write without an importance matrix (NEEDS_IMATRIX: a
policy that gives one of them to any tensor but token_embd and output is refused without one in gguf_options,
before anything is written, as llama-quantize refuses before it writes).
"""
from __future__ import annotations

import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field

import yaml
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from .. import recipes
from ..core.errors import MxError
from ..core.names import KIND_BY_KEY, KINDS, gguf_f32
from ..core.spec import PRESETS, ModelSpec
from ..core.values import is_kind
from ..io.gguf_tables import TABLE

# tensor_type_fallback: a 256-block type on rows that are no multiple of 256 becomes this 32-block type;
# 32-block types stay; if the row is still no multiple of the new block, F16.
ROW_LENGTH_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
                       **{t: Q.IQ4_NL for t in (Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS,
                                                Q.IQ3_S, Q.IQ4_XS)}}

# tensor_requires_imatrix: llama-quantize writes these types only with an importance matrix (Q2_K joins them in a
# Q2_K_S file, a mix not shipped here); token_embd and output are exempt.
NEEDS_IMATRIX = frozenset({Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS})
IMATRIX_EXEMPT = frozenset({"token_embd", "output"})

Policy = Callable[[str, "int | None", tuple], Q]


def available_mixes() -> tuple[str, ...]:
    """The mix names, one per recipes/gguf/<name>.yaml file shipped."""
    return recipes.names("gguf")


MIXES = available_mixes()


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's layer choice for the extra-bits tensors of the _M mixes."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def model_type(spec: ModelSpec) -> str:
    """llama.cpp's LLM_TYPE for the llama architecture, as far as quantization cares (src/models/llama.cpp)."""
    if spec.n_experts == 8:
        return {32: "8x7B", 56: "8x22B"}.get(spec.n_layers, "unknown")
    if spec.n_layers == 80 and spec.n_heads != spec.n_kv_heads:
        return "70B"
    return "other"


_PROBE = ModelSpec(**PRESETS["tiny"])  # a model to try condition values on

# condition word -> test(value, spec, layer, has_imatrix)
CONDITIONS = {
    "n_experts": lambda v, s, i, im: s.n_experts == v,
    "experts_at_least": lambda v, s, i, im: s.n_experts >= v,
    "model_type": lambda v, s, i, im: model_type(s) == str(v),
    "more_bits": lambda v, s, i, im: i is not None and use_more_bits(i, s.n_layers) == v,
    "first_eighth": lambda v, s, i, im: i is not None and (i < s.n_layers // 8) == v,
    "first_sixteenth": lambda v, s, i, im: i is not None and (i < s.n_layers // 16) == v,
    "last_eighth": lambda v, s, i, im: i is not None and (i >= 7 * s.n_layers // 8) == v,
    "gqa_at_least": lambda v, s, i, im: s.n_kv_heads > 0 and s.n_heads // s.n_kv_heads >= v,
    "layer_below": lambda v, s, i, im: i is not None and i < v,
    "imatrix": lambda v, s, i, im: im == v,
    "dim_multiple_of": lambda v, s, i, im: s.dim % v == 0,
}


@dataclass(frozen=True)
class Rule:
    when: dict
    qtype: Q

    def holds(self, spec: ModelSpec, layer, has_imatrix: bool) -> bool:
        return all(CONDITIONS[k](v, spec, layer, has_imatrix) for k, v in self.when.items())


@dataclass(frozen=True)
class Overrides:
    """llama-quantize's manual choices: --tensor-type REGEX=TYPE (searched in the GGUF name, first match wins,
    row fallback still applies), --output-tensor-type / --token-embedding-type (taken as given), --pure."""
    tensor_types: tuple[tuple[str, Q], ...] = ()
    output_type: Q | None = None
    token_embd_type: Q | None = None
    pure: bool = False


@dataclass(frozen=True)
class Mix:
    name: str
    file_type: int
    default: Q
    rules: dict = field(default_factory=dict)   # kind key -> tuple[Rule, ...]

    def base_type(self, kind: str, spec: ModelSpec, layer, has_imatrix: bool) -> Q:
        """The mix's type before the row-length fallback."""
        for rule in self.rules.get(kind, ()):
            if rule.holds(spec, layer, has_imatrix):
                return rule.qtype
        return self.default

    def policy(self, spec: ModelSpec, imatrix: bool = False, overrides: Overrides | None = None) -> Policy:
        """`policy(kind_key, layer, np_shape) -> GGML type` exactly as llama-quantize picks it for this mix."""
        ov = overrides or Overrides()
        patterns = [(re.compile(p), t) for p, t in ov.tensor_types]

        def pick(kind: str, layer, np_shape) -> Q:
            if gguf_f32(kind, np_shape):
                return Q.F32
            if kind == "token_embd" and ov.token_embd_type is not None:
                return ov.token_embd_type
            if kind == "output" and ov.output_type is not None:
                return ov.output_type
            manual = _manual(patterns, kind, layer)
            qtype = manual or (self.default if ov.pure else self.base_type(kind, spec, layer, imatrix))
            return row_fallback(qtype, np_shape[-1])
        return pick

    def types(self) -> frozenset:
        """Every type the mix's rules can name, its default included (before row fallbacks)."""
        return frozenset({self.default, *(r.qtype for rs in self.rules.values() for r in rs)})

    def may_need_imatrix(self) -> bool:
        """Whether some model gets a type of NEEDS_IMATRIX from this mix without an importance matrix."""
        reachable = {self.default} | {r.qtype for k, rs in self.rules.items() if k not in IMATRIX_EXEMPT
                                      for r in rs if r.when.get("imatrix") is not True}
        return bool(reachable & NEEDS_IMATRIX)


def first_tensor_typed(pick: Policy, spec: ModelSpec, types, skip=frozenset()) -> tuple[str, Q] | None:
    """(GGUF name, type) of the first tensor of a `spec` model, kinds in `skip` left out, to which `pick` gives
    one of `types`; None if there is none."""
    for kind in KINDS:
        if kind.key in skip:
            continue
        for layer in range(spec.n_layers) if kind.scope != "global" else (None,):
            qtype = pick(kind.key, layer, tuple(kind.shape(spec)))
            if qtype in types:
                return TABLE.rows[kind.key].replace("{i}", str(layer)), qtype
    return None


def require_imatrix(mix: str, pick: Policy, spec: ModelSpec) -> None:
    """MxError if `pick` gives any tensor of a `spec` model but token_embd and output a type llama-quantize
    writes only with an importance matrix (tensor_requires_imatrix)."""
    hit = first_tensor_typed(pick, spec, NEEDS_IMATRIX, IMATRIX_EXEMPT)
    if hit:
        raise MxError(f"mix {mix} gives {hit[0]} type {hit[1].name}, which llama.cpp writes only with an "
                      "importance matrix: add --imatrix FILE (`mxtools imatrix MODEL -o FILE` makes one)")


def require_encoders(mix: str, pick: Policy, spec: ModelSpec) -> None:
    """MxError if `pick` gives any tensor a type mxtools' encoders (io.ggml_blocks.SUPPORTED) do not write."""
    from ..io.ggml_blocks import SUPPORTED
    unwritable = set(Q) - set(SUPPORTED) - {Q.F32, Q.F16, Q.BF16}
    hit = first_tensor_typed(pick, spec, unwritable)
    if hit:
        raise MxError(f"mix {mix} gives {hit[0]} type {hit[1].name}, for which mxtools has no encoder "
                      f"(it writes {', '.join(t.name for t in SUPPORTED)}, F16, BF16, F32)")


def parse_tensor_type(arg: str) -> tuple[str, Q]:
    """`PATTERN=TYPE` as llama-quantize's --tensor-type reads it (split at the first '=', pattern lowercased,
    type name case-insensitive)."""
    pattern, sep, name = arg.partition("=")
    if not sep or not pattern or not name:
        raise MxError(f"--tensor-type wants PATTERN=TYPE, got {arg!r}")
    try:
        re.compile(pattern.lower())
    except re.error as exc:
        raise MxError(f"--tensor-type pattern {pattern!r} is not a regular expression: {exc}") from None
    return pattern.lower(), qtype_named(name, "--tensor-type")


def _manual(patterns, kind: str, layer) -> Q | None:
    if not patterns:
        return None
    name = TABLE.rows[kind].replace("{i}", str(layer))
    return next((t for rx, t in patterns if rx.search(name)), None)


def row_fallback(qtype: Q, ncols: int) -> Q:
    """llama.cpp's tensor_type_fallback for rows of `ncols` values."""
    block = GGML_QUANT_SIZES[qtype][0]
    if ncols % block == 0:
        return qtype
    if block > 32 and qtype not in ROW_LENGTH_FALLBACK:
        raise MxError(f"no row-length fallback is defined for {qtype.name} (rows of {ncols})")
    new = ROW_LENGTH_FALLBACK.get(qtype, qtype)
    return new if ncols % GGML_QUANT_SIZES[new][0] == 0 else Q.F16


def _rule(raw, where: str) -> Rule:
    if not is_kind(raw, dict) or not is_kind(raw.get("when") or {}, dict):
        raise MxError(f"a mix rule is a mapping {{when: {{...}}, type: T}}, not {reprlib.repr(raw)}", file=where)
    when = dict(raw.get("when") or {})
    unknown = set(map(str, when)) - set(CONDITIONS)
    if unknown:
        raise MxError(f"unknown condition(s) {sorted(unknown)}; known: {sorted(CONDITIONS)}", file=where)
    for word, value in when.items():
        _check_condition(word, value, where)
    return Rule(when, qtype_named(raw.get("type"), where))


def _check_condition(word: str, value, where: str) -> None:
    """A condition's value is a scalar its test can compare (tried on a probe model, layer 0)."""
    try:
        if not any(is_kind(value, kind) for kind in (bool, int, str)):
            raise TypeError
        CONDITIONS[word](value, _PROBE, 0, False)
    except (TypeError, ZeroDivisionError):
        raise MxError(f"condition {word}: {reprlib.repr(value)} is not a value it can test", file=where) from None


def qtype_named(name, where: str) -> Q:
    """The GGML type called `name` (any case: "q4_k", "Q8_0"); MxError naming `where` otherwise."""
    if not is_kind(name, str) or name.upper() not in Q.__members__:
        raise MxError(f"unknown GGML type {reprlib.repr(name)}", file=where)
    return Q[name.upper()]


def parse_mix(data: dict, where: str = "<mix>") -> Mix:
    """A Mix from the mapping a recipe file holds; unknown kinds, types and conditions, and values of the wrong
    type, are errors naming `where`."""
    if not is_kind(data, dict) or not is_kind(data.get("rules") or {}, dict):
        raise MxError("a mix is a mapping with name, file_type, default and rules (a mapping)", file=where)
    rules = data.get("rules") or {}
    unknown = set(map(str, rules)) - set(KIND_BY_KEY)
    if unknown:
        raise MxError(f"unknown tensor kind(s) {sorted(unknown)}", file=where)
    missing = [k for k in ("name", "file_type", "default") if k not in data]
    if missing:
        raise MxError(f"mix recipe lacks {missing[0]!r}", file=where)
    if not is_kind(data["file_type"], int) or not 0 <= data["file_type"] < 2**31:
        raise MxError(f"mix file_type {reprlib.repr(data['file_type'])} is not a llama_ftype number", file=where)
    if not all(is_kind(rs, list) for rs in rules.values()) or not is_kind(data["name"], str):
        raise MxError("a mix's name is a string and each kind's rules are a list", file=where)
    return Mix(data["name"], data["file_type"], qtype_named(data["default"], where),
               {k: tuple(_rule(r, where) for r in rs) for k, rs in rules.items()})


MAX_RECIPE_BYTES = 1 << 20  # recipes are a few hundred bytes of YAML


def read_yaml(path):
    """A recipe or mix file parsed with yaml.safe_load; one too large or that does not parse is an MxError
    naming it."""
    text = path.read_bytes()
    if len(text) > MAX_RECIPE_BYTES:
        raise MxError(f"{len(text)} bytes is too large for a recipe", file=path)
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: a malformed number or date
        raise MxError(f"cannot parse recipe: {exc}", file=path) from None


def load_mix(name: str) -> Mix:
    """The mix `name` (e.g. "q4_k_m") from recipes/gguf/<name>.yaml."""
    path = recipes.find(name.lower(), "gguf")
    if path is None:
        raise MxError(f"unknown quantization mix {name!r}; available: {', '.join(available_mixes()) or 'none'}")
    return parse_mix(read_yaml(path), str(path))


def gguf_options(name: str, spec: ModelSpec, imatrix: dict | None = None,
                 overrides: Overrides | None = None, importance: bool = False) -> dict:
    """Keyword arguments for the GGUF writer (`policy`, `file_type`, `imatrix`) that quantize to mix `name`.

    `imatrix`: canonical name -> vector (load_imatrix / imatrix_for_writer); its presence alone changes some
    mixes' choices, as in llama.cpp (an empty one counts as none, as llama-quantize passes none). `importance`:
    the mix's choices with an importance matrix even without one (GPTQ, whose Hessian plays its role).
    A policy that gives any tensor but token_embd and output a type of NEEDS_IMATRIX is refused without an
    importance matrix (MxError), as llama-quantize refuses it; so is one that gives a tensor a type no encoder of
    mxtools writes.
    """
    mix = load_mix(name)
    policy = mix.policy(spec, bool(imatrix) or importance, overrides)
    if not imatrix and not importance:
        require_imatrix(mix.name, policy, spec)
    require_encoders(mix.name, policy, spec)
    return {"policy": policy, "file_type": mix.file_type, "imatrix": imatrix}
