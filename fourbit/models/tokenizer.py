"""Tokenizers: SentencePiece (.model) or Hugging Face tokenizers (tokenizer.json), one small interface.

BOS is never added implicitly: callers say `encode(text, bos=True)`, so perplexity and generation control it.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import FourbitError


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
        elif path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_file(str(path))
            except Exception as e:  # the Rust library raises its own exception type
                raise FourbitError(f"{path} is not a tokenizers JSON file ({e})") from None
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size()
            special = _special_tokens(path.parent)
            self.bos_id = self._id_of(special.get("bos_token"))
            self.eos_id = self._id_of(special.get("eos_token"))
        else:
            raise FourbitError(f"unsupported tokenizer file {path}: pass a SentencePiece .model or a tokenizer.json"
                               + (" (llama2.c's tokenizer .bin is not supported)" if path.suffix == ".bin" else ""))

    def _id_of(self, token):
        if isinstance(token, dict):  # tokenizer_config.json may hold {"content": "<s>", ...}
            token = token.get("content")
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
        for extra in ("tokenizer_config.json", "special_tokens_map.json"):
            if (self.path.parent / extra).is_file():
                shutil.copyfile(self.path.parent / extra, folder / extra)

    def decode(self, ids: list[int]) -> str:
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)


def _special_tokens(folder: Path) -> dict:
    """bos/eos token strings from tokenizer_config.json or special_tokens_map.json, when present."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.is_file():
            d = json.loads(f.read_text())
            if "bos_token" in d or "eos_token" in d:
                return d
    return {}
