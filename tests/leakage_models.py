"""Models and data for the leakage checks: language models with and without causal masks,
encoders, masked language models, seq2seq, and tabular models that read their labels.

The text is real: docstrings of the Python standard library, tokenised by character.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset


def corpus() -> str:
    import argparse
    import collections
    import json
    import logging
    import pathlib

    text = "\n".join((m.__doc__ or "") for m in (json, collections, argparse, logging, pathlib))
    return " ".join(text.split())


def char_tokens() -> tuple[torch.Tensor, int]:
    text = corpus()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    return ids, len(vocab)


class BlockDataset(Dataset):
    """Next-token blocks of a token stream: (x, y) with y = x shifted by one (nanoGPT style)."""

    def __init__(self, ids: torch.Tensor, block: int = 32, start: int = 0, count: int | None = None) -> None:
        self.ids, self.block = ids, block
        n = (len(ids) - 1) // block
        self.starts = list(range(start, n if count is None else min(n, start + count)))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        s = self.starts[i] * self.block
        chunk = self.ids[s : s + self.block + 1]
        return chunk[:-1], chunk[1:]


def lm_batch(batch_size: int = 16, block: int = 32):
    ids, vocab = char_tokens()
    ds = BlockDataset(ids, block)
    xs, ys = zip(*(ds[i] for i in range(batch_size)))
    return (torch.stack(xs), torch.stack(ys)), vocab


# --------------------------------------------------------------------------- language models
class AttentionLM(pl.LightningModule):
    """A one-layer transformer language model; ``mask`` picks the attention mask:
    ``causal`` (correct), ``none`` (sees everything), ``off_by_one`` (position t also sees t+1)."""

    def __init__(self, vocab: int, mask: str = "causal", dim: int = 32, block: int = 64, lr: float = 3e-3) -> None:
        super().__init__()
        self.mask, self.lr = mask, lr
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(block, dim)
        self.block = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.1, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        if self.mask == "causal":
            h = self.block(h, src_mask=nn.Transformer.generate_square_subsequent_mask(t), is_causal=True)
        elif self.mask == "off_by_one":
            bad = torch.triu(torch.full((t, t), float("-inf")), diagonal=2)
            h = self.block(h, src_mask=bad)
        else:
            h = self.block(h)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class SDPALM(nn.Module):
    """Attention written by hand with scaled_dot_product_attention, as in nanoGPT."""

    def __init__(self, vocab: int, dim: int = 32, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(128, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, idx, targets=None):
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        q, k, v = self.qkv(self.ln(x)).view(b, t, 3, 4, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        logits = self.lm_head(x)
        loss = None if targets is None else F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


class NanoGPTModule(pl.LightningModule):
    """A Lightning wrapper whose training_step calls ``self.model(x, y)`` (no ``self(...)``)."""

    def __init__(self, vocab: int, causal: bool = True) -> None:
        super().__init__()
        self.model = SDPALM(vocab, causal=causal)

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class RecurrentLM(pl.LightningModule):
    def __init__(self, vocab: int, bidirectional: bool = False, dim: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, batch_first=True, bidirectional=bidirectional)
        self.out = nn.Linear(dim * (2 if bidirectional else 1), vocab)

    def forward(self, x):
        return self.out(self.rnn(self.emb(x))[0])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).transpose(1, 2), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class ConvLM(pl.LightningModule):
    """A convolutional LM; ``causal`` pads on the left only, otherwise on both sides."""

    def __init__(self, vocab: int, causal: bool = True, dim: int = 32, kernel: int = 3) -> None:
        super().__init__()
        self.causal, self.kernel = causal, kernel
        self.emb = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, dim, kernel, padding=0 if causal else kernel // 2)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x):
        h = self.emb(x).transpose(1, 2)
        if self.causal:
            h = F.pad(h, (self.kernel - 1, 0))
        return self.out(torch.relu(self.conv(h)).transpose(1, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).reshape(-1, self.out.out_features), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class HFStyleLM(pl.LightningModule):
    """Hugging Face convention: a dict batch whose ``labels`` equal ``input_ids``; the loss shifts."""

    def __init__(self, vocab: int, causal: bool = True) -> None:
        super().__init__()
        self.lm = SDPALM(vocab, causal=causal)

    def training_step(self, batch, batch_idx):
        logits, _ = self.lm(batch["input_ids"])
        labels = batch["labels"]
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class SingleTensorLM(pl.LightningModule):
    """A batch of one token tensor; training_step makes the inputs and the targets itself."""

    def __init__(self, vocab: int, causal: bool = True) -> None:
        super().__init__()
        self.lm = SDPALM(vocab, causal=causal)

    def training_step(self, batch, batch_idx):
        _, loss = self.lm(batch[:, :-1], batch[:, 1:])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


# --------------------------------------------------------------------------- encoders
class EncoderClassifier(pl.LightningModule):
    """A bidirectional encoder over tokens that classifies the sequence (no mask on purpose)."""

    def __init__(self, vocab: int, classes: int = 4, dim: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.enc = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.1, batch_first=True)
        self.cls = nn.Linear(dim, classes)

    def forward(self, x):
        return self.cls(self.enc(self.emb(x)).mean(dim=1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class MaskedLM(pl.LightningModule):
    """A BERT-style masked language model: bidirectional, labels -100 except at masked positions."""

    def __init__(self, vocab: int, dim: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab + 1, dim)
        self.pos = nn.Embedding(128, dim)
        self.enc = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.1, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(self.enc(self.emb(x) + self.pos(torch.arange(x.shape[1]))))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input_ids"]).transpose(1, 2), batch["labels"], ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def mlm_batch(ids: torch.Tensor, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    masked = torch.rand(ids.shape, generator=g) < 0.15
    inputs = ids.clone()
    inputs[masked] = vocab  # the [MASK] token
    labels = torch.full_like(ids, -100)
    labels[masked] = ids[masked]
    return {"input_ids": inputs, "labels": labels}


class Seq2Seq(pl.LightningModule):
    """An encoder-decoder fed the target with teacher forcing. ``shift`` feeds the decoder the
    target shifted right (correct); without it the decoder sees the token it must predict."""

    def __init__(self, vocab: int, shift: bool = True, dim: int = 32) -> None:
        super().__init__()
        self.shift, self.bos = shift, vocab
        self.emb = nn.Embedding(vocab + 1, dim)
        self.pos = nn.Embedding(128, dim)
        self.tf = nn.Transformer(dim, 4, 1, 1, 64, dropout=0.0, batch_first=True)
        self.out = nn.Linear(dim, vocab)

    def embed(self, x):
        return self.emb(x) + self.pos(torch.arange(x.shape[1]))

    def forward(self, src, tgt_in):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1])
        return self.out(self.tf(self.embed(src), self.embed(tgt_in), tgt_mask=mask, tgt_is_causal=True))

    def training_step(self, batch, batch_idx):
        src, tgt = batch
        if self.shift:
            tgt_in = torch.cat([torch.full_like(tgt[:, :1], self.bos), tgt[:, :-1]], dim=1)
        else:
            tgt_in = tgt
        logits = self(src, tgt_in)
        return F.cross_entropy(logits.transpose(1, 2), tgt)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def reverse_batch(ids: torch.Tensor):
    """A seq2seq task on real text: the target is the source reversed."""
    return ids, ids.flip(1)


# --------------------------------------------------------------------------- tabular
class TabularMLP(pl.LightningModule):
    def __init__(self, dim: int, classes: int = 3, norm: bool = True, regression: bool = False) -> None:
        super().__init__()
        self.regression = regression
        layers = [nn.Linear(dim, 64)]
        if norm:
            layers += [nn.BatchNorm1d(64)]
        layers += [nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1 if regression else classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        return F.mse_loss(out.squeeze(-1), y) if self.regression else F.cross_entropy(out, y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class ReadsLabels(pl.LightningModule):
    """A 'loss helper' mistake: the labels are passed into the model and concatenated to the features."""

    def __init__(self, dim: int, classes: int = 3) -> None:
        super().__init__()
        self.classes = classes
        self.net = nn.Sequential(nn.Linear(dim + classes, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x, y):
        return self.net(torch.cat([x, F.one_hot(y, self.classes).float()], dim=1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x, y), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def tabular(n: int = 64, dim: int = 8, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, dim, generator=g) + F.one_hot(y, dim).float() * 2.0
    return x, y


def loaders_with_val(train_ds, val_ds, batch_size: int = 16):
    return DataLoader(train_ds, batch_size=batch_size, shuffle=True), DataLoader(val_ds, batch_size=batch_size)


__all__ = [
    "AttentionLM",
    "BlockDataset",
    "ConvLM",
    "EncoderClassifier",
    "HFStyleLM",
    "MaskedLM",
    "NanoGPTModule",
    "ReadsLabels",
    "RecurrentLM",
    "Seq2Seq",
    "SingleTensorLM",
    "TabularMLP",
    "TensorDataset",
    "char_tokens",
    "lm_batch",
    "loaders_with_val",
    "mlm_batch",
    "reverse_batch",
    "tabular",
]


class ArcFaceClassifier(pl.LightningModule):
    """Metric learning done right: an additive angular margin head reads the labels in training to
    push the true class's logit down (a harder target), which is no leak."""

    def __init__(self, dim: int, classes: int = 3, margin: float = 0.3, scale: float = 8.0) -> None:
        super().__init__()
        self.margin, self.scale = margin, scale
        self.body = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 16))
        self.weight = nn.Parameter(torch.randn(classes, 16) * 0.1)

    def forward(self, x, y=None):
        cos = F.normalize(self.body(x)) @ F.normalize(self.weight).t()
        if y is not None:
            theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
            cos = torch.where(F.one_hot(y, cos.shape[1]).bool(), torch.cos(theta + self.margin), cos)
        return self.scale * cos

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x, y), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class WordLanguageModel(pl.LightningModule):
    """PyTorch's word_language_model, wrapped: time-major (T, B) batches, targets flattened to
    (T * B,), nn.TransformerEncoder with batch_first=False and a square subsequent mask (or an
    LSTM), logits flattened to (T * B, vocab)."""

    def __init__(self, vocab: int, kind: str = "transformer", has_mask: bool = True, dim: int = 32) -> None:
        super().__init__()
        self.kind, self.has_mask = kind, has_mask
        self.encoder = nn.Embedding(vocab, dim)
        if kind == "transformer":
            layer = nn.TransformerEncoderLayer(dim, 2, 64, dropout=0.2)
            self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        else:
            self.body = nn.LSTM(dim, dim, 2, dropout=0.2, bidirectional=not has_mask)
        self.decoder = nn.Linear(dim * (2 if kind == "lstm" and not has_mask else 1), vocab)

    def forward(self, src):
        emb = self.encoder(src) * math.sqrt(self.encoder.embedding_dim)
        if self.kind == "transformer":
            mask = nn.Transformer.generate_square_subsequent_mask(len(src)) if self.has_mask else None
            out = self.body(emb, mask)
        else:
            out = self.body(emb)[0]
        return F.log_softmax(self.decoder(out), dim=-1).view(-1, self.decoder.out_features)

    def training_step(self, batch, batch_idx):
        data, targets = batch
        return F.nll_loss(self(data), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def time_major_batch(ids: torch.Tensor, bptt: int = 20, batch: int = 8):
    """batchify + get_batch from the example: columns are independent streams."""
    n = ids.size(0) // batch
    data = ids[: n * batch].view(batch, -1).t().contiguous()  # (time, batch)
    return data[:bptt], data[1 : 1 + bptt].reshape(-1)
