"""Build mxtools' bundled tiny Mixtral: prepare the text, train the model, save it in the classic HF layout.

    python examples/train_tiny.py prepare-text gensim-4.4.0.tar.gz --out mxtools/assets/text
    python examples/train_tiny.py train --out mxtools/assets/tiny-mixtral --minutes 20 --seed 0

`prepare-text` takes gensim's source distribution (`pip download --no-deps --no-binary :all:
--no-build-isolation gensim==4.4.0`), or the Wikipedia dump inside it, and never downloads anything.
`train` trains a 4-layer hidden-256 Mixtral on calib.txt (4 passes, or less when the wall-clock budget runs
out) and records how in TRAINING.json. `--device cuda` runs the same recipe on a GPU: the shipped weights were
trained that way (84 s on an H100), since the shared 2-core development machine managed ~14 s per step. The
load-balancing loss is computed per layer: transformers' `load_balancing_loss_func` pools all layers, which let one
expert of one layer die unnoticed (docs/QUALITY.md, section 5).
"""
from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

DUMP_MEMBER = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EVAL_TARGET_BYTES = 220_000   # held-out part: whole articles until about this size
EVAL_EVERY = 5                # every 5th kept article is a held-out candidate (spread over the dump)
MIN_ARTICLE_CHARS = 1500      # skip stubs and near-empty list pages
DROP_SECTIONS = {"see also", "references", "external links", "further reading", "notes", "bibliography",
                 "sources", "footnotes", "citations", "notes and references"}

# ---------------------------------------------------------------------------------------------------------
# Text: Wikipedia markup -> plain text
# ---------------------------------------------------------------------------------------------------------


def read_dump_bytes(source: Path) -> bytes:
    """The bz2 dump's XML, from gensim's sdist tarball or from the .bz2 file itself."""
    if source.name.endswith(".bz2"):
        return bz2.decompress(source.read_bytes())
    with tarfile.open(source) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(DUMP_MEMBER)), None)
        if member is None:
            sys.exit(f"{source}: no member ending in {DUMP_MEMBER}; pass gensim's sdist or the dump itself")
        return bz2.decompress(tar.extractfile(member).read())


def iter_pages(xml_bytes: bytes):
    """Yield (title, wikitext) for main-namespace, non-redirect pages, in dump order."""
    for _, elem in ET.iterparse(io.BytesIO(xml_bytes)):
        if not elem.tag.endswith("}page"):
            continue
        ns = {c.tag.rsplit("}", 1)[-1]: c for c in elem.iter()}
        if ns["ns"].text == "0" and "redirect" not in ns:
            yield ns["title"].text, ns["text"].text or ""
        elem.clear()


def _remove_nested(text: str, pattern: str) -> str:
    """Remove innermost-first until nothing matches (templates and tables nest)."""
    rx = re.compile(pattern, re.DOTALL)
    while True:
        text, n = rx.subn("", text)
        if not n:
            return text


def _link(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    if re.match(r"\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?):", target, re.IGNORECASE):
        return ""  # images, categories and interlanguage links carry no running text
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def _strip_markup(text: str) -> str:
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL | re.IGNORECASE)
    text = re.sub(r"<(math|gallery|timeline|source|syntaxhighlight|score)[^>]*>.*?</\1>", "", text,
                  flags=re.DOTALL | re.IGNORECASE)
    text = _remove_nested(text, r"\{\{[^{}]*\}\}")
    text = _remove_nested(text, r"\{\|(?:(?!\{\|).)*?\|\}")
    text = _remove_nested_links(text)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    return text.replace("\xa0", " ").replace("&nbsp;", " ")


def _remove_nested_links(text: str) -> str:
    rx = re.compile(r"\[\[([^\[\]]*)\]\]")
    while True:
        text, n = rx.subn(_link, text)
        if not n:
            return text


def _clean_lines(text: str) -> list[str]:
    """Headings as `= = X = =`-free `== X ==` lines, list markers dropped, tail sections cut."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        head = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", line)
        if head:
            if head.group(2).lower() in DROP_SECTIONS:
                break  # reference sections come last in an article: drop them and everything after
            line = f"{head.group(1)} {head.group(2)} {head.group(1)}" if head.group(2) else ""
        else:
            line = re.sub(r"^[*#:;]+\s*", "", line)
        junk = line.startswith(("|", "!", "[[", "{{"))  # table rows, captions with unbalanced brackets
        if line and not junk and not re.fullmatch(r"[|{}!\-=\s\]\[]*", line):
            out.append(re.sub(r"\s{2,}", " ", line))
    return out


def wiki_to_text(title: str, wikitext: str) -> str:
    """One article as plain text: a `= Title =` line, then paragraphs separated by blank lines."""
    lines = _clean_lines(_strip_markup(wikitext))
    while lines and lines[-1].startswith("=="):
        lines.pop()  # a heading whose section was all tables or lists
    return f"= {title} =\n\n" + "\n\n".join(lines) + "\n"


def prepare_text(source: Path, out: Path) -> dict:
    """Extract the articles, split whole articles into calib.txt and eval.txt, write SOURCES.md."""
    articles = []
    for title, wikitext in iter_pages(read_dump_bytes(source)):
        if "(disambiguation)" in title:
            continue
        text = wiki_to_text(title, wikitext)
        if len(text) >= MIN_ARTICLE_CHARS:
            articles.append((title, text))
    calib, held = split_articles(articles)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calib.txt").write_text("\n".join(t for _, t in calib), encoding="utf-8")
    (out / "eval.txt").write_text("\n".join(t for _, t in held), encoding="utf-8")
    info = {"source": source.name, "source_sha256": sha256(source), "calib_articles": len(calib),
            "eval_articles": len(held), "eval_titles": [t for t, _ in held]}
    (out / "SOURCES.md").write_text(sources_md(info, out), encoding="utf-8")
    return info


def split_articles(articles):
    """Every EVAL_EVERY-th article goes to eval until it holds about EVAL_TARGET_BYTES; the rest is calib."""
    calib, held, size = [], [], 0
    for n, (title, text) in enumerate(articles):
        if n % EVAL_EVERY == EVAL_EVERY // 2 and size < EVAL_TARGET_BYTES:
            held.append((title, text))
            size += len(text.encode("utf-8"))
        else:
            calib.append((title, text))
    return calib, held


def sources_md(info: dict, out: Path) -> str:
    sizes = {n: (out / n).stat().st_size for n in ("calib.txt", "eval.txt")}
    return f"""# Text used by mxtools (calibration and held-out evaluation)

## Where it comes from
English Wikipedia articles, taken from the shortened Wikipedia dump that the gensim project ships as test
data: `gensim/test/test_data/{DUMP_MEMBER}` inside the PyPI source distribution
`{info['source']}` (sha256 `{info['source_sha256']}`), obtained with
`pip download --no-deps --no-binary :all: --no-build-isolation gensim==4.4.0`.
The dump holds the then-current revisions (dated up to 1 May 2016, most from April 2016) of Wikipedia pages
with ids 10 to 775, early articles whose titles start with "A". gensim itself is LGPL-2.1; the article text in
its test data remains Wikipedia's, under the license below.

Plain text was extracted with `python examples/train_tiny.py prepare-text {info['source']} --out mxtools/assets/text`:
main-namespace, non-redirect, non-disambiguation pages; templates, tables, references, images, categories and
HTML removed; links replaced by their label; "See also", "References", "External links" and later sections
dropped; articles shorter than {MIN_ARTICLE_CHARS} characters skipped. Each article starts with a `= Title =` line;
section headings are kept as `== Heading ==` lines.

| file | articles | bytes | use |
|---|---|---|---|
| calib.txt | {info['calib_articles']} | {sizes['calib.txt']} | \
training of the bundled tiny model, calibration (GPTQ, imatrix) |
| eval.txt | {info['eval_articles']} | {sizes['eval.txt']} | \
held-out evaluation only; no article appears in both files |

Held-out articles: {', '.join(info['eval_titles'])}.

## License and attribution
The text is from Wikipedia, the free encyclopedia, and is licensed under the Creative Commons
Attribution-ShareAlike 3.0 Unported License (CC BY-SA 3.0, https://creativecommons.org/licenses/by-sa/3.0/).
It has been modified: wiki markup, tables, references and some sections were removed.

Attribution notice: "Text from English Wikipedia articles (https://en.wikipedia.org/), as of May 2016,
by Wikipedia contributors, licensed under CC BY-SA 3.0. The list of authors of each article is available
from its history page, https://en.wikipedia.org/w/index.php?title=TITLE&action=history."

Redistributions of these files, or of material adapted from them, must keep this notice and be shared under
the same license.
"""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Model, data and losses
# ---------------------------------------------------------------------------------------------------------

SEQ_LEN = 256          # BOS + 255 text tokens per sequence
BATCH = 4              # small batches: more updates from the few tokens a busy CPU gets through
PEAK_LR = 2e-3
MIN_LR_FRAC = 0.1
WARMUP_STEPS = 40
WEIGHT_DECAY = 0.1
MAX_EPOCHS = 4.0       # ~0.6M training tokens: the model overfits after about 4 passes (docs/QUALITY.md)
AUX_COEF = 0.02
BOS, EOS = 1, 2
ARCH = dict(vocab_size=32000, hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
            max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS,
            sliding_window=None, hidden_act="silu", initializer_range=0.02)
ROPE_THETA = 1e6


TOKENIZER_OVERRIDE: Path | None = None  # set by --tokenizer, for machines without mistral-common


def tokenizer_path() -> Path:
    if TOKENIZER_OVERRIDE is not None:
        return TOKENIZER_OVERRIDE
    import mistral_common
    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def tokenize_file(path: Path):
    """The whole file as one token stream (no BOS); sequences get BOS when they are cut."""
    import sentencepiece as spm
    import torch
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path()))
    return torch.tensor(encode_text(sp, path.read_text(encoding="utf-8")), dtype=torch.long)


def encode_text(sp, text: str) -> list[int]:
    """Exactly `sp.encode(text)`, but line by line: SentencePiece slows down badly on megabyte strings.

    No piece contains a newline, so pieces never cross one; inside the text a line has no dummy-prefix space,
    which encoding "\n" + line and dropping the leading "\u2581", "<0x0A>" reproduces.
    """
    lines = text.split("\n")
    ids = sp.encode(lines[0])
    lead = sp.encode("\n")  # ["\u2581", "<0x0A>"]
    for line in lines[1:]:
        piece = sp.encode("\n" + line)
        if piece[:len(lead)] != lead:
            sys.exit(f"unexpected tokenization of a line start: {piece[:4]}")
        ids += lead[-1:] + piece[len(lead):]
    return ids


def windows(tokens, body: int = SEQ_LEN - 1):
    """Non-overlapping windows of `body` text tokens, each with BOS first; the last one may be shorter."""
    import torch
    out = []
    for start in range(0, len(tokens), body):
        out.append(torch.cat([torch.tensor([BOS]), tokens[start:start + body]]))
    return out


def build_model(seed: int):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    config = MixtralConfig(**ARCH, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                           output_router_logits=False, router_aux_loss_coef=AUX_COEF)
    config._attn_implementation = "sdpa"
    return MixtralForCausalLM(config)


def per_layer_balance_loss(router_logits, top_k: int = 2):
    """Switch-style E * sum_i f_i * P_i for each layer separately, averaged over layers.

    f_i is the share of top-k slots routed to expert i (no gradient), P_i the mean router probability.
    """
    import torch
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        n_exp = probs.shape[-1]
        slots = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        f = torch.bincount(slots, minlength=n_exp).float() / slots.numel()
        losses.append(n_exp * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def lr_at(progress: float, step: int) -> float:
    """Linear warmup then cosine decay to MIN_LR_FRAC of the peak; progress in [0, 1]."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return PEAK_LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * cos)


def epoch_batches(tokens, gen):
    """One pass over the stream: a random shift, then shuffled BOS-prefixed windows in batches."""
    import torch
    body = SEQ_LEN - 1
    shift = int(torch.randint(0, body, (1,), generator=gen))
    n = (len(tokens) - shift) // body
    seqs = tokens[shift:shift + n * body].view(n, body)
    seqs = torch.cat([torch.full((n, 1), BOS), seqs], dim=1)[torch.randperm(n, generator=gen)]
    for b in range(0, n - BATCH + 1, BATCH):
        yield seqs[b:b + BATCH]


def train_step(model, opt, batch, lr):
    import torch
    for group in opt.param_groups:
        group["lr"] = lr
    batch = batch.to(model.device)
    out = model(input_ids=batch, output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
    aux = per_layer_balance_loss(out.router_logits, model.config.num_experts_per_tok)
    opt.zero_grad(set_to_none=True)
    (ce + AUX_COEF * aux).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return ce.item(), aux.item()


def make_optimizer(model):
    import torch
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=PEAK_LR, betas=(0.9, 0.95), eps=1e-8)


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


def evaluate(model, eval_tokens) -> dict:
    """Perplexity over all eval tokens (non-overlapping 256-windows, BOS first) and top-k slot shares."""
    import torch
    model.eval()
    nll, count = 0.0, 0
    n_layers, n_exp = model.config.num_hidden_layers, model.config.num_local_experts
    slots = torch.zeros(n_layers, n_exp)
    with torch.no_grad():
        for seq in windows(eval_tokens):
            seq = seq.to(model.device)
            out = model(input_ids=seq[None], output_router_logits=True)
            logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
            nll -= float(logp.gather(1, seq[1:, None]).sum())
            count += len(seq) - 1
            for layer, logits in enumerate(out.router_logits):
                top = torch.topk(logits.float(), model.config.num_experts_per_tok, dim=-1).indices
                slots[layer] += torch.bincount(top.reshape(-1), minlength=n_exp).float().cpu()
    model.train()
    share = slots / slots.sum(1, keepdim=True)
    return {"ppl": math.exp(nll / count), "mean_nll": nll / count, "tokens": count,
            "expert_share": [[round(float(x), 4) for x in row] for row in share]}


def unigram_ppl(calib_tokens, eval_tokens, vocab: int = 32000) -> float:
    """Add-one smoothed unigram model from calib counts, scored on the same eval tokens as the model."""
    import torch
    counts = torch.bincount(calib_tokens, minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(-float(logp[eval_tokens].mean()))


# ---------------------------------------------------------------------------------------------------------
# Saving in the classic HF layout
# ---------------------------------------------------------------------------------------------------------


def classic_state_dict(model) -> dict:
    """transformers 5.x keeps experts fused in memory; write the per-expert classic names (docs/FORMATS.md, s. 1)."""
    import torch
    out, n_ff = {}, model.config.intermediate_size
    moe = re.compile(r"model\.layers\.(\d+)\.mlp\.(.+)$")
    for name, t in model.state_dict().items():
        m = moe.match(name)
        if not m:
            out[name] = t
            continue
        prefix, part = f"model.layers.{m.group(1)}.block_sparse_moe.", m.group(2)
        if part == "gate.weight":
            out[prefix + "gate.weight"] = t
        elif part == "experts.gate_up_proj":  # [E, 2F, D] = cat(w1, w3) per expert
            for e in range(t.shape[0]):
                out[prefix + f"experts.{e}.w1.weight"] = t[e, :n_ff]
                out[prefix + f"experts.{e}.w3.weight"] = t[e, n_ff:]
        elif part == "experts.down_proj":  # [E, D, F] = w2 per expert
            for e in range(t.shape[0]):
                out[prefix + f"experts.{e}.w2.weight"] = t[e]
        else:
            sys.exit(f"unexpected MoE tensor {name}: this transformers version stores experts differently")
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in out.items()}


def check_names(state: dict, config) -> None:
    """The written names and shapes must be exactly the canonical ones mxtools expects."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mxtools.core.names import canonical_names, expected_shape
    from mxtools.core.spec import ModelSpec
    spec = ModelSpec(dim=config.hidden_size, n_layers=config.num_hidden_layers,
                     n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads,
                     head_dim=config.head_dim, hidden_dim=config.intermediate_size,
                     n_experts=config.num_local_experts, n_experts_per_tok=config.num_experts_per_tok,
                     vocab_size=config.vocab_size)
    want = canonical_names(spec)
    if set(want) != set(state):
        sys.exit(f"name mismatch: missing {sorted(set(want) - set(state))}, extra {sorted(set(state) - set(want))}")
    bad = [n for n in want if tuple(state[n].shape) != expected_shape(n, spec)]
    if bad:
        sys.exit(f"shape mismatch for {bad}")


def classic_config() -> dict:
    """config.json in the classic spelling: top-level rope_theta and head_dim (docs/FORMATS.md, section 1)."""
    import transformers
    cfg = dict(ARCH, architectures=["MixtralForCausalLM"], model_type="mixtral", rope_theta=ROPE_THETA,
               attention_dropout=0.0, output_router_logits=False, router_aux_loss_coef=AUX_COEF,
               router_jitter_noise=0.0, use_cache=True, torch_dtype="bfloat16",
               transformers_version=transformers.__version__)
    return dict(sorted(cfg.items()))


CHAT_TEMPLATE = (  # Mixtral-8x7B-Instruct-v0.1's template
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def write_tokenizer_files(out: Path) -> None:
    shutil.copyfile(tokenizer_path(), out / "tokenizer.model")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tok_cfg = dict(special, add_bos_token=True, add_eos_token=False, tokenizer_class="LlamaTokenizer",
                   legacy=True, clean_up_tokenization_spaces=False, model_max_length=ARCH["max_position_embeddings"],
                   pad_token=None, spaces_between_special_tokens=False, use_default_system_prompt=False,
                   chat_template=CHAT_TEMPLATE)
    dump_json(out / "tokenizer_config.json", tok_cfg)
    dump_json(out / "special_tokens_map.json", special)


def dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def save_model(model, out: Path) -> None:
    """model.safetensors (bf16, classic names), config.json, generation_config.json, tokenizer files."""
    from safetensors.torch import save_file
    state = classic_state_dict(model)
    check_names(state, model.config)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # safetensors creates it private; it is a shipped asset
    os.replace(tmp, out / "model.safetensors")  # never leave a half-written file under the final name
    dump_json(out / "config.json", classic_config())
    dump_json(out / "generation_config.json", {"bos_token_id": BOS, "eos_token_id": EOS, "do_sample": False})
    write_tokenizer_files(out)


LICENSE_MD = """# License of the bundled tiny Mixtral weights

These weights were trained from scratch by `examples/train_tiny.py` on `mxtools/assets/text/calib.txt`, text
from English Wikipedia articles (as of May 2016) by Wikipedia contributors, licensed under the Creative Commons
Attribution-ShareAlike 3.0 Unported License (https://creativecommons.org/licenses/by-sa/3.0/). See
`mxtools/assets/text/SOURCES.md` for where the text came from and how it was modified.

As material adapted from CC BY-SA 3.0 text, these weights are distributed under CC BY-SA 3.0 as well.
Attribution notice: "Trained on text from English Wikipedia (https://en.wikipedia.org/) by Wikipedia
contributors, licensed under CC BY-SA 3.0."

`tokenizer.model` is the Mistral v1 SentencePiece tokenizer shipped by the mistral-common package
(`mistral_common/data/tokenizer.model.v1`, Apache License 2.0).
"""


# ---------------------------------------------------------------------------------------------------------
# Training driver
# ---------------------------------------------------------------------------------------------------------


def run_training(model, calib_tokens, minutes: float, seed: int, log) -> dict:
    """AdamW until MAX_EPOCHS passes or the wall-clock budget, whichever comes first."""
    import torch
    opt = make_optimizer(model)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(calib_tokens) // (SEQ_LEN - 1)) // BATCH
    max_steps = int(MAX_EPOCHS * steps_per_epoch)
    budget, t0, step, stop = minutes * 60.0, time.time(), 0, False
    while not stop:
        for batch in epoch_batches(calib_tokens, gen):
            progress = max(step / max_steps, (time.time() - t0) / budget)  # drives the LR schedule too
            stop = progress >= 1.0
            if stop:
                break
            ce, aux = train_step(model, opt, batch, lr_at(progress, step))
            step += 1
            if step % 20 == 0 or step == 1:
                log(f"step {step}/{max_steps} epoch {step / steps_per_epoch:.2f} ce {ce:.3f} aux {aux:.3f} "
                    f"lr {lr_at(progress, step):.2e} elapsed {time.time() - t0:.0f}s")
    return {"steps": step, "max_steps": max_steps, "steps_per_epoch": steps_per_epoch,
            "wall_seconds": round(time.time() - t0, 1), "epochs": round(step / steps_per_epoch, 3)}


def reload_check(out: Path, eval_tokens, before: float, device: str = "cpu") -> dict:
    """Reload the saved directory with transformers in float32 and measure the held-out perplexity again."""
    import torch
    from transformers import MixtralForCausalLM
    model = MixtralForCausalLM.from_pretrained(str(out), dtype=torch.float32).to(device)
    theta = model.config.rope_parameters["rope_theta"]
    after = evaluate(model, eval_tokens)["ppl"]
    return {"ppl_reloaded_float32": round(after, 3), "ppl_before_save_float32": round(before, 3),
            "relative_change": round(after / before - 1, 5), "rope_theta_reloaded": theta}


def train(out: Path, minutes: float, seed: int, text_dir: Path, device: str = "cpu", threads: int = 2) -> dict:
    import torch
    import transformers
    torch.set_num_threads(threads)  # the machine is shared
    log = lambda msg: print(msg, flush=True)
    calib_path, eval_path = text_dir / "calib.txt", text_dir / "eval.txt"
    calib_tokens, eval_tokens = tokenize_file(calib_path), tokenize_file(eval_path)
    log(f"calib tokens {len(calib_tokens)}, eval tokens {len(eval_tokens)}")
    model = build_model(seed).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters {n_params} ({2 * n_params / 1e6:.1f} MB in bf16)")
    run = run_training(model, calib_tokens, minutes, seed, log)
    log(f"training done: {run}")
    ppl_fp32 = evaluate(model, eval_tokens)["ppl"]
    # Then measure what is saved: bf16-rounded weights evaluated in float32, as the reload check will be.
    # Round the parameters only: model.to(bfloat16) would also round the rotary inv_freq buffer.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    result = evaluate(model, eval_tokens)
    log(f"held-out ppl {ppl_fp32:.2f} with float32 weights, {result['ppl']:.2f} rounded to bf16")
    save_model(model, out)
    (out / "LICENSE.md").write_text(LICENSE_MD, encoding="utf-8")
    record = training_record(seed, run, n_params, result, calib_tokens, eval_tokens, calib_path, eval_path, out)
    record["heldout_ppl_float32_weights_before_rounding"] = round(ppl_fp32, 3)
    record["reload_check"] = reload_check(out, eval_tokens, result["ppl"], device)
    record["device"] = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu, {threads} threads"
    record["command"] = " ".join(["python", "examples/train_tiny.py"] + sys.argv[1:])
    record["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    dump_json(out / "TRAINING.json", record)
    log(json.dumps(record["reload_check"]))
    return record


def training_record(seed, run, n_params, result, calib_tokens, eval_tokens, calib_path, eval_path, out) -> dict:
    root = Path(__file__).resolve().parents[1]
    rel = lambda p: str(p.resolve().relative_to(root)) if p.resolve().is_relative_to(root) else str(p)
    return {
        "seed": seed, "steps": run["steps"], "max_steps": run["max_steps"], "epochs": run["epochs"],
        "tokens_seen": run["steps"] * BATCH * SEQ_LEN, "sequence_length": SEQ_LEN, "batch_size": BATCH,
        "optimizer": {"name": "AdamW", "peak_lr": PEAK_LR, "min_lr": PEAK_LR * MIN_LR_FRAC, "betas": [0.9, 0.95],
                      "weight_decay": WEIGHT_DECAY, "warmup_steps": WARMUP_STEPS, "grad_clip": 1.0,
                      "schedule": "linear warmup, cosine decay over max(step/max_steps, elapsed/budget)"},
        "load_balancing": {"kind": "Switch f_i*P_i per layer, averaged over layers", "coefficient": AUX_COEF},
        "wall_seconds": run["wall_seconds"], "parameters": n_params,
        "model_bytes": (out / "model.safetensors").stat().st_size,
        "data": {rel(p): {"sha256": sha256(p), "tokens": len(t)} for p, t in
                 ((calib_path, calib_tokens), (eval_path, eval_tokens))},
        "tokenizer": {"file": "mistral_common/data/tokenizer.model.v1", "sha256": sha256(tokenizer_path())},
        "eval_protocol": "eval.txt tokenized as one string; non-overlapping windows of BOS + 255 tokens; "
                         "mean NLL over every eval token; weights rounded to bf16, computed in float32",
        "heldout_ppl": round(result["ppl"], 3), "heldout_mean_nll": round(result["mean_nll"], 5),
        "heldout_tokens_scored": result["tokens"],
        "unigram_ppl": round(unigram_ppl(calib_tokens, eval_tokens), 3),
        "unigram_protocol": "add-one smoothed token counts from calib.txt over 32000 pieces, same eval tokens",
        "expert_share_heldout": result["expert_share"],
        "expert_share_note": "share of top-2 slots per expert, rows = layers; uniform is 0.125",
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-text", help="extract calib.txt / eval.txt from gensim's Wikipedia test dump")
    p.add_argument("source", type=Path, help="gensim sdist .tar.gz or the enwiki ...shortened.bz2 inside it")
    p.add_argument("--out", type=Path, default=Path("mxtools/assets/text"))
    t = sub.add_parser("train", help="train the tiny Mixtral on calib.txt and save it")
    t.add_argument("--out", type=Path, default=Path("mxtools/assets/tiny-mixtral"))
    t.add_argument("--text", type=Path, default=Path("mxtools/assets/text"))
    t.add_argument("--minutes", type=float, default=20.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="torch device; the recipe is the same on any device")
    t.add_argument("--threads", type=int, default=2, help="CPU threads (the development machine is shared)")
    t.add_argument("--tokenizer", type=Path, help="tokenizer.model.v1 path (default: mistral-common's copy)")
    args = parser.parse_args(argv)
    if args.cmd == "prepare-text":
        info = prepare_text(args.source, args.out)
        print(json.dumps({k: v for k, v in info.items() if k != "eval_titles"}))
    else:
        global TOKENIZER_OVERRIDE
        TOKENIZER_OVERRIDE = args.tokenizer
        train(args.out, args.minutes, args.seed, args.text, args.device, args.threads)


if __name__ == "__main__":
    main()
