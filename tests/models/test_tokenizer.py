"""CLIP's BPE tokenizer on a tiny vocabulary written here, in both file layouts (OpenAI's
gzipped merges, Hugging Face's vocab.json + merges.txt), with ids worked out by hand."""

import gzip
import json

import pytest

from cpal.errors import CheckpointError
from cpal.models.tokenizer import END, START, BPETokenizer, byte_symbols, split_words

MERGES = [("l", "l"), ("h", "e"), ("he", "ll"), ("o", "r"), ("hell", "o</w>")]
"""A tiny merge table: 'hello' becomes one token, 'world' becomes w, or, l, d</w>."""


def symbol_id(symbol: str) -> int:
    """Ids of the base vocabulary: 256 byte symbols, then the same with </w>."""
    symbols = list(byte_symbols().values())
    if symbol.endswith("</w>"):
        return 256 + symbols.index(symbol[:-4])
    return symbols.index(symbol)


def write_openai(path, merges=MERGES):
    lines = ["#version: 0.2 (header line)", *(f"{a} {b}" for a, b in merges)]
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    return path


def write_hf(folder, merges=MERGES):
    openai = BPETokenizer(merges)
    (folder / "vocab.json").write_text(json.dumps(openai.encoder))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2",
                                                  *(f"{a} {b}" for a, b in merges)]))
    return folder / "vocab.json"


def test_byte_alphabet_and_base_ids():
    symbols = byte_symbols()
    assert len(symbols) == 256 and len(set(symbols.values())) == 256
    assert symbols[ord("a")] == "a" and symbols[ord(" ")] == "Ġ"  # space -> U+0120, as GPT-2
    assert symbol_id("!") == 0 and symbol_id("a") == ord("a") - ord("!")
    tok = BPETokenizer.bytes_only()
    assert tok.vocab_size == 514 and (tok.start, tok.end) == (512, 513)


def test_pre_tokenisation_follows_clips_pattern():
    assert split_words("it's 12 cats!!") == ["it", "'s", "1", "2", "cats", "!!"]
    assert split_words(f"{START}a,b{END}") == [START, "a", ",", "b", END]
    assert split_words("café   naïve") == ["café", "naïve"]  # letters of any script


def test_merges_by_hand_in_both_file_layouts(tmp_path):
    openai = BPETokenizer.from_files(write_openai(tmp_path / "bpe_simple_vocab_16e6.txt.gz"))
    hf = BPETokenizer.from_files(write_hf(tmp_path))
    # 'hello': h e l l o</w> -> (l l) -> (h e) -> (he ll) -> (hell o</w>) = one token, the
    # 5th merge: id 512 + 4. 'world': w o r l d</w> -> (o r) -> w, or, l, d</w>.
    hello = [512 + 4]
    world = [symbol_id("w"), 512 + 3, symbol_id("l"), symbol_id("d</w>")]
    for tok in (openai, hf):
        assert tok.encode("  Hello   WORLD ") == hello + world  # cleaned, lower-cased
        assert tok.encode("&amp;") == [symbol_id("&</w>")]  # HTML entities unescaped
        assert tok.vocab_size == 512 + len(MERGES) + 2
    ids = openai.tokenize(["hello world"], context_length=8)
    assert ids.tolist() == [[openai.start, *hello, *world, openai.end, 0]]
    assert hf.tokenize(["hello world"], 8).tolist() == ids.tolist()
    assert openai.start == 512 + len(MERGES) and openai.end == openai.start + 1


def test_a_folder_and_unreadable_files(tmp_path):
    write_openai(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    assert BPETokenizer.from_files(tmp_path).vocab_size == 519
    with pytest.raises(CheckpointError, match="tokenizer file not found"):
        BPETokenizer.from_files(tmp_path / "nope.txt.gz")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"merges.txt: not found"):
        BPETokenizer.from_files(tmp_path / "hf" / "vocab.json")
    bad = tmp_path / "bad.txt"
    bad.write_text("#version\nl l l\n")
    with pytest.raises(CheckpointError, match=r"bad.txt line 2: expected two symbols"):
        BPETokenizer.from_files(bad)


def test_a_prompt_longer_than_the_context_is_refused():
    tok = BPETokenizer.bytes_only()
    assert tok.tokenize(["ab"], 5).tolist() == [[512, symbol_id("a"), symbol_id("b</w>"), 513,
                                                 0]]
    with pytest.raises(CheckpointError, match="more than the context length 4"):
        tok.tokenize(["abc"], 4)
