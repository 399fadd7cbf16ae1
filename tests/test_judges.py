"""Our outputs in the tools people really use: transformers for HF, llama.cpp for GGUF (incl. tokenizer)."""
from __future__ import annotations

import pytest
import torch
from judges import hf_logits, kld, llama_cpp_logits, llama_cpp_model

from mxtools.commands.convert import convert
from mxtools.core.tokenizer import Tokenizer

PROMPT = "The quick brown fox jumps over the lazy dog. In 1923, the river froze\tand\nthe town moved east."
TEXTS = ["Hello world", "  leading spaces and  double  spaces", "tabs\tand\nnewlines\n\n", "digits 1234567890 3.14",
         "accents: café, naïve, Ærøskøbing", "CJK: 日本語の文章と中文", "emoji: 🙂🚀 done",
         "[INST] What is 2+2? [/INST]"]


@pytest.fixture(scope="module")
def tokens():
    return Tokenizer.default().encode(PROMPT)


@pytest.fixture(scope="module")
def reference(synth_dir, tokens):
    return hf_logits(synth_dir("hf", "f32"), tokens)


def test_hf_output_same_logits_in_transformers(tmp_path, synth_dir, tokens, reference):
    """HF -> Mistral -> GGUF -> HF: transformers gives the very same logits as on the original."""
    m = convert(synth_dir("hf", "f32"), "mistral", tmp_path / "m", "f32")
    g = convert(m, "gguf", tmp_path / "g.gguf", "f32")
    h = convert(g, "hf", tmp_path / "h", "f32")
    assert torch.equal(hf_logits(h, tokens), reference)


@pytest.mark.parametrize("outtype,max_kld,same_top", [("f32", 1e-6, True), ("f16", 1e-4, True),
                                                      ("bf16", 5e-3, False), ("q8_0", 5e-3, False)])
def test_llama_cpp_agrees_with_transformers(tmp_path, synth_dir, tokens, reference, outtype, max_kld, same_top):
    gguf_path = convert(synth_dir("hf", "f32"), "gguf", tmp_path / f"m-{outtype}.gguf", outtype)
    logits = llama_cpp_logits(gguf_path, tokens)
    d = kld(reference, logits)
    print(f"{outtype}: mean KLD {d.mean().item():.3e}, max {d.max().item():.3e}")
    assert d.mean().item() < max_kld
    top_same = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert top_same == 1.0 if same_top else top_same >= 0.9


def test_llama_cpp_tokenizer_matches_mistral_common(synth_dir):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    ref = MistralTokenizer.v1().instruct_tokenizer.tokenizer
    llm = llama_cpp_model(synth_dir("gguf", "bf16"))
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ref.encode(text, bos=True, eos=False), text
    llm.close()


def test_llama_cpp_instruct_format_matches_mistral_common(synth_dir):
    """The [INST] format: each turn tokenized as its own SentencePiece segment, BOS first, EOS after answers."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    turns = ["Hi there", "Hello! How can I help?", "Translate 'chat' to French, in 3 words."]
    chat = ChatCompletionRequest(messages=[UserMessage(content=turns[0]), AssistantMessage(content=turns[1]),
                                           UserMessage(content=turns[2])])
    ref = MistralTokenizer.v1().encode_chat_completion(chat).tokens
    llm = llama_cpp_model(synth_dir("gguf", "bf16"))
    seg = lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)
    ours = [1] + seg(f"[INST] {turns[0]} [/INST]") + seg(turns[1]) + [2] + seg(f"[INST] {turns[2]} [/INST]")
    single = llm.tokenize(f"[INST] {turns[2]} [/INST]".encode(), add_bos=True, special=False)
    llm.close()
    assert ours == ref
    assert single == MistralTokenizer.v1().encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content=turns[2])])).tokens


def test_hf_tokenizer_json_matches_mistral_common(tmp_path, synth_dir):
    """The tokenizer.json of an HF output, loaded by the `tokenizers` library (what transformers and vLLM use),
    gives mistral-common's ids and decodes back to the text."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from tokenizers import Tokenizer as FastTokenizer
    out = tmp_path / "hf"
    convert(synth_dir("gguf", "bf16"), "hf", out)
    fast = FastTokenizer.from_file(str(out / "tokenizer.json"))
    ref = MistralTokenizer.v1().instruct_tokenizer.tokenizer
    for text in TEXTS:
        ids = fast.encode(text).ids
        assert ids == ref.encode(text, bos=True, eos=False), text
        assert fast.decode(ids, skip_special_tokens=True) == text, text
