"""Chat tokens exactly as mistral-common makes them: the converted bundled model's template, rendered and tokenized
by transformers and by llama.cpp, against mistral-common's encode_chat_completion (v1), turn by turn."""
from __future__ import annotations

import json
import random
import shutil

import pytest
from click.testing import CliRunner

from mxtools.cli import main
from mxtools.core import chat
from mxtools.core.bundled import MODEL
from mxtools.layouts import open_checkpoint

ORIGINAL = json.loads((MODEL / "tokenizer_config.json").read_text())["chat_template"]  # Mixtral-Instruct's own
# Characters the generated conversations draw from: words, whitespace runs, digits, CJK, Cyrillic, brackets.
# No "<" or ">": a literal "</s>" in a message is text to mistral-common but a special token to every tokenizer
# that parses the rendered template, which no template can change.
_CHARSET = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" "0123456789" "     \n\n\t" ".,;:!?'\"()[]{}-_/*#"
            "中文字符日本語漢字한국어" "приветмир" "éèüßø")


def generated_conversations(seed: int, count: int) -> list[tuple[str, list[dict]]]:
    """`count` random valid conversations: optional system prompt, alternating turns, random text."""
    rng = random.Random(seed)
    text = lambda: "".join(rng.choice(_CHARSET) for _ in range(rng.randint(1, 40)))
    out = []
    for i in range(count):
        msgs = [chat._s(text())] if rng.random() < 0.25 else []
        turns = rng.randint(1, 7)
        msgs += [(chat._u if t % 2 == 0 else chat._a)(text()) for t in range(turns)]
        out.append((f"generated {seed}/{i}", msgs))
    return out


CASES = list(chat.CONVERSATIONS) + generated_conversations(seed=7, count=150)


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr.strip()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The bundled model converted by the CLI with its defaults, to HF and to GGUF, with what each printed."""
    root = tmp_path_factory.mktemp("chat")
    out = {}
    for layout, name in (("hf", "hf"), ("gguf", "model.gguf")):
        code, _, err = run("convert", MODEL, "--to", layout, "-o", root / name)
        assert code == 0, err
        out[layout] = (root / name, err)
    return out


def hf_ids(tokenizer, messages, template=None):
    ids = tokenizer.apply_chat_template(messages, tokenize=True, chat_template=template)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding


class LlamaCppChat:
    """llama.cpp's tokenizer (vocab only) with llama-cpp-python's Jinja formatter, as Llama builds it from the
    GGUF's tokenizer.chat_template for create_chat_completion."""

    def __init__(self, path, template=None):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        self.llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
        text = self.llm._model.token_get_text
        self.format = Jinja2ChatFormatter(template=template or self.llm.metadata["tokenizer.chat_template"],
                                          eos_token=text(self.llm.token_eos()), bos_token=text(self.llm.token_bos()))

    def ids(self, messages):
        return self.llm.tokenize(self.format(messages=messages).prompt.encode(), add_bos=False, special=True)

    def close(self):
        self.llm.close()


def test_convert_writes_mistral_commons_template_and_says_so(converted):
    hf, hf_note = converted["hf"]
    gguf, gguf_note = converted["gguf"]
    for note in (hf_note, gguf_note):
        assert note == ("chat template: wrote mistral-common's; the source's differs from it at conversation "
                        "'two turns', token 10: mistral-common has 22557 '▁Hello', the template gives 16230 'Hello'")
    assert json.loads((hf / "tokenizer_config.json").read_text())["chat_template"] == chat.MISTRAL_COMMON_TEMPLATE
    with open_checkpoint(gguf) as ckpt:
        assert ckpt.tokenizer.chat_template == chat.MISTRAL_COMMON_TEMPLATE


def test_transformers_on_the_hf_output_gives_mistral_commons_ids(converted):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(converted["hf"][0])
    for name, messages in CASES:
        assert hf_ids(tokenizer, messages) == chat.reference_ids(messages), (name, messages)


def test_llama_cpp_on_the_gguf_output_gives_mistral_commons_ids(converted):
    judge = LlamaCppChat(converted["gguf"][0])
    try:
        for name, messages in CASES:
            assert judge.ids(messages) == chat.reference_ids(messages), (name, messages)
    finally:
        judge.close()


def test_the_checker_tokenizes_as_transformers_and_llama_cpp_do(converted):
    """The inspect check's own rendering and tokenizing equals both judges', also for the original template whose
    ids differ from mistral-common's (where it raises, on system prompts, so do they)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(converted["hf"][0])
    with open_checkpoint(converted["hf"][0]) as ckpt:
        tok = ckpt.tokenizer
    judge = LlamaCppChat(converted["gguf"][0], ORIGINAL)
    differ = []
    try:
        for name, messages in CASES:
            if messages[0]["role"] == "system":
                with pytest.raises(chat.TemplateError, match="roles must alternate"):
                    chat.template_ids(ORIGINAL, messages, tok)
                continue
            ours = chat.template_ids(ORIGINAL, messages, tok)
            assert ours == hf_ids(tokenizer, messages, ORIGINAL) == judge.ids(messages), (name, messages)
            differ += [name] if ours != chat.reference_ids(messages) else []
    finally:
        judge.close()
    # the finding: a single user turn comes out right, every conversation with an answer does not
    assert differ == [name for name, m in CASES if m[0]["role"] == "user" and len(m) > 1]


def test_inspect_names_the_first_difference_without_failing(converted):
    code, out, _ = run("inspect", MODEL)
    assert code == 0
    assert ("  chat template: differs from mistral-common at conversation 'two turns', token 10: mistral-common has "
            "22557 '▁Hello', the template gives 16230 'Hello'") in out.splitlines()
    code, out, _ = run("inspect", MODEL, "--json")
    assert code == 0 and json.loads(out)["chat_template_check"] == {
        "reproduces_mistral_common": False, "conversations": len(chat.CONVERSATIONS),
        "first_difference": {"conversation": "two turns", "token": 10, "expected": 22557, "expected_piece": "▁Hello",
                             "got": 16230, "got_piece": "Hello"}}
    for layout in ("hf", "gguf"):
        code, out, _ = run("inspect", converted[layout][0])
        assert code == 0
        assert (f"  chat template: reproduces mistral-common's token ids on all {len(chat.CONVERSATIONS)} "
                "conversations") in out.splitlines()


@pytest.fixture(scope="module")
def instruct_src(tmp_path_factory):
    """A small synthetic HF model carrying the original Mixtral-Instruct template."""
    from conftest import write_synth
    src = write_synth(tmp_path_factory.mktemp("instruct") / "src", "hf")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": ORIGINAL}))
    return src


def written_template(path):
    with open_checkpoint(path) as ckpt:
        return ckpt.tokenizer.chat_template


def test_chat_template_keep_and_mistral_common(instruct_src, tmp_path):
    code, _, err = run("convert", instruct_src, "--to", "gguf", "--chat-template", "keep", "-o", tmp_path / "k.gguf")
    assert (code, err, written_template(tmp_path / "k.gguf")) == (0, "", ORIGINAL)
    code, _, err = run("convert", tmp_path / "k.gguf", "--to", "hf", "--chat-template", "mistral-common",
                       "-o", tmp_path / "m")
    assert (code, err) == (0, "chat template: mistral-common, which reproduces mistral-common")
    assert written_template(tmp_path / "m") == chat.MISTRAL_COMMON_TEMPLATE
    code, _, err = run("convert", tmp_path / "m", "--to", "gguf", "-o", tmp_path / "again.gguf")  # auto: kept
    assert (code, err, written_template(tmp_path / "again.gguf")) == (0, "", chat.MISTRAL_COMMON_TEMPLATE)


def test_chat_template_from_a_file(instruct_src, tmp_path):
    jinja = tmp_path / "t.jinja"
    jinja.write_text(ORIGINAL.replace("+ eos_token", "+ ' ' + eos_token"))
    code, _, err = run("convert", instruct_src, "--to", "hf", "--chat-template", jinja, "-o", tmp_path / "f")
    assert code == 0
    assert err == (f"chat template: {jinja}, which differs from mistral-common at conversation 'two turns', "
                   "token 10: mistral-common has 22557 '▁Hello', the template gives 16230 'Hello'")
    assert written_template(tmp_path / "f") == jinja.read_text()


def test_the_mistral_layout_stores_no_template_so_nothing_is_said(instruct_src, tmp_path):
    code, _, err = run("convert", instruct_src, "--to", "mistral", "-o", tmp_path / "m")
    assert (code, err) == (0, "")


def test_synth_without_template_stays_without_one(synth_dir, tmp_path):
    code, _, err = run("convert", synth_dir("hf", "f32"), "--to", "gguf", "-o", tmp_path / "o.gguf")
    assert (code, err, written_template(tmp_path / "o.gguf")) == (0, "", None)


@pytest.mark.parametrize("text, message", [("{% for %}", "chat template does not compile"),
                                           (b"\xff\xfe{{ x }}", "not UTF-8 text")])
def test_a_bad_template_file_is_an_input_error(instruct_src, tmp_path, text, message):
    jinja = tmp_path / "bad.jinja"
    jinja.write_bytes(text.encode() if isinstance(text, str) else text)
    out = tmp_path / "o.gguf"
    code, _, err = run("convert", instruct_src, "--to", "gguf", "--chat-template", jinja, "-o", out)
    assert code == 2 and err.count("\n") == 0 and err.startswith(f"mxtools: error: {jinja}: {message}"), err
    assert not out.exists() and not list(tmp_path.glob(".o.gguf*"))


def test_mistral_common_template_on_many_generated_conversations():
    """Our template through the checker on more random conversations than the judges see (fast: no judge)."""
    from mxtools.core.tokenizer import Tokenizer
    tok = Tokenizer.default()
    for seed in range(3):
        assert chat.first_difference(chat.MISTRAL_COMMON_TEMPLATE, tok,
                                     generated_conversations(seed, 300)) is None


@pytest.mark.parametrize("template, error", [
    ("{{ bos_token }}{% for m in messages %}{{ m.content + 1 }}{% endfor %}",
     'chat template fails to render: can only concatenate str (not "int") to str'),
    ("{% for i in range(10**9) %}{% endfor %}",
     "chat template fails to render: Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000)."),
    ("{% if %}", "chat template does not compile: Expected an expression, got 'end of statement block'")])
def test_inspect_reports_a_broken_template_as_a_difference(instruct_src, tmp_path, template, error):
    src = tmp_path / "src"
    shutil.copytree(instruct_src, src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    code, out, err = run("inspect", src)
    assert (code, err) == (0, "")
    assert f"  chat template: differs from mistral-common at conversation 'single user turn': {error}" in out


@pytest.mark.parametrize("template, error", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "renders over"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "takes over"),
    ("{{ 'x' * 1000000000 }}", "builds a value of over"),
    ("{% for c in 'ab' * 100000000 %}{% endfor %}", "builds a value of over"),
    ("{{ 2 ** 100000000 }}", "raises a number to a power over 64")])
def test_hostile_templates_are_stopped_within_the_budget(template, error):
    """A template is code from the checkpoint's author: one that loops for ever or builds huge values is refused
    within the render budget (time and size), never a hang."""
    import time
    tok = chat.Tokenizer.default()
    t0 = time.monotonic()
    with pytest.raises(chat.TemplateError, match=error):
        chat.render(template, [{"role": "user", "content": "hi"}], tok)
    assert time.monotonic() - t0 < chat.RENDER_SECONDS + 5
