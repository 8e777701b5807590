"""Healthy programs: ordinary, correct training runs that learn. Any warning on them is a false alarm.

They are not made easy: labels are noisy, losses level off above zero, small batches are
noisy, schedules warm up and decay, some layers are frozen on purpose.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import common as C
from . import program


@program("mlp_adam", kind="healthy", summary="4-class clusters (5% label noise), 2-layer ReLU MLP, Adam 1e-3.")
def mlp_adam(seed):
    train, val = C.cluster_split(seed)
    model = C.Classifier(C.mlp([16, 64, 64, 4]), lr=1e-3)
    return model, C.loaders(train, val, seed=seed), C.steps(300)


@program("cnn_batchnorm_dropout", kind="healthy", summary="12x12 images, 2-block CNN with BatchNorm and dropout 0.3, SGD momentum 0.9.")
def cnn_batchnorm_dropout(seed):
    (x, y), (xv, yv) = C.image_split(seed)
    model = C.Classifier(C.SmallCNN(batch_norm=True, dropout=0.3), lr=0.02, optimizer="sgd", weight_decay=5e-4)
    return model, C.loaders((C.normalise_images(x), y), (C.normalise_images(xv), yv), seed=seed), C.steps(250)


class SequenceClassifier(C.Classifier):
    """A recurrent encoder over (B, T, C) floats or (B, T) token ids; the last hidden state feeds the head."""

    def __init__(self, rnn: nn.Module, hidden: int, classes: int, embed: nn.Module | None = None, **kw):
        super().__init__(nn.Identity(), **kw)
        self.embed = embed
        self.rnn = rnn
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@program("gru_waves", kind="healthy", summary="Noisy sinusoid sequences, GRU(32) + linear head, Adam 3e-3, gradient clipping 1.0.")
def gru_waves(seed):
    train, val = C.wave_split(seed)
    model = SequenceClassifier(nn.GRU(2, 32, batch_first=True), 32, 3, lr=3e-3)
    return model, C.loaders(train, val, seed=seed), C.steps(250, gradient_clip_val=1.0)


class DictBatchClassifier(SequenceClassifier):
    def unpack(self, batch):
        return batch["tokens"], batch["label"]


@program("lstm_tokens_dict_batches", kind="healthy", summary="Token sequences as dict batches, Embedding + LSTM(32), Adam 3e-3.")
def lstm_tokens_dict_batches(seed):
    (x, y), (xv, yv) = C.token_split(seed)
    model = DictBatchClassifier(nn.LSTM(16, 32, batch_first=True), 32, 4, embed=nn.Embedding(32, 16), lr=3e-3)
    return model, C.loaders(C.DictDataset(tokens=x, label=y), C.DictDataset(tokens=xv, label=yv), seed=seed), C.steps(250)


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 32, heads: int = 4, layers: int = 2, classes: int = 4, length: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=64, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(self.norm(h.mean(1)))


@program("transformer_warmup", kind="healthy", summary="Token sequences, 2-layer pre-norm transformer, AdamW 2e-3 with 30-step warm-up then cosine decay.")
def transformer_warmup(seed):
    train, val = C.token_split(seed)
    model = C.Classifier(TinyTransformer(), lr=2e-3, optimizer="adamw", weight_decay=0.01, schedule=C.warmup_cosine(30, 300))
    return model, C.loaders(train, val, seed=seed), C.steps(300)


class DictStepRegressor(C.Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = self.loss(pred, y)
        self.log("train_loss", loss)
        return {"loss": loss, "pred": pred.detach()}


@program("regression_mlp", kind="healthy", summary="Nonlinear regression with noise, SiLU MLP, MSE, Adam 2e-3; training_step returns a dict.")
def regression_mlp(seed):
    train, val = C.regression_split(seed)
    model = DictStepRegressor(C.mlp([8, 64, 64, 1], act=nn.SiLU), lr=2e-3)
    return model, C.loaders(train, val, seed=seed), C.steps(300)


@program("bf16_mixed", kind="healthy", summary="Nonlinear 3-class rule, MLP under precision='bf16-mixed', Adam 2e-3.")
def bf16_mixed(seed):
    train, val = C.nonlinear_split(seed)
    model = C.Classifier(C.mlp([8, 64, 64, 3]), lr=2e-3)
    return model, C.loaders(train, val, seed=seed), C.steps(250, precision="bf16-mixed")


@program("grad_accumulation", kind="healthy", summary="Clusters, batch 16 with accumulate_grad_batches=4, SGD momentum 0.9.")
def grad_accumulation(seed):
    train, val = C.cluster_split(seed)
    model = C.Classifier(C.mlp([16, 64, 4]), lr=0.05, optimizer="sgd")
    return model, C.loaders(train, val, batch_size=16, seed=seed), C.steps(120, accumulate_grad_batches=4)


class FrozenBackbone(C.Classifier):
    """A fixed feature extractor (requires_grad=False on purpose) and a trained head."""

    def __init__(self, **kw):
        backbone = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        for p in backbone.parameters():
            p.requires_grad_(False)
        super().__init__(nn.Sequential(backbone, nn.Linear(128, 3)), **kw)

    def optimized_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


@program("frozen_backbone", kind="healthy", summary="Nonlinear rule, frozen random-feature backbone (requires_grad=False), trained linear head.")
def frozen_backbone(seed):
    train, val = C.nonlinear_split(seed)
    return FrozenBackbone(lr=3e-3), C.loaders(train, val, seed=seed), C.steps(250)


class ManualClassifier(C.Classifier):
    """Manual optimisation: zero_grad, manual_backward, clipping, step, scheduler step."""

    def __init__(self, net, **kw):
        super().__init__(net, **kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        sched = self.lr_schedulers()
        x, y = self.unpack(batch)
        loss = self.loss(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        opt.step()
        if sched is not None:
            sched.step()
        self.log("train_loss", loss)
        return loss.detach()


@program("manual_optimisation", kind="healthy", summary="Clusters, manual optimisation (zero_grad/manual_backward/clip/step), Adam with cosine schedule.")
def manual_optimisation(seed):
    train, val = C.cluster_split(seed)
    model = ManualClassifier(C.mlp([16, 64, 64, 4]), lr=2e-3, schedule=C.warmup_cosine(10, 300, floor=0.1))
    return model, C.loaders(train, val, seed=seed), C.steps(300)


@program("label_smoothing", kind="healthy", summary="Images, CNN without BatchNorm, cross-entropy with label_smoothing=0.1 (loss floor well above 0), Adam.")
def label_smoothing(seed):
    (x, y), (xv, yv) = C.image_split(seed)
    model = C.Classifier(C.SmallCNN(batch_norm=False), lr=2e-3, label_smoothing=0.1)
    return model, C.loaders((C.normalise_images(x), y), (C.normalise_images(xv), yv), seed=seed), C.steps(250)


@program("large_batch_sgd", kind="healthy", summary="Clusters, batch 512, SGD momentum 0.9 lr 0.2 with 15-step linear warm-up and cosine decay.")
def large_batch_sgd(seed):
    train, val = C.cluster_split(seed, n_train=8192)
    model = C.Classifier(C.mlp([16, 128, 128, 4]), lr=0.2, optimizer="sgd", schedule=C.warmup_cosine(15, 120))
    return model, C.loaders(train, val, batch_size=512, seed=seed), C.steps(120)


@program("noisy_small_batches", kind="healthy", summary="Nonlinear rule with noisy labels, batch 4, SGD momentum 0.9 lr 0.01: a very noisy loss curve.")
def noisy_small_batches(seed):
    train, val = C.nonlinear_split(seed)
    model = C.Classifier(C.mlp([8, 64, 3]), lr=0.01, optimizer="sgd")
    return model, C.loaders(train, val, batch_size=4, seed=seed), C.steps(400, val_check_interval=100)


@program("cosine_decay_to_zero", kind="healthy", summary="Clusters, AdamW 3e-3 with cosine decay to zero (updates vanish at the end by design).")
def cosine_decay_to_zero(seed):
    train, val = C.cluster_split(seed)
    model = C.Classifier(C.mlp([16, 64, 64, 4], dropout=0.1), lr=3e-3, optimizer="adamw", schedule=C.warmup_cosine(1, 300))
    return model, C.loaders(train, val, seed=seed), C.steps(300)


@program("binary_bce", kind="healthy", summary="Binary clusters, one logit, BCEWithLogits, SGD momentum with weight decay 1e-4.")
def binary_bce(seed):
    train, val = C.cluster_split(seed, classes=2)
    model = C.BinaryClassifier(C.mlp([16, 32, 32, 1]), lr=0.05, optimizer="sgd", weight_decay=1e-4)
    return model, C.loaders(train, val, seed=seed), C.steps(250)


class TokenMLP(nn.Module):
    """Mean of token embeddings, then an MLP with LayerNorm: a bag-of-words baseline."""

    def __init__(self, vocab: int = 32, d: int = 32, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mlp = C.mlp([d, 64, classes], norm=True)

    def forward(self, tokens):
        return self.mlp(self.embed(tokens).mean(1))


@program("embedding_bag_layernorm", kind="healthy", summary="Token sequences, mean-pooled embeddings + LayerNorm MLP, Adam 1e-2 (a high LR that is still fine).")
def embedding_bag_layernorm(seed):
    train, val = C.token_split(seed)
    model = C.Classifier(TokenMLP(), lr=1e-2)
    return model, C.loaders(train, val, seed=seed), C.steps(250)


class WeightedLoss(C.Classifier):
    def __init__(self, net, class_weights: torch.Tensor, **kw):
        super().__init__(net, **kw)
        self.register_buffer("class_weights", class_weights)

    def loss(self, out, y):
        return F.cross_entropy(out, y, weight=self.class_weights)


@program("imbalanced_weighted_loss", kind="healthy", summary="3 classes at 80/15/5%, handled with inverse-frequency class weights in the cross-entropy, Adam 1e-3.")
def imbalanced_weighted_loss(seed):
    g = C.gen(seed, 8)
    centers = torch.randn(3, 16, generator=g) * 3.0 / (2 * 16) ** 0.5

    def draw(n):
        y = torch.multinomial(torch.tensor([0.80, 0.15, 0.05]), n, replacement=True, generator=g)
        return centers[y] + torch.randn(n, 16, generator=g), y

    (x, y), val = draw(2048), draw(512)
    weights = len(y) / (3 * torch.bincount(y, minlength=3).float())
    model = WeightedLoss(C.mlp([16, 64, 64, 3]), weights, lr=1e-3)
    return model, C.loaders((x, y), val, seed=seed), C.steps(300)
