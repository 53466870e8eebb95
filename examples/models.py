"""Models and data of the example app: scikit-learn's bundled 8x8 digits, a CNN and a transformer.

Everything is small enough to train in seconds on a laptop CPU, and nothing is downloaded
(``sklearn.datasets.load_digits`` ships with scikit-learn). Module names to use in
``inspect.<monitor>.modules`` patterns:

* :class:`DigitsCNN`: ``features.0`` (Conv2d), ``features.1`` (ReLU), ``features.3``,
  ``features.4``, ... and ``classifier.1`` (Linear), ``classifier.3``; e.g. ``features.*``.
* :class:`DigitsTransformer`: ``embed`` (Linear, one token per image row),
  ``encoder.layers.0.self_attn``, ``encoder.layers.0.linear1``, ..., ``head``; e.g.
  ``encoder.*`` or ``*.self_attn``.

Example:
    >>> data = DigitsDataModule(batch_size=32)
    >>> data.setup("fit")
    >>> x, y = next(iter(data.train_dataloader()))
    >>> tuple(x.shape), DigitsCNN()(x).shape[-1]
    ((32, 1, 8, 8), 10)
"""

from __future__ import annotations

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset, random_split

from lightning_inspect import ProbeContext, enabled, probe

N_CLASSES = 10


class DigitsDataModule(L.LightningDataModule):
    """The 1,797 digits images (1 x 8 x 8, scaled to [0, 1]) with a seeded train/validation split.

    Args:
        batch_size: images per batch.
        val_fraction: share of the images held out for validation.
        split_seed: seed of the split (the same split on every run and machine).
        num_workers: DataLoader workers (0: load in the main process; the data set is tiny).

    Example:
        >>> DigitsDataModule(val_fraction=0.2).sizes()
        (1438, 359)
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"DigitsDataModule(val_fraction={val_fraction!r}): expected a number in (0, 1)."
            )
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.train_set: torch.utils.data.Dataset | None = None
        self.val_set: torch.utils.data.Dataset | None = None

    def sizes(self) -> tuple[int, int]:
        """(train, validation) image counts."""
        n = len(load_digits().target)
        n_val = round(n * self.val_fraction)
        return n - n_val, n_val

    def setup(self, stage: str) -> None:
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        dataset = TensorDataset(images, labels)
        n_train, n_val = self.sizes()
        generator = torch.Generator().manual_seed(self.split_seed)
        self.train_set, self.val_set = random_split(dataset, [n_train, n_val], generator=generator)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup('fit') first"
        generator = torch.Generator().manual_seed(self.split_seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup('fit') first"
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class DigitsClassifier(L.LightningModule):
    """Shared training logic: cross-entropy, accuracy, Adam. Subclasses build the network.

    Args:
        lr: Adam's learning rate.
    """

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == y).float().mean())
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DigitsCNN(DigitsClassifier):
    """Two conv blocks and a small MLP head.

    Args:
        channels: output channels of the two conv layers.
        hidden: width of the hidden layer of the head.
        dropout: dropout before the last layer.
        lr: Adam's learning rate.

    Example:
        >>> [n for n, _ in DigitsCNN().named_children()]
        ['features', 'classifier']
    """

    def __init__(
        self,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
        dropout: float = 0.1,
        lr: float = 1e-3,
    ) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=3, padding=1),  # features.0
            nn.ReLU(),  # features.1
            nn.MaxPool2d(2),  # features.2: 8x8 -> 4x4
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),  # features.3
            nn.ReLU(),  # features.4
            nn.MaxPool2d(2),  # features.5: 4x4 -> 2x2
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # classifier.0
            nn.Linear(c2 * 2 * 2, hidden),  # classifier.1
            nn.ReLU(),  # classifier.2
            nn.Dropout(dropout),  # classifier.3
            nn.Linear(hidden, N_CLASSES),  # classifier.4
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@probe("attention")
def show_attention(weights: torch.Tensor, *, ctx: ProbeContext) -> None:
    """Picture of the first encoder layer's attention for the first image of the batch.

    Rows (queries) by rows (keys) of the 8x8 digit, averaged over heads, brightest = most
    attended. Runs only with ``+inspect=probes 'inspect.probes.tags=[attention]'``.
    """
    grid = weights[0] / weights[0].max().clamp(min=1e-12)  # (8, 8) in [0, 1]
    ctx.log_image("layer0", grid.repeat_interleave(16, 0).repeat_interleave(16, 1).cpu().numpy())


def attention_weights(attn: nn.MultiheadAttention, tokens: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention weights of ``attn`` on ``tokens`` (batch, queries, keys).

    Computed from the module's own projections without dropout or randomness, so calling it
    changes nothing in training.
    """
    batch, length, width = tokens.shape
    heads = attn.num_heads
    q, k, _ = nn.functional.linear(tokens, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q = q.view(batch, length, heads, width // heads).transpose(1, 2)
    k = k.view(batch, length, heads, width // heads).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / (width // heads) ** 0.5
    return scores.softmax(dim=-1).mean(dim=1)


class DigitsTransformer(DigitsClassifier):
    """A transformer encoder over the 8 image rows as tokens (8 pixels each), mean-pooled.

    Args:
        d_model: token width.
        n_heads: attention heads.
        n_layers: encoder layers.
        dim_feedforward: width of each layer's feed-forward block.
        dropout: dropout inside the encoder.
        lr: Adam's learning rate.

    Example:
        >>> DigitsTransformer()(torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        d_model: int = 32,
        n_heads: int = 4,
        n_layers: int = 2,
        dim_feedforward: int = 64,
        dropout: float = 0.1,
        lr: float = 1e-3,
    ) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        self.embed = nn.Linear(8, d_model)
        self.position = nn.Parameter(torch.zeros(1, 8, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward, dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, N_CLASSES)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.flatten(1, 2)) + self.position  # (batch, 8 rows, d_model)
        if enabled("attention"):  # the probe's preparation runs only when someone will look
            with torch.no_grad():
                show_attention(attention_weights(self.encoder.layers[0].self_attn, tokens))
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))
