"""The Lightning system around :class:`recsys.model.SASRec`: loss, optimiser, validation metrics, logging."""

from __future__ import annotations

from typing import Literal

import pytorch_lightning as L
import torch

from recsys.config import Config
from recsys.losses import full_ce, sampled_bce
from recsys.metrics import PAD, exclusion_mask, metrics_from_ranks, target_ranks
from recsys.model import SASRec

VAL_K = 10
MONITOR = f"val/ndcg_at_{VAL_K}"


class SASRecSystem(L.LightningModule):
    """Trains SASRec on next-item prediction; validates by full-catalogue ranking of the val items.

    Batches follow :class:`recsys.data.SequenceDataModule`. Logs ``train/loss`` and, per epoch as the mean
    over users, ``val/ndcg_at_10`` and ``val/hr_at_10`` (history excluded, pessimistic ties).
    """

    def __init__(
        self,
        n_items: int,
        max_len: int,
        hidden: int = 64,
        n_blocks: int = 2,
        n_heads: int = 1,
        dropout: float = 0.2,
        loss: Literal["ce", "bce"] = "ce",
        n_negatives: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if loss not in ("ce", "bce"):
            raise ValueError(f"loss must be 'ce' or 'bce', got {loss!r}")
        self.save_hyperparameters()
        self.model = SASRec(n_items, max_len, hidden, n_blocks, n_heads, dropout)

    @classmethod
    def from_config(cls, cfg: Config, n_items: int) -> SASRecSystem:
        m, t = cfg.model, cfg.train
        return cls(
            n_items=n_items, max_len=m.max_len, hidden=m.hidden, n_blocks=m.n_blocks, n_heads=m.n_heads,
            dropout=m.dropout, loss=t.loss, n_negatives=t.n_negatives, lr=t.lr, weight_decay=t.weight_decay,
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        if stage == "train":
            hidden = self.model(batch["inputs"])  # (B, T, D)
            loss = self._next_item_loss(hidden, batch["targets"])
            self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(hidden))
            return loss
        user = self.model.user_vectors(batch["inputs"])  # (B, D)
        metrics = self._ranking_metrics(user, batch["history"], batch["targets"])
        for name in (f"ndcg_at_{VAL_K}", f"hr_at_{VAL_K}"):
            # Weighted by batch size, so the epoch value is the mean over users.
            self.log(f"{stage}/{name}", metrics[name].mean(), on_epoch=True, prog_bar=True,
                     batch_size=len(user), sync_dist=True)
        return metrics[f"ndcg_at_{VAL_K}"].mean()

    def _next_item_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        real = targets != PAD  # (B, T)
        h, t = hidden[real], targets[real]  # (N, D), (N,)
        item_emb = self.model.item_embeddings()  # (I + 1, D)
        if self.hparams["loss"] == "ce":
            return full_ce(h, t, item_emb)
        return sampled_bce(h, t, item_emb, self.hparams["n_negatives"])

    def _ranking_metrics(
        self, user: torch.Tensor, history: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        # Rank in float32 even under bf16 autocast: bf16 scores tie often and ties count against the target.
        with torch.autocast(self.device.type, enabled=False):
            scores = self.model.score(user.float())  # (B, I + 1)
        exclude = exclusion_mask(history, self.hparams["n_items"], keep=targets)  # (B, I + 1)
        ranks = target_ranks(scores, targets, exclude)  # (B, M)
        return metrics_from_ranks(ranks, (VAL_K,))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Decay matrices and embeddings only; biases and LayerNorm gains are left alone.
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.hparams["weight_decay"]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.hparams["lr"], fused=self.device.type == "cuda")
