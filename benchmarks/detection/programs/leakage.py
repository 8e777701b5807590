"""Leakage: models that read their answers, language models that see the future, validation
data that is training data; and their correct counterparts (causal LMs with correct masks,
bidirectional encoders used for classification, masked LMs, seq2seq with teacher forcing).

The text is real: the docstrings of a fixed list of Python standard-library modules and their
public functions and classes, tokenised by character.
"""

from __future__ import annotations

import functools
import importlib

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset

from . import common as C
from . import program

_MODULES = (
    "argparse", "collections", "json", "logging", "pathlib", "functools", "itertools", "textwrap",
    "string", "random", "statistics", "fractions", "decimal", "datetime", "calendar", "heapq", "bisect",
    "csv", "configparser", "shutil", "tempfile", "glob", "fnmatch", "difflib", "pprint", "enum",
    "dataclasses", "contextlib", "abc", "copy", "typing", "re", "struct", "codecs", "base64", "hashlib",
)
BLOCK = 32


@functools.lru_cache(maxsize=1)
def text_ids() -> tuple[torch.Tensor, int]:
    """The corpus as character ids (a few hundred thousand characters), and the vocabulary size."""
    parts = []
    for name in _MODULES:
        module = importlib.import_module(name)
        parts.append(module.__doc__ or "")
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and callable(obj) and getattr(obj, "__module__", None) == name:
                parts.append(obj.__doc__ or "")
    text = " ".join(" ".join(parts).split())
    vocab = sorted({c for c in text if c.isascii()})
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text if c in index], dtype=torch.long)
    return ids, len(vocab)


class Blocks(Dataset):
    """Next-token blocks (x, y = x shifted by one) of a token stream, nanoGPT style."""

    def __init__(self, ids: torch.Tensor, block: int = BLOCK) -> None:
        self.ids, self.block = ids, block

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block

    def __getitem__(self, i: int):
        chunk = self.ids[i * self.block : (i + 1) * self.block + 1]
        return chunk[:-1], chunk[1:]


def text_split():
    """The first 90% of the stream for training, the last 10% held out."""
    ids, vocab = text_ids()
    cut = len(ids) * 9 // 10
    return Blocks(ids[:cut]), Blocks(ids[cut:]), vocab


# ----------------------------------------------------------------------------- models
class TextModule(pl.LightningModule):
    """The training and validation steps the text models share: ``_loss`` logged as
    ``train_loss`` / ``val_loss``, AdamW at ``self.lr``."""

    lr = 1e-3

    def _loss(self, batch):
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class CharLM(pl.LightningModule):
    """A small transformer language model; ``mask`` is "causal", "none" or "off_by_one"."""

    def __init__(self, vocab: int, mask: str = "causal", kind: str = "attention", dim: int = 64, lr: float = 3e-3):
        super().__init__()
        self.mask, self.kind, self.lr = mask, kind, lr
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(BLOCK, dim)
        if kind == "attention":
            layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.1, batch_first=True, norm_first=True)
            self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        else:
            self.body = nn.LSTM(dim, dim, batch_first=True, bidirectional=mask == "none")
        self.head = nn.Linear(dim * (2 if kind == "lstm" and mask == "none" else 1), vocab)

    def forward(self, x):
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        if self.kind == "lstm":
            return self.head(self.body(h)[0])
        if self.mask == "causal":
            h = self.body(h, mask=nn.Transformer.generate_square_subsequent_mask(t, device=x.device), is_causal=True)
        elif self.mask == "off_by_one":
            h = self.body(h, mask=torch.triu(torch.full((t, t), float("-inf"), device=x.device), diagonal=2))
        else:
            h = self.body(h)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


class SourceBlocks(Dataset):
    """Blocks of text labelled with which quarter of the corpus they come from (a topic label)."""

    def __init__(self, blocks: Blocks, total: int) -> None:
        self.blocks, self.total = blocks, total

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int):
        x, _ = self.blocks[i]
        return x, torch.tensor(min(3, 4 * i // max(self.total, 1)))


class EncoderClassifier(C.Classifier):
    def __init__(self, vocab: int, dim: int = 64):
        net = nn.Module()
        super().__init__(net, lr=1e-3)
        self.tok = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.1, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.cls = nn.Linear(dim, 4)

    def forward(self, x):
        return self.cls(self.body(self.tok(x)).mean(dim=1))


class MaskedBlocks(Dataset):
    """BERT-style masking of text blocks: 15% of positions become [MASK], labels elsewhere -100."""

    def __init__(self, blocks: Blocks, mask_id: int, seed: int) -> None:
        self.blocks, self.mask_id, self.seed = blocks, mask_id, seed

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int):
        x, _ = self.blocks[i]
        chosen = torch.rand(x.shape, generator=C.gen(self.seed, 1000 + i)) < 0.15
        labels = torch.where(chosen, x, torch.full_like(x, -100))
        return {"input_ids": torch.where(chosen, torch.full_like(x, self.mask_id), x), "labels": labels}


class MaskedLM(TextModule):
    lr = 2e-3

    def __init__(self, vocab: int, dim: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab + 1, dim)
        self.pos = nn.Embedding(BLOCK, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.1, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.head(self.body(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))))

    def _loss(self, batch):
        return F.cross_entropy(self(batch["input_ids"]).transpose(1, 2), batch["labels"], ignore_index=-100)



class Reversed(Dataset):
    """A seq2seq task on text: the target is the source block reversed."""

    def __init__(self, blocks: Blocks) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int):
        x, _ = self.blocks[i]
        return x, x.flip(0)


class Seq2Seq(TextModule):
    """Encoder-decoder with teacher forcing; ``shift=False`` is the bug: the decoder is fed the
    target itself under the causal mask, so position t reads the token it must predict."""

    def __init__(self, vocab: int, shift: bool = True, dim: int = 64):
        super().__init__()
        self.shift, self.bos = shift, vocab
        self.tok = nn.Embedding(vocab + 1, dim)
        self.pos = nn.Embedding(BLOCK, dim)
        self.tf = nn.Transformer(dim, 4, 2, 2, 2 * dim, dropout=0.1, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def embed(self, ids):
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))

    def forward(self, src, tgt_in):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1], device=src.device)
        return self.head(self.tf(self.embed(src), self.embed(tgt_in), tgt_mask=mask, tgt_is_causal=True))

    def _loss(self, batch):
        src, tgt = batch
        tgt_in = torch.cat([torch.full_like(tgt[:, :1], self.bos), tgt[:, :-1]], 1) if self.shift else tgt
        return F.cross_entropy(self(src, tgt_in).transpose(1, 2), tgt)



class ReadsLabels(C.Classifier):
    """A loss helper that hands the labels to the model, which concatenates them to the features."""

    def forward(self, x, y=None):
        return self.net(torch.cat([x, F.one_hot(y, 4).float()], dim=1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x, y), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x, y), y))


# ----------------------------------------------------------------------------- bugs
def _lm(seed, mask, kind="attention"):
    train, val, vocab = text_split()
    return CharLM(vocab, mask=mask, kind=kind), C.loaders(train, val, batch_size=32, seed=seed), C.steps(150)


@program(
    "lm_without_causal_mask", kind="bug", expected={"causal_leakage"},
    summary="Character transformer LM on stdlib docstrings whose attention has no causal mask: each position reads the next character.",
)
def lm_without_causal_mask(seed):
    return _lm(seed, "none")


@program(
    "lm_causal_mask_off_by_one", kind="bug", expected={"causal_leakage"},
    summary="Character transformer LM with triu(diagonal=2) as its mask: position t also sees t+1, the token it predicts.",
)
def lm_causal_mask_off_by_one(seed):
    return _lm(seed, "off_by_one")


@program(
    "lm_bidirectional_lstm", kind="bug", expected={"causal_leakage"},
    summary="Character LM built on a bidirectional LSTM: the backward direction carries the future into every position.",
)
def lm_bidirectional_lstm(seed):
    return _lm(seed, "none", kind="lstm")


@program(
    "decoder_fed_unshifted_targets", kind="bug", expected={"target_leakage"},
    summary="Seq2seq (reverse a text block) whose decoder is fed the target instead of the target shifted right: it copies.",
)
def decoder_fed_unshifted_targets(seed):
    train, val, vocab = text_split()
    return Seq2Seq(vocab, shift=False), C.loaders(Reversed(train), Reversed(val), seed=seed), C.steps(150)


@program(
    "label_column_in_features", kind="bug", expected={"target_leakage"},
    summary="Tabular classifier whose feature table still holds the label as its last (standardised) column.",
)
def label_column_in_features(seed):
    (x, y), (xv, yv) = C.nonlinear_split(seed)
    leak = lambda f, t: torch.cat([f, ((t.float() - 1.0) / 0.8)[:, None]], dim=1)  # noqa: E731
    model = C.Classifier(C.mlp([9, 64, 64, 3]), lr=1e-3)
    return model, C.loaders((leak(x, y), y), (leak(xv, yv), yv), seed=seed), C.steps(200)


@program(
    "labels_passed_to_model", kind="bug", expected={"target_leakage"},
    summary="A loss helper calls model(x, y) and the model concatenates one_hot(y) to weak features: it learns to copy.",
)
def labels_passed_to_model(seed):
    (x, y), (xv, yv) = C.cluster_split(seed, separation=1.0)
    model = ReadsLabels(C.mlp([20, 64, 4]), lr=1e-3)
    return model, C.loaders((x, y), (xv, yv), seed=seed), C.steps(200)


@program(
    "validation_cut_from_training_set", kind="bug", expected={"split_overlap"},
    summary="Validation is a slice of the data after training was given all of it: every validation sample is a training sample.",
)
def validation_cut_from_training_set(seed):
    (x, y), _ = C.cluster_split(seed, n_train=2560)
    full = C.TensorDataset(x, y)
    model = C.Classifier(C.mlp([16, 64, 64, 4]), lr=1e-3)
    return model, C.loaders(full, Subset(full, range(2048, 2560)), seed=seed), C.steps(200)


@program(
    "text_validation_from_training_stream", kind="bug", expected={"split_overlap"},
    summary="Char LM whose validation blocks are the last 10% of the text, but training reads the whole text.",
)
def text_validation_from_training_stream(seed):
    ids, vocab = text_ids()
    full = Blocks(ids)
    val = Subset(full, range(len(full) * 9 // 10, len(full)))
    return CharLM(vocab), C.loaders(full, val, batch_size=32, seed=seed), C.steps(150)


# ----------------------------------------------------------------------------- healthy controls
@program("char_lm_causal", kind="healthy", summary="Character transformer LM on stdlib docstrings, correct causal mask, AdamW 3e-3, held-out text.")
def char_lm_causal(seed):
    return _lm(seed, "causal")


@program("char_lm_lstm", kind="healthy", summary="Character LSTM language model on stdlib docstrings (unidirectional), AdamW 3e-3.")
def char_lm_lstm(seed):
    return _lm(seed, "causal", kind="lstm")


@program("text_encoder_classifier", kind="healthy", summary="Bidirectional transformer encoder (no mask, by design) classifying which part of the corpus a text block is from.")
def text_encoder_classifier(seed):
    train, val, vocab = text_split()
    model = EncoderClassifier(vocab)
    return model, C.loaders(SourceBlocks(train, len(train)), SourceBlocks(val, len(val)), seed=seed), C.steps(150)


@program("masked_lm", kind="healthy", summary="BERT-style masked LM on text blocks (15% masked, labels -100 elsewhere), bidirectional encoder.")
def masked_lm(seed):
    train, val, vocab = text_split()
    model = MaskedLM(vocab)
    return model, C.loaders(MaskedBlocks(train, vocab, seed), MaskedBlocks(val, vocab, seed + 1), seed=seed), C.steps(150)


@program("seq2seq_teacher_forcing", kind="healthy", summary="Encoder-decoder reversing text blocks, decoder fed the target shifted right under a causal mask.")
def seq2seq_teacher_forcing(seed):
    train, val, vocab = text_split()
    return Seq2Seq(vocab, shift=True), C.loaders(Reversed(train), Reversed(val), seed=seed), C.steps(150)
