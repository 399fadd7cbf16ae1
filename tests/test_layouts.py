"""Readers for layouts we do not write (or write differently): torch pickles, the concatenated-experts
variant, PaddleNLP, GGUF as llama.cpp's own converter lays it out, legacy per-expert GGUF; name tables and
transforms in inverse pairs; detection from content, never folder names."""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from conftest import small_spec, write_concat
from safetensors.torch import save_file

from mxtools.commands.synth import synth_checkpoint
from mxtools.core import names
from mxtools.core.tokenizer import Tokenizer
from mxtools.core.transforms import hf_to_meta_rope, meta_to_hf_rope, rope_heads
from mxtools.layouts import detect, hf, mistral, open_checkpoint, paddle
from mxtools.layouts import gguf as gguf_layout

SPEC = small_spec()


@pytest.fixture(scope="module")
def ref():
    ck = synth_checkpoint(SPEC, 0, torch.float32)
    return {n: ck.tensors[n].load() for n in names.canonical_names(SPEC)}


def assert_matches(path, ref, layout=None, tol=0.0):
    with open_checkpoint(path) as ck:
        assert layout is None or ck.layout == layout
        assert ck.spec.replace(name="x", context_length=1) == SPEC.replace(name="x", context_length=1)
        for n, want in ref.items():
            got = ck.tensors[n].load().float()
            assert torch.allclose(got, want, atol=tol, rtol=0) if tol else torch.equal(got, want), n


def meta_permute(w, n_head):
    """llama.cpp's LlamaModel.permute, written out independently of mxtools.core.transforms."""
    w = np.asarray(w)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_rope_permutations_are_inverse_pairs():
    w = torch.randn(8 * 16, 24)
    assert torch.equal(meta_to_hf_rope(hf_to_meta_rope(w, 8), 8), w)
    assert torch.equal(hf_to_meta_rope(w, 8), torch.from_numpy(meta_permute(w.numpy(), 8)))


@pytest.mark.parametrize("table", [hf.TABLE, mistral.TABLE, mistral.CONCAT_TABLE, gguf_layout.TABLE,
                                   gguf_layout.LEGACY_TABLE, paddle.TABLE])
def test_name_tables_round_trip(table):
    for n in names.canonical_names(SPEC):
        layout_name, slab = table.to_layout(n)
        back, stacked = table.to_canonical(layout_name)
        assert (back.replace("{e}", str(slab)) if stacked else back) == n


def test_mistral_pth(tmp_path, ref, synth_dir):
    src = tmp_path / "pth"
    shutil.copytree(synth_dir("mistral", "f32"), src)
    (src / "consolidated.safetensors").unlink()
    sd = {}
    for n, w in ref.items():
        key = mistral.TABLE.to_layout(n)[0]
        heads = rope_heads(names.parse(n)[0].key, SPEC)
        sd[key] = torch.from_numpy(meta_permute(w.numpy(), heads)) if heads else w
    torch.save(sd, src / "consolidated.00.pth")
    assert_matches(src, ref, "mistral")


def test_mistral_concatenated_experts_variant(tmp_path, ref, synth_dir):
    """transformers' old converter input: experts stacked on rows, w2 blocks transposed, several .pt files."""
    assert_matches(write_concat(synth_dir("mistral", "f32"), tmp_path / "concat", SPEC), ref, "mistral-concat")


def test_paddle(tmp_path, ref, synth_dir):
    src = tmp_path / "paddle"
    src.mkdir()
    shutil.copy(synth_dir("hf", "f32") / "config.json", src / "config.json")
    shutil.copy(synth_dir("hf", "f32") / "tokenizer.model", src / "sentencepiece.bpe.model")
    sd = {paddle.TABLE.to_layout(n)[0]: (w.t().contiguous() if names.parse(n)[0].linear else w)
          for n, w in ref.items()}
    save_file(sd, src / "model_state.safetensors")
    assert_matches(src, ref, "paddle")


def _llama_cpp_style_gguf(path, ref, legacy=False):
    """A GGUF laid out by gguf-py's own writer the way convert_hf_to_gguf.py writes Mixtral (f16 weights)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("ref"), w.add_context_length(SPEC.context_length), w.add_embedding_length(SPEC.dim)
    w.add_block_count(SPEC.n_layers), w.add_feed_forward_length(SPEC.hidden_dim)
    w.add_rope_dimension_count(SPEC.head_dim), w.add_head_count(SPEC.n_heads), w.add_head_count_kv(SPEC.n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(1e6), w.add_expert_count(SPEC.n_experts)
    w.add_expert_used_count(SPEC.n_experts_per_tok), w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, scores, types = Tokenizer.default().vocab()
    w.add_tokenizer_model("llama"), w.add_token_list(tokens), w.add_token_scores(scores), w.add_token_types(types)
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    llama = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "q_proj": "attn_q",
             "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate": "ffn_gate_inp",
             "w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}
    for n in names.canonical_names(SPEC):
        _, i, e = names.parse(n)
        arr = ref[n].numpy()
        part = n if n in llama else n.split(".")[-2]
        base = llama[part] if i is None else f"blk.{i}.{llama[part]}"
        if part in ("q_proj", "k_proj"):
            arr = meta_permute(arr, SPEC.n_heads if part == "q_proj" else SPEC.n_kv_heads)
        f16 = arr.ndim == 2 and part != "gate"
        arr = arr.astype(np.float16) if f16 else arr
        if e is None:
            w.add_tensor(base + ".weight", arr)
        elif legacy:
            w.add_tensor(f"{base}.{e}.weight", arr)
        elif e == SPEC.n_experts - 1:
            stack = [ref[n.replace(f"experts.{e}.", f"experts.{x}.")].numpy() for x in range(SPEC.n_experts)]
            w.add_tensor(base + "_exps.weight", np.stack(stack).astype(np.float16))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_gguf_as_llama_cpp_writes_it(tmp_path, ref, legacy):
    path = _llama_cpp_style_gguf(tmp_path / "ref.gguf", ref, legacy)
    f16 = {n: (w.half().float() if w.ndim == 2 and "gate.weight" not in n else w) for n, w in ref.items()}
    assert_matches(path, f16)
    with open_checkpoint(path) as ck:
        assert ck.info["legacy_experts"] == legacy


def test_detection_ignores_folder_names(tmp_path, synth_dir):
    fake = tmp_path / "consolidated.gguf"
    shutil.copytree(synth_dir("hf", "f32"), fake)
    assert detect(fake).name == "hf"
    assert detect(synth_dir("gguf", "f32")).name == "gguf"


def test_hf_config_spellings(tmp_path, synth_dir, ref):
    """transformers 5.x: rope_theta under rope_parameters and head_dim null must not fall back to 10000."""
    src = tmp_path / "v5"
    shutil.copytree(synth_dir("hf", "f32"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta"), "rope_type": "default"}
    cfg["head_dim"] = None
    cfg["hidden_size"], cfg["num_attention_heads"] = SPEC.dim, SPEC.dim // SPEC.head_dim
    (src / "config.json").write_text(json.dumps(cfg))
    with open_checkpoint(src) as ck:
        assert ck.spec.rope_theta == 1e6 and ck.spec.head_dim == SPEC.dim // ck.spec.n_heads
