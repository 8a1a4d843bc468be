"""Tokenizers: word vocabulary and the local Hugging Face word-piece tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from itmatch.config import TextConfig
from itmatch.data.text import (
    HFTokenizer,
    Tokenizer,
    WordVocab,
    build_tokenizer,
    default_bert_path,
    load_tokenizer,
    tokenize_words,
)
from itmatch.errors import ItmatchError

CAPTIONS = ["A dog runs, fast!", "a dog sleeps.", "The cat runs"]


def test_tokenize_words_lowercases_and_splits_punctuation():
    assert tokenize_words("A dog's ball, RED!") == ["a", "dog", "'", "s", "ball", ",", "red", "!"]


def test_word_vocab_build_and_encode():
    v = WordVocab.build(CAPTIONS, min_count=2)
    assert v.words[:5] == ["<pad>", "<unk>", "<start>", "<end>", "<mask>"]
    assert (v.pad_id, v.unk_id, v.start_id, v.end_id, v.mask_id) == (0, 1, 2, 3, 4)
    # counts: a 2, dog 2, runs 2; everything else once
    assert v.words[5:] == ["a", "dog", "runs"]
    assert v.vocab_size == 8 and v.kind == "word" and v.special_ids == [0, 1, 2, 3, 4]
    assert v.encode("a cat runs") == [2, 5, 1, 7, 3]
    tokens, mask = v.encode_batch(["a dog", "dog runs a dog"], max_length=64)
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    assert tokens.tolist() == [[2, 5, 6, 3, 0, 0], [2, 6, 7, 5, 6, 3]]
    assert mask.tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    truncated, tmask = v.encode_batch(["dog runs a dog"], max_length=4)
    assert truncated.tolist() == [[2, 6, 7, 3]] and tmask.all()
    assert isinstance(v, Tokenizer)


def test_word_vocab_save_load_round_trip(tmp_path):
    v = WordVocab.build(CAPTIONS)
    v.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "itmatch_tokenizer.json").read_text())
    assert meta["kind"] == "word"
    w = load_tokenizer(tmp_path / "tok")
    assert isinstance(w, WordVocab) and w.words == v.words
    for a, b in zip(v.encode_batch(CAPTIONS, 16), w.encode_batch(CAPTIONS, 16)):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def minilm():
    return HFTokenizer()


def test_hf_tokenizer_encodes_like_transformers(minilm):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(default_bert_path()), local_files_only=True)
    caps = ["a dog runs", "unbelievable xylophones on a table, at night"]
    tokens, mask = minilm.encode_batch(caps, max_length=8)
    enc = ref(caps, padding=True, truncation=True, max_length=8)
    assert tokens.tolist() == enc["input_ids"] and mask.long().tolist() == enc["attention_mask"]
    assert tokens.shape == (2, 8) and mask[0].sum() == 5  # [CLS] a dog runs [SEP] + padding
    assert minilm.kind == "wordpiece" and minilm.vocab_size == 30522
    assert minilm.pad_id == ref.pad_token_id and minilm.mask_id == ref.mask_token_id
    assert {ref.cls_token_id, ref.sep_token_id, ref.pad_token_id, ref.mask_token_id} <= set(minilm.special_ids)
    table = minilm.continuation_table()
    pieces = ref.convert_ids_to_tokens(ref("xylophones")["input_ids"])
    ids = ref("xylophones")["input_ids"]
    assert [bool(table[i]) for i in ids] == [p.startswith("##") for p in pieces]
    assert table[ids].any()  # the word really is split into continuation pieces


def test_hf_tokenizer_save_load_round_trip(minilm, tmp_path):
    minilm.save(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert isinstance(back, HFTokenizer) and back.source == str(default_bert_path())
    assert (tmp_path / "tok" / "tokenizer_config.json").is_file()
    caps = ["a woman holds an umbrella", "zebras!"]
    for a, b in zip(minilm.encode_batch(caps, 32), back.encode_batch(caps, 32)):
        assert torch.equal(a, b)


def test_build_tokenizer_from_config(tmp_path):
    gru = build_tokenizer(TextConfig(kind="gru", vocab_min_count=2), CAPTIONS)
    assert isinstance(gru, WordVocab) and gru.vocab_size == 8
    bert = build_tokenizer(TextConfig(kind="bert"), CAPTIONS)
    assert isinstance(bert, HFTokenizer) and bert.kind == "wordpiece"
    with pytest.raises(ItmatchError, match="model.text.kind"):
        build_tokenizer(TextConfig(kind="lstm"), CAPTIONS)
    with pytest.raises(ItmatchError, match="tokenizer folder not found: .*nowhere"):
        build_tokenizer(TextConfig(kind="bert", bert_path=str(tmp_path / "nowhere")), CAPTIONS)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ItmatchError, match="no saved tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "itmatch_tokenizer.json").write_text("{not json")
    with pytest.raises(ItmatchError, match="is corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / "itmatch_tokenizer.json").write_text('{"kind": "bpe"}')
    with pytest.raises(ItmatchError, match="unknown tokenizer kind 'bpe'"):
        load_tokenizer(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ItmatchError, match="cannot load a tokenizer"):
        HFTokenizer(empty)
