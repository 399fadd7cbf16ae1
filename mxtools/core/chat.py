"""Chat templates measured against mistral-common, the reference tokenization of Mixtral-Instruct conversations.

mistral-common's v1 instruct tokenizer (`encode_chat_completion`) writes BOS, then encodes every message as its
own SentencePiece segment (so each one starts with the "▁" dummy prefix): a user turn as "[INST] {text} [/INST]"
(the system prompt, if any, joined to the first user turn as "{system}\\n\\n{text}"), an assistant turn as
"{text}" followed by EOS. A Jinja template rendered by transformers or llama.cpp becomes one string that their
tokenizers split at special tokens (<s>, </s>, <unk>), encoding each piece in between with one "▁" prefix
(tokenizer.json's Prepend normalizer, llama.cpp's add_space_prefix). So an assistant turn must follow "[/INST]"
after one space, which then plays the part of its dummy prefix; the original Mixtral-Instruct template writes
"[/INST]" + answer with no space and loses that "▁" on every answer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import signal
import threading
import time
from pathlib import Path

from .errors import MxError
from .tokenizer import Tokenizer, default_model_path

MISTRAL_COMMON_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('after an optional system message, roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' and loop.first and system %}"
    "{{- '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'user' %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('only user and assistant roles (and a first system message) are supported') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

_u = lambda text: {"role": "user", "content": text}
_a = lambda text: {"role": "assistant", "content": text}
_s = lambda text: {"role": "system", "content": text}

# The fixed set `inspect` checks: the ways a template can lose or gain a "▁" or split a segment differently.
CONVERSATIONS = (
    ("single user turn", [_u("Hello, how are you?")]),
    ("two turns", [_u("Hi there"), _a("Hello! How can I help?"), _u("Translate 'chat' to French.")]),
    ("ends with an answer", [_u("Name a colour."), _a("Blue."), _u("Another one?"), _a("Green.")]),
    ("leading spaces", [_u("  indented question"), _a("   spaced answer"), _u(" one space")]),
    ("trailing spaces", [_u("ends with spaces   "), _a("answer with a trailing space "), _u("ok ")]),
    ("tabs and newlines", [_u("line one\n\tline two\n\n"), _a("a\tb\nc\n"), _u("\n\nstarts with newlines")]),
    ("non-Latin text", [_u("Привет, как дела?"), _a("日本語で答えます。"), _u("مرحبا بالعالم 🙂 Ελληνικά")]),
    ("digits", [_u("Compute 12345 * 6789"), _a("83810205"), _u("3.14159, 2,718 and 0042")]),
    ("literal [INST]", [_u("What does [INST] mean? And [/INST]?"), _a("[INST] starts an instruction [/INST]"),
                        _u("[INST] [/INST]")]),
    ("system prompt", [_s("You are terse.\nAnswer in one word."), _u("Capital of France?"), _a("Paris."),
                       _u("Of Italy?")]),
    ("system prompt, single turn", [_s("  Be kind. "), _u("Hi")]),
    ("long conversation", [m for i in range(4) for m in (_u(f"Question {i}: why?"), _a(f"Because {i}."))]
     + [_u("Thanks!")]),
)

# --- rendering as transformers does (sandboxed Jinja, trim_blocks + lstrip_blocks) ---

class TemplateError(MxError):
    """A chat template that does not compile or raises while rendering."""


def _raise(message):
    raise TemplateError(str(message))


#: what one rendering may cost: a template is code from the checkpoint's author, and a hostile one can loop for
#: ever or build huge strings ('{% for i in range(99999) %}{% for j in range(99999) %}x...')
RENDER_SECONDS = 2.0
RENDER_CHARS = 1 << 20


class _OverBudget(Exception):
    pass


def _budgeted_environment():
    """A sandboxed Jinja environment whose calls and arithmetic check the current rendering's deadline."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Budgeted(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+"])
        deadline = float("inf")

        def _check(self):
            if time.monotonic() > self.deadline:
                raise _OverBudget(f"takes over {RENDER_SECONDS:g} s")

        def call(self, context, obj, *args, **kwargs):
            self._check()
            return super().call(context, obj, *args, **kwargs)

        def call_binop(self, context, operator, left, right):
            self._check()
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise _OverBudget("raises a number to a power over 64")
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > RENDER_CHARS:
                    raise _OverBudget(f"builds a value of over {RENDER_CHARS} items")
            out = super().call_binop(context, operator, left, right)
            if isinstance(out, (str, list, tuple)) and len(out) > RENDER_CHARS:
                raise _OverBudget(f"builds a value of over {RENDER_CHARS} items")
            return out

    return Budgeted


@functools.cache
def _compile(template: str):
    from jinja2 import TemplateError as JinjaError
    from jinja2.ext import loopcontrols
    env = _budgeted_environment()(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(template)
    except JinjaError as exc:
        raise TemplateError(f"chat template does not compile: {exc}") from None


@functools.lru_cache(maxsize=4)
def _pieces(sp_model: bytes):
    """The SentencePiece processor and its special pieces (control and unknown: what tokenizer.json lists as
    added tokens and llama.cpp splits out with special=True), built once per model."""
    tok = Tokenizer(sp_model)
    sp = tok.processor()
    special = {sp.id_to_piece(i): i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)}
    alternatives = "|".join(re.escape(p) for p in sorted(special, key=len, reverse=True))
    return sp, special, re.compile(f"({alternatives})" if special else "(?!)")  # (?!): a model with none


def render(template: str, messages: list[dict], tok: Tokenizer) -> str:
    from jinja2 import TemplateError as JinjaError
    sp = _pieces(tok.sp_model)[0]
    compiled = _compile(template)
    try:
        with _deadline(compiled.environment):
            out, size = [], 0
            for piece in compiled.generate(messages=messages, add_generation_prompt=False,
                                           bos_token=sp.id_to_piece(tok.bos_id), eos_token=sp.id_to_piece(tok.eos_id),
                                           unk_token=sp.id_to_piece(tok.unk_id)):
                size += len(piece)
                if size > RENDER_CHARS:
                    raise _OverBudget(f"renders over {RENDER_CHARS} characters")
                out.append(piece)
                compiled.environment._check()
            return "".join(out)
    except _OverBudget as exc:
        raise TemplateError(f"chat template rejected: it {exc}") from None
    except (JinjaError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError, RecursionError,
            MemoryError) as exc:  # what a template does wrong: '[INST] ' + None, range(10**9), a macro calling itself
        raise TemplateError(f"chat template fails to render: {exc}") from None


@contextlib.contextmanager
def _deadline(env):
    """Arm the environment's deadline; in the main thread also a timer signal, which stops loops that call
    nothing (the environment's checks only run on calls, arithmetic and output)."""
    env.deadline = time.monotonic() + RENDER_SECONDS
    main = threading.current_thread() is threading.main_thread()
    if main:
        def expired(signum, frame):
            raise _OverBudget(f"takes over {RENDER_SECONDS:g} s")
        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS + 0.5)
    try:
        yield
    finally:
        env.deadline = float("inf")
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def tokenize_rendered(text: str, tok: Tokenizer) -> list[int]:
    """Token ids of a rendered template as transformers (tokenizer.json) and llama.cpp (special=True) make them:
    split at special pieces, each stretch between them a SentencePiece segment with its own dummy prefix."""
    sp, special, pattern = _pieces(tok.sp_model)
    ids = []
    for part in pattern.split(text):
        ids += [special[part]] if part in special else sp.encode(part) if part else []
    return ids


def template_ids(template: str, messages: list[dict], tok: Tokenizer) -> list[int]:
    return tokenize_rendered(render(template, messages, tok), tok)


# --- the reference ---

@functools.cache
def _reference_tokenizer(mode: str):
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    return MistralTokenizer.from_file(str(default_model_path()), mode=ValidationMode(mode))


def reference_ids(messages: list[dict]) -> list[int]:
    """mistral-common's `encode_chat_completion` with the v1 tokenizer it ships. A conversation that ends with
    an answer is a finetuning sample to mistral-common; one that ends with a question, a prompt."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    kinds = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    mode = "finetuning" if messages[-1]["role"] == "assistant" else "test"
    return _reference_tokenizer(mode).encode_chat_completion(request).tokens


# --- the check inspect reports and convert acts on ---

def first_difference(template: str, tok: Tokenizer, conversations=CONVERSATIONS) -> dict | None:
    """None when `template` tokenizes every conversation exactly as mistral-common does; else where it first
    differs: the conversation, the token index, and both ids and pieces there (or the template's error)."""
    ours, v1 = _pieces(tok.sp_model)[0], _pieces(default_model_path().read_bytes())[0]
    piece = lambda sp, ids, k: sp.id_to_piece(ids[k]) if k < len(ids) else None
    for name, messages in conversations:
        want = reference_ids(messages)
        try:
            got = template_ids(template, messages, tok)
        except TemplateError as exc:
            return {"conversation": name, "error": exc.message}
        if got != want:
            k = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            return {"conversation": name, "token": k, "expected": want[k] if k < len(want) else None,
                    "expected_piece": piece(v1, want, k), "got": got[k] if k < len(got) else None,
                    "got_piece": piece(ours, got, k)}
    return None


def describe_difference(diff: dict) -> str:
    if "error" in diff:
        return f"conversation {diff['conversation']!r}: {diff['error']}"
    show = lambda i, p: "end of tokens" if i is None else f"{i} {p!r}"
    return (f"conversation {diff['conversation']!r}, token {diff['token']}: mistral-common has "
            f"{show(diff['expected'], diff['expected_piece'])}, the template gives "
            f"{show(diff['got'], diff['got_piece'])}")


def report(tok: Tokenizer | None) -> dict | None:
    """What `inspect` shows: whether the checkpoint's own template reproduces mistral-common on CONVERSATIONS."""
    if tok is None or not tok.chat_template or not tok.sp_model:  # sp_model b"": a tokenizer.json of another vocabulary
        return None
    diff = first_difference(tok.chat_template, tok)
    return {"reproduces_mistral_common": diff is None, "conversations": len(CONVERSATIONS),
            "first_difference": diff}


def choose_template(tok: Tokenizer, choice: str) -> tuple[Tokenizer, str | None]:
    """The tokenizer to write and a line saying what changed (None when nothing did).

    auto: replace the source's template by MISTRAL_COMMON_TEMPLATE when it is known to differ from mistral-common
    and ours does not (a vocabulary other than v1's); keep: unchanged; mistral-common: ours; else a Jinja file."""
    if choice == "keep" or (choice == "auto" and not tok.chat_template):
        return tok, None
    if choice == "auto":
        diff = first_difference(tok.chat_template, tok)
        if diff is None or first_difference(MISTRAL_COMMON_TEMPLATE, tok) is not None:
            return tok, None
        note = f"chat template: wrote mistral-common's; the source's differs from it at {describe_difference(diff)}"
        return dataclasses.replace(tok, chat_template=MISTRAL_COMMON_TEMPLATE), note
    template = MISTRAL_COMMON_TEMPLATE if choice == "mistral-common" else _read_template(Path(choice))
    diff = first_difference(template, tok)
    verdict = ("reproduces mistral-common" if diff is None
               else f"differs from mistral-common at {describe_difference(diff)}")
    return dataclasses.replace(tok, chat_template=template), f"chat template: {choice}, which {verdict}"


def set_chat_template(ckpt, choice: str) -> str | None:
    """Give a Checkpoint about to be written the chat template `choice` asks for; the line saying what changed.
    A source without a tokenizer is written with the v1 one, which gets a template only when asked for one."""
    if ckpt.tokenizer is None and choice in ("auto", "keep"):
        return None
    ckpt.tokenizer, note = choose_template(ckpt.tokenizer or Tokenizer.default(), choice)
    return note


def _read_template(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
        _compile(text)
    except (UnicodeDecodeError, TemplateError) as exc:
        raise TemplateError(getattr(exc, "message", "not UTF-8 text"), file=path) from None
    return text
