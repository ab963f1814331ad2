"""Tokenizers: SentencePiece (.model) or Hugging Face tokenizers (tokenizer.json), one small interface.

BOS is never added implicitly: callers say `encode(text, bos=True)`, so perplexity and generation control it.

Chat: a Jinja chat template is read from chat_template.jinja or tokenizer_config.json ("chat_template") beside the
tokenizer file, as Hugging Face ships it. Without one, chats render in a plain format (see PLAIN_CHAT_FORMAT).
"""
from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path

from ..errors import FourbitError


def prompt_ids(tok, text: str, default_bos: int | None) -> list[int]:
    """A text prompt's token ids after BOS: the tokenizer's BOS, else `default_bos` (the model's), else none."""
    bos = tok.bos_id if tok.bos_id is not None else default_bos
    return ([] if bos is None else [bos]) + tok.encode(text)


class TextStream:
    """Output tokens -> text pieces. Each add() decodes a short window ending at the newest token and emits what the
    new tokens add to it, so the pieces concatenate to the decoded output: a SentencePiece word keeps its leading
    space (decoded after the previous token, not at the start of a text), a character split over byte tokens is
    held back while its text ends in U+FFFD, and so is a tail that may be the start of a stop string."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] = ()):
        self.tok, self.stop = tokenizer, stop
        self.ids = list(prompt_ids[-1:])  # the last prompt token: context for the first output token
        self.start, self.read = 0, len(self.ids)  # ids[start:read]: already in text, the context for what follows
        self.text, self.sent = "", 0  # the output text so far; how much of it add() returned
        self.stopped = False

    def add(self, new_ids: list[int], final: bool) -> str:
        self.ids += new_ids
        if len(self.ids) > self.read:
            head = self.tok.decode(self.ids[self.start:self.read])
            full = self.tok.decode(self.ids[self.start:])
            new = full[len(head):] if full.startswith(head) else self.tok.decode(self.ids[self.read:])
            if final or not new.endswith("\ufffd"):  # else wait for the rest of a multi-byte character
                self.start, self.read = self.read, len(self.ids)
                self._append(new)
        end = len(self.text) if final or self.stopped else len(self.text) - self._stop_prefix()
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    def _append(self, new: str) -> None:
        old = len(self.text)
        self.text += new
        # only occurrences that end in the new text are new; the earliest one ends the output
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, old - len(s) + 1))) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True

    def _stop_prefix(self) -> int:
        """Length of the longest tail of text that a stop string starts with (it may complete with the next token)."""
        return max((k for s in self.stop for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:k])), default=0)


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            found = [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]
            if not found:
                raise FourbitError(f"no tokenizer.json or tokenizer.model in {path}: pass --tokenizer FILE")
            path = found[0]
        if not path.is_file():
            raise FourbitError(f"tokenizer file not found: {path}")
        self.path = path
        if path.suffix == ".model":
            import sentencepiece as spm

            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(path))
            except (RuntimeError, OSError) as e:
                raise FourbitError(f"{path} is not a SentencePiece model ({e})") from None
            self.vocab_size = self._sp.vocab_size()
            self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
            self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
            self.bos_token = None if self.bos_id is None else self._sp.id_to_piece(self.bos_id)
            self.eos_token = None if self.eos_id is None else self._sp.id_to_piece(self.eos_id)
        elif path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_file(str(path))
            except Exception as e:  # the Rust library raises its own exception type
                raise FourbitError(f"{path} is not a tokenizers JSON file ({e})") from None
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size()
            special = _special_tokens(path.parent)
            self.bos_token, self.eos_token = _content(special.get("bos_token")), _content(special.get("eos_token"))
            self.bos_id = self._id_of(self.bos_token)
            self.eos_id = self._id_of(self.eos_token)
        else:
            raise FourbitError(f"unsupported tokenizer file {path}: pass a SentencePiece .model or a tokenizer.json"
                               + (" (llama2.c's tokenizer .bin is not supported)" if path.suffix == ".bin" else ""))
        self.chat_template: str | None = _chat_template(path.parent)

    def _id_of(self, token: str | None):
        return None if token is None else self._hf.token_to_id(token)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self._sp.encode(text) if self._sp is not None else self._hf.encode(text, add_special_tokens=False).ids
        if bos:
            if self.bos_id is None:
                raise FourbitError(f"tokenizer {self.path} has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def copy_to(self, folder: Path) -> None:
        """Copy the tokenizer file into folder under its standard name (found there without --tokenizer), with the
        tokenizer_config.json / special_tokens_map.json beside it when present."""
        import shutil

        shutil.copyfile(self.path, folder / ("tokenizer" + self.path.suffix))
        for extra in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (self.path.parent / extra).is_file():
                shutil.copyfile(self.path.parent / extra, folder / extra)

    def decode(self, ids: list[int]) -> str:
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """Render a chat (dicts with "role" and "content" strings) as the prompt text for the assistant's reply.

        With a chat template: rendered as Hugging Face does (sandboxed Jinja, bos_token / eos_token variables,
        raise_exception(), add_generation_prompt=True); the text usually starts with the BOS token's string.
        Without one: PLAIN_CHAT_FORMAT, and no BOS in the text (encode_chat adds it, as prompt_ids does).
        """
        if self.chat_template is None:
            return "".join(PLAIN_CHAT_FORMAT.format(role=m["role"].capitalize(), content=m["content"])
                           for m in messages) + "Assistant:"
        return _render(self.chat_template, messages, self.bos_token or "", self.eos_token or "")

    def encode_chat(self, messages: list[dict], default_bos: int | None = None) -> list[int]:
        """Token ids of apply_chat_template(messages): special-token strings in the rendered text (BOS, EOS) become
        their ids; the plain format gets the leading BOS a text prompt gets (prompt_ids: the tokenizer's, else
        `default_bos`, the model's)."""
        text = self.apply_chat_template(messages)
        if self.chat_template is None:
            return prompt_ids(self, text, default_bos)
        if self._sp is None:
            return self._hf.encode(text, add_special_tokens=False).ids  # tokenizers matches special tokens itself
        # SentencePiece would spell "<s>" out as characters: split the text on the special strings first
        specials = {t: i for t, i in ((self.bos_token, self.bos_id), (self.eos_token, self.eos_id)) if t}
        if not specials:
            return self._sp.encode(text)
        ids: list[int] = []
        for piece in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
            if piece in specials:
                ids.append(specials[piece])
            elif piece:
                ids += self._sp.encode(piece)
        return ids


# Chats without a template: one line per message, then "Assistant:" for the model to continue, e.g.
# "System: Be brief.\nUser: Hi!\nAssistant:". Base models follow it loosely; clients may pass stop=["\nUser:"].
PLAIN_CHAT_FORMAT = "{role}: {content}\n"


def _render(template: str, messages: list[dict], bos_token: str, eos_token: str) -> str:
    compiled = _compile(template)
    import jinja2  # importable: _compile needed it

    try:
        return compiled.render(messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True)
    except jinja2.TemplateError as e:  # raise_exception() in the template, or a variable it needs and lacks
        raise FourbitError(f"the chat template rejected these messages: {e}") from None


@functools.lru_cache(maxsize=4)
def _compile(template: str):
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise FourbitError("this tokenizer has a chat template, which needs jinja2: pip install jinja2") from None

    def raise_exception(message):  # templates call it to reject a chat (e.g. roles that do not alternate)
        raise jinja2.TemplateError(message)

    # the environment Hugging Face transformers renders chat templates in, so that templates behave the same here;
    # sandboxed, as a template comes with a downloaded model
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise FourbitError(f"the tokenizer's chat template is not valid Jinja ({e}, line {e.lineno}): fix "
                           f"chat_template in tokenizer_config.json (or chat_template.jinja)") from None


def _chat_template(folder: Path) -> str | None:
    """The chat template shipped beside the tokenizer: chat_template.jinja (newer Hugging Face repos) or the
    "chat_template" entry of tokenizer_config.json (a string, or a list of named templates: "default" is used)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    f = folder / "tokenizer_config.json"
    if not f.is_file():
        return None
    template = json.loads(f.read_text()).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _content(token) -> str | None:
    if isinstance(token, dict):  # tokenizer_config.json may hold {"content": "<s>", ...}
        token = token.get("content")
    return token


def _special_tokens(folder: Path) -> dict:
    """bos/eos token strings from tokenizer_config.json or special_tokens_map.json, when present."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.is_file():
            d = json.loads(f.read_text())
            if "bos_token" in d or "eos_token" in d:
                return d
    return {}


class IdTokenizer:
    """The stand-in tokenizer of a dummy model (random weights, no vocabulary): a token id is the word " <id>".

    encode("5 17 3") == [5, 17, 3]; decode([5, 17]) == " 5 17". It lets `fourbit serve dummy:<preset>` run the
    real HTTP path (benchmarks); text that is not whitespace-separated ids is refused."""
    chat_template = None
    bos_token = eos_token = None

    def __init__(self, vocab_size: int, bos_id: int | None, eos_id: int | None):
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id
        self.path = Path("dummy")

    def encode(self, text: str, bos: bool = False) -> list[int]:
        try:
            ids = [int(w) for w in text.split()]
        except ValueError:
            raise FourbitError("a dummy model has no vocabulary: send token ids (a list of integers), or text made "
                               "of ids separated by spaces") from None
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise FourbitError(f"token ids must be in [0, {self.vocab_size})")
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return "".join(f" {i}" for i in ids)

    def encode_chat(self, messages: list[dict], default_bos: int | None = None) -> list[int]:
        return prompt_ids(self, " ".join(m["content"] for m in messages), default_bos)
