"""CLIP's byte-level BPE tokenizer, from the user's vocabulary files.

The same token ids as OpenAI's `SimpleTokenizer` and Hugging Face's `CLIPTokenizer`: text
is cleaned (HTML entities unescaped, whitespace collapsed, lower-cased), split into
words, numbers and punctuation runs, each word's UTF-8 bytes mapped to printable symbols
(GPT-2's byte alphabet), the last one marked with `</w>`, and symbol pairs merged in the
order the merges file ranks them. A prompt becomes [start] + tokens + [end], padded with
zeros to the context length.

Vocabulary files (nothing is downloaded):
- OpenAI's `bpe_simple_vocab_16e6.txt.gz`: a header line, then merges; the vocabulary is
  the 256 byte symbols, the same with `</w>`, one symbol per merge, then the two specials;
- Hugging Face's `vocab.json` (symbol -> id) with `merges.txt` beside it.
Both use the first 48,894 merges (49,408 ids). Without files, `bytes_only()` has no merges
at all (514 ids): enough for randomly initialised text encoders, never for CLIP's weights.

One difference from OpenAI's code: it repairs mojibake with `ftfy` first; prompts here
are the config's own text, so that step is left out.
"""

from __future__ import annotations

import gzip
import html
import json
import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import torch

from cpal.errors import CheckpointError

START, END = "<|startoftext|>", "<|endoftext|>"
MAX_MERGES = 49152 - 256 - 2
"""Merges CLIP uses (its files hold more): 48,894, for 49,408 token ids."""
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@lru_cache(maxsize=1)
def byte_symbols() -> dict[int, str]:
    """Each byte's printable symbol: printable Latin-1 bytes stand for themselves, the
    others (controls, space, ...) are moved to code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}  # insertion order: the vocabulary's order
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _kind(char: str) -> str:
    """'L' letter, 'N' number, 'S' whitespace, 'P' anything else."""
    if char.isspace():
        return "S"
    category = unicodedata.category(char)
    return category[0] if category[0] in "LN" else "P"


def split_words(text: str) -> list[str]:
    """CLIP's pre-tokenisation, alternative by alternative at each position: a special
    token, a contraction, a run of letters, one number character, or a run of other
    non-space characters; whitespace separates."""
    pieces: list[str] = []
    i, n = 0, len(text)
    while i < n:
        match = next((s for s in (START, END, *_CONTRACTIONS) if text.startswith(s, i)), None)
        if match is not None:
            pieces.append(match)
            i += len(match)
            continue
        kind = _kind(text[i])
        if kind == "S":
            i += 1
            continue
        if kind == "N":
            pieces.append(text[i])
            i += 1
            continue
        j = i + 1
        while j < n and _kind(text[j]) == kind:
            j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip().lower()


class BPETokenizer:
    """Byte-level BPE with a merge ranking and a symbol -> id table."""

    def __init__(self, merges: Sequence[tuple[str, str]], encoder: dict[str, int] | None = None
                 ) -> None:
        merges = [tuple(m) for m in merges][:MAX_MERGES]
        self.ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        if encoder is None:
            symbols = list(byte_symbols().values())
            vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
                     START, END]
            encoder = {s: i for i, s in enumerate(vocab)}
        missing = [s for s in (START, END) if s not in encoder]
        if missing:
            raise CheckpointError(f"the tokenizer vocabulary lacks {', '.join(missing)}")
        self.encoder = encoder
        self.start, self.end = encoder[START], encoder[END]
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def bytes_only(cls) -> BPETokenizer:
        """No merges: every byte a token (for randomly initialised text encoders)."""
        return cls([])

    @classmethod
    def from_files(cls, path: str | Path) -> BPETokenizer:
        """OpenAI's merges file (.txt or .txt.gz), Hugging Face's vocab.json (merges.txt
        beside it), or a folder holding one of them."""
        path = Path(path).expanduser()
        if path.is_dir():
            found = [p for p in (path / "bpe_simple_vocab_16e6.txt.gz", path / "vocab.json")
                     if p.is_file()]
            if not found:
                raise CheckpointError(f"{path}: no bpe_simple_vocab_16e6.txt.gz or vocab.json")
            path = found[0]
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file not found")
        if path.suffix == ".json":
            merges_path = path.with_name("merges.txt")
            if not merges_path.is_file():
                raise CheckpointError(f"{merges_path}: not found (vocab.json needs its merges)")
            try:
                encoder = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{path}: not a JSON vocabulary ({exc})") from exc
            if not isinstance(encoder, dict):
                raise CheckpointError(f"{path}: expected a JSON object of symbol -> id")
            return cls(_read_merges(merges_path, merges_path.read_bytes()), encoder)
        raw = path.read_bytes()
        if path.suffix == ".gz":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as exc:
                raise CheckpointError(f"{path}: not a gzip file ({exc})") from exc
        return cls(_read_merges(path, raw))

    @property
    def vocab_size(self) -> int:
        return max(self.encoder.values()) + 1

    def bpe(self, word: str) -> list[str]:
        """The symbols of one word after every merge that applies, best-ranked first."""
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(self.ranks.get(p, -1), i) for i, p in enumerate(pairwise(parts))]
            ranked = [(r, i) for r, i in pairs if r >= 0]
            if not ranked:
                break
            best = parts[min(ranked)[1]], parts[min(ranked)[1] + 1]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        symbols = byte_symbols()
        ids: list[int] = []
        for piece in split_words(clean(text)):
            if piece in (START, END):
                ids.append(self.encoder[piece])
                continue
            word = "".join(symbols[b] for b in piece.encode("utf-8"))
            for token in self.bpe(word):
                if token not in self.encoder:
                    raise CheckpointError(f"the tokenizer vocabulary has no symbol {token!r}")
                ids.append(self.encoder[token])
        return ids

    def tokenize(self, texts: Sequence[str], context_length: int = 77) -> torch.Tensor:
        """(N, context_length) int64: start, tokens, end, zeros (OpenAI's clip.tokenize)."""
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.start, *self.encode(text), self.end]
            if len(ids) > context_length:
                raise CheckpointError(
                    f"prompt {text!r} is {len(ids)} tokens, more than the context length "
                    f"{context_length}")
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def _read_merges(path: Path, raw: bytes) -> list[tuple[str, str]]:
    """Merge pairs after the header line, as both vocab files write them."""
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text ({exc})") from exc
    merges = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise CheckpointError(f"{path} line {number}: expected two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges
