"""The Lightning system around :class:`recsys.model.SASRec`: loss, optimiser, validation metrics, logging."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import pytorch_lightning as L
import torch

from recsys.config import Config
from recsys.data import ItemAttributes, drop_items, mask_items
from recsys.losses import full_ce, gbce_beta, sampled_bce, sampled_gbce, sampled_softmax
from recsys.metrics import PAD, exclusion_mask, metrics_from_ranks, target_ranks
from recsys.model import SASRec, SASRecEnsemble

LOSSES = ("ce", "bce", "sampled_softmax", "gbce")

VAL_K = 10
MONITOR = f"val/ndcg_at_{VAL_K}"


# Learning rate of the repeat bias (model.repeat_bias) in multiples of train.lr.
REPEAT_LR_MULT = 100.0


class SASRecSystem(L.LightningModule):
    """Trains SASRec on next-item prediction; validates by full-catalogue ranking of the val items.

    Batches follow :class:`recsys.data.SequenceDataModule`. Causal attention trains on the next item at every
    position; bidirectional attention masks items of the same batch (:func:`recsys.data.mask_items`) and
    trains on the masked positions only. Either way the loss is ``loss`` (see :mod:`recsys.losses`).
    ``ensemble`` K > 1 trains a :class:`recsys.model.SASRecEnsemble`: each member's loss is computed from its
    own hidden states and item table, exactly as if it were trained alone on the same batches, and the loss is
    their mean; validation ranks by the ensemble's score (the mean of the members' scores).
    Popularity sampling (``negative_sampling="popularity"``) needs the train item counts: taken from the
    datamodule's ``item_counts`` at ``setup``, or given with :meth:`set_item_counts`.
    ``compile`` runs each training batch's forward and loss through ``torch.compile`` in ``compile_mode``
    (validation stays eager).
    Logs ``train/loss`` (per epoch: the mean of the batch losses weighted by batch rows) and, per epoch as
    the mean over users, ``val/ndcg_at_10`` and ``val/hr_at_10``
    (history excluded unless ``exclude_seen`` is False, pessimistic ties).
    """

    def __init__(
        self,
        n_items: int,
        max_len: int,
        hidden: int = 64,
        n_blocks: int = 2,
        n_heads: int = 1,
        dropout: float = 0.2,
        loss: Literal["ce", "bce", "sampled_softmax", "gbce"] = "ce",
        n_negatives: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        attention: Literal["causal", "bidirectional"] = "causal",
        mask_prob: float = 0.2,
        item_drop: float = 0.0,
        train_exclude_seen: bool = False,
        negative_sampling: Literal["uniform", "popularity"] = "uniform",
        gbce_t: float = 0.75,
        label_smoothing: float = 0.0,
        warmup_epochs: float = 0.0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        compile: bool = False,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default",
        ffn_mult: int = 1,
        block: Literal["sasrec", "ligr"] = "sasrec",
        exclude_seen: bool = True,
        repeat_bias: bool = False,
        n_feature_values: int = 0,
        feature_slots: int = 0,
        n_event_types: int = 0,
        ensemble: int = 1,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if negative_sampling not in ("uniform", "popularity"):
            raise ValueError(f"negative_sampling must be 'uniform' or 'popularity', got {negative_sampling!r}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        if not 0.0 <= item_drop < 1.0:
            raise ValueError(f"item_drop must be in [0, 1), got {item_drop}")
        if item_drop and attention != "causal":
            raise ValueError("train.item_drop applies to causal attention only (bidirectional training already "
                             "hides items: train.mask_prob); set it to 0")
        if train_exclude_seen and (loss != "ce" or attention != "causal"):
            raise ValueError(f"train.exclude_seen needs train.loss=ce and model.attention=causal (they are {loss!r} "
                             f"and {attention!r}); set it to false")
        if loss == "gbce":
            gbce_beta(n_negatives, n_items, gbce_t)  # raises on a bad combination before training starts
        self.save_hyperparameters()
        if repeat_bias and loss != "ce":
            raise ValueError(f"repeat_bias needs loss 'ce', got {loss!r}")
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        kwargs = dict(n_items=n_items, max_len=max_len, hidden=hidden, n_blocks=n_blocks, n_heads=n_heads,
                      dropout=dropout, attention=attention, ffn_mult=ffn_mult, block=block, repeat_bias=repeat_bias,
                      n_feature_values=n_feature_values, feature_slots=feature_slots, n_event_types=n_event_types)
        self.model = SASRec(**kwargs) if ensemble == 1 else SASRecEnsemble(ensemble, **kwargs)
        # Per-draw negative sampling probabilities (n_items + 1,), entry 0 = padding = 0; not checkpointed.
        self.register_buffer("sampling_probs", torch.zeros(n_items + 1), persistent=False)
        # Loss weight per target event type (train.type_weights; index = type_idx, 0 = no type), not checkpointed
        self.type_weights: torch.Tensor | None
        self.register_buffer("type_weights", None, persistent=False)
        self._compiled_loss: Callable[..., torch.Tensor] | None = None
        self._loss_sum: torch.Tensor | None = None  # this epoch's sum of batch loss x batch rows, on the device
        self._loss_rows = 0

    @classmethod
    def from_config(cls, cfg: Config, n_items: int, attributes: ItemAttributes | None = None,
                    n_event_types: int = 0) -> SASRecSystem:
        """The system of ``cfg`` for a catalogue of ``n_items``, with the item ``attributes`` set in its model
        (None: ids only) and an embedding of ``n_event_types`` event types (0: none)."""
        m, t = cfg.model, cfg.train
        system = cls(
            n_items=n_items, max_len=m.max_len, hidden=m.hidden, n_blocks=m.n_blocks, n_heads=m.n_heads,
            dropout=m.dropout, loss=t.loss, n_negatives=t.n_negatives, lr=t.lr, weight_decay=t.weight_decay,
            attention=m.attention, mask_prob=t.mask_prob, item_drop=t.item_drop,
            train_exclude_seen=t.exclude_seen, negative_sampling=t.negative_sampling,
            gbce_t=t.gbce_t, label_smoothing=t.label_smoothing, warmup_epochs=t.warmup_epochs,
            lr_schedule=t.lr_schedule, compile=t.compile,
            compile_mode=t.compile_mode, ffn_mult=m.ffn_mult, block=m.block,
            exclude_seen=cfg.evaluate.exclude_seen, repeat_bias=m.repeat_bias,
            n_feature_values=0 if attributes is None else attributes.n_values,
            feature_slots=0 if attributes is None else attributes.slots, n_event_types=n_event_types,
            ensemble=m.ensemble,
        )
        if attributes is not None:
            system.model.set_item_features(attributes.ids, attributes.columns, attributes.trained)
        return system

    def set_type_weights(self, weights: torch.Tensor) -> None:
        """Weigh each CE training position by ``weights[type of its target]`` (``weights`` (n_types + 1,) >= 0,
        entry 0 for targets without a type). Raises ValueError for another loss or a negative weight."""
        if self.hparams["loss"] != "ce":
            raise ValueError(f"train.type_weights needs train.loss=ce, got {self.hparams['loss']!r}")
        if weights.dim() != 1 or bool((weights < 0).any()):
            raise ValueError("type weights must be a 1-d tensor of non-negative weights")
        self.type_weights = weights.float().to(self.sampling_probs.device)

    def set_item_counts(self, counts: torch.Tensor) -> None:
        """Popularity sampling ∝ max(train count, 1) over items 1..n_items (every item stays drawable).

        counts: (n_items + 1,) train events per item (entry 0, padding, is ignored).
        """
        n_items = self.hparams["n_items"]
        if counts.shape != (n_items + 1,):
            raise ValueError(f"item counts have shape {tuple(counts.shape)}, expected ({n_items + 1},)")
        weights = counts.double().clamp(min=1.0)
        weights[PAD] = 0.0
        self.sampling_probs.copy_(weights / weights.sum())

    def setup(self, stage: str) -> None:
        if self.hparams["negative_sampling"] != "popularity" or stage != "fit":
            return
        counts = getattr(self.trainer.datamodule, "item_counts", None)
        if counts is None and not bool(self.sampling_probs.sum() > 0):
            raise ValueError("train.negative_sampling=popularity needs item counts: fit with a SequenceDataModule "
                             "or call set_item_counts first")
        if counts is not None:
            self.set_item_counts(counts)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._loss_rows = None, 0

    def on_train_epoch_end(self) -> None:
        # train/loss: the epoch's mean over batches weighted by their rows (what self.log(on_epoch=True) gives),
        # logged once per epoch instead of per step: Lightning's per-step logging costs more than a tiny step.
        # Under DDP one sum of (loss sum, rows) over the processes first, as validation does: rank 0's own mean
        # (what MLflow got before) described its share of the batches only.
        if self.trainer.world_size > 1:
            sums = torch.stack([self._loss_sum if self._loss_sum is not None else torch.zeros((), device=self.device),
                                torch.tensor(float(self._loss_rows), device=self.device)]).double()
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            if sums[1] > 0:
                self.log("train/loss", (sums[0] / sums[1]).float(), prog_bar=True)
        elif self._loss_sum is not None:
            self.log("train/loss", self._loss_sum / self._loss_rows, prog_bar=True)

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        if stage == "train":
            inputs, targets, types, target_types = self._training_inputs(batch)  # (B, W) each; types or None
            seen = batch["inputs"] if self.hparams.get("train_exclude_seen") else None  # before item_drop
            loss = self._train_loss(inputs, targets, types, target_types, seen)
            weighted = loss.detach() * len(inputs)  # () on the device: no host synchronisation
            self._loss_sum = weighted if self._loss_sum is None else self._loss_sum + weighted
            self._loss_rows += len(inputs)
            return loss
        # float32 end to end, under bf16 training too: the evaluate job scores the model in float32, and the epoch
        # must be chosen (early stopping, best checkpoint) by the number that job would report
        with torch.autocast(self.device.type, enabled=False):
            user = self.model.user_vectors(batch["inputs"], batch.get("input_types"))  # (B, D)
        metrics = self._ranking_metrics(user, batch["history"], batch["targets"], batch["inputs"],
                                        batch.get("input_types"))
        # Sums and the user count, on the device (no host synchronisation); the epoch's mean over all users is
        # formed in on_validation_epoch_end, after one sum over the processes.
        sums = torch.stack([metrics[f"ndcg_at_{VAL_K}"].sum(), metrics[f"hr_at_{VAL_K}"].sum()]).double()
        sums = torch.cat([sums, sums.new_tensor([len(user)])])
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums
        return metrics[f"ndcg_at_{VAL_K}"].mean()

    def on_validation_epoch_start(self) -> None:
        self._val_sums: torch.Tensor | None = None  # (ndcg sum, hr sum, users) of this process

    def on_validation_epoch_end(self) -> None:
        # One sum of (ndcg sum, hr sum, users) over the processes, then the ratio: the mean over ALL validation
        # users. Lightning's sync_dist mean of per-process means weighted by an integer batch size divided the
        # sums by world_size * floor(users / world_size) when the users do not split evenly (65 users on 2
        # processes: / 64, every value 1.6 % high).
        sums = self._val_sums if self._val_sums is not None else torch.zeros(3, dtype=torch.float64,
                                                                               device=self.device)
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum") if self.trainer.world_size > 1 else sums
        users = sums[2].clamp(min=1)
        for i, name in enumerate((f"ndcg_at_{VAL_K}", f"hr_at_{VAL_K}")):
            self.log(f"val/{name}", (sums[i] / users).float(), prog_bar=True)

    def _training_inputs(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(inputs, targets, the inputs' event types, the targets' event types; both None without types).
        Causal: the batch as it is (next-item targets), with ``item_drop`` some inputs dropped.
        Bidirectional: a masked-item batch."""
        types = batch.get("input_types")
        if self.model.mask_token is None:
            inputs = batch["inputs"]
            if self.hparams["item_drop"]:
                inputs, types = drop_items(inputs, self.hparams["item_drop"], types)
            return inputs, batch["targets"], types, batch.get("target_types")
        return mask_items(
            batch["inputs"], batch["targets"], self.model.max_len, self.model.mask_token, self.hparams["mask_prob"],
            types=None if types is None else (types, batch["target_types"]),
        )

    def _train_loss(self, inputs: torch.Tensor, targets: torch.Tensor, types: torch.Tensor | None = None,
                    target_types: torch.Tensor | None = None, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and loss of a training batch, through ``torch.compile`` with ``compile`` (compiled once)."""
        if not self.hparams["compile"]:
            return self._forward_loss(inputs, targets, types, target_types, seen)
        if self._compiled_loss is None:
            self._compiled_loss = torch.compile(self._forward_loss, mode=self.hparams["compile_mode"])
        return self._compiled_loss(inputs, targets, types, target_types, seen)

    def _forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor, types: torch.Tensor | None = None,
                      target_types: torch.Tensor | None = None, seen: torch.Tensor | None = None) -> torch.Tensor:
        """The mean over the model's members (the model itself if it is no ensemble) of each member's loss."""
        members = list(self.model.members) if isinstance(self.model, SASRecEnsemble) else [self.model]
        losses = [self._next_item_loss(m(inputs, types), targets, inputs, types, target_types, seen, m)
                  for m in members]  # m(...): (B, T, D)
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def _next_item_loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor | None = None,
        types: torch.Tensor | None = None, target_types: torch.Tensor | None = None,
        seen: torch.Tensor | None = None, member: SASRec | None = None,
    ) -> torch.Tensor:
        """Loss of ``member`` (default: the model, which must then be a SASRec; ``hidden`` its hidden states) at
        the positions with a target (targets != 0): next items, or masked items if bidirectional.

        Full CE under torch.compile runs on all B*T positions, padding weighted 0 (static shapes, no host
        synchronisation); in eager mode the positions with a target are gathered first: on sparse data most
        positions are padding (Beauty, BERT4Rec file: 11 % of a 50-wide batch's positions have a target), and
        scoring them against the whole catalogue costs far more than the one synchronisation of the gather (on
        the shared H100 a Beauty-BERT4Rec epoch took 25 s with 6 processes, as long as with 14 before). The
        sampled losses always gather. With type weights (:meth:`set_type_weights`, CE only) each position weighs
        the weight of its target's event type (``target_types``). With ``seen`` (B, T), the causal batch's inputs
        (``train.exclude_seen``), position t's softmax leaves out the items ``seen[:, :t + 1]`` but its target.
        """
        model = self.model if member is None else member
        item_emb = model.item_embeddings()  # (I + 1, D), no [MASK] row
        hp = self.hparams
        if hp["loss"] == "ce":
            h, t = hidden.flatten(0, 1), targets.flatten()  # (B*T, D), (B*T,)
            weights = None
            if self.type_weights is not None:
                if target_types is None:
                    raise ValueError("train.type_weights needs the targets' event types in the batch")
                weights = self.type_weights[target_types.flatten()]  # (B*T,)
            bias = None
            if model.repeat_bias and inputs is not None:  # position t's window items and their bonus
                b, width = inputs.shape
                values = model.history_bias(inputs, all_positions=True, types=types).flatten(0, 1)  # (B*T, T)
                bias = (inputs.unsqueeze(1).expand(b, width, width).flatten(0, 1), values)  # (B*T, T) each
            positions = torch.arange(len(t), device=t.device)  # flat indices into B*T
            if not torch.compiler.is_compiling():
                keep = t != PAD
                h, t, positions = h[keep], t[keep], positions[keep]  # (N, D), (N,), (N,)
                bias = None if bias is None else (bias[0][keep], bias[1][keep])
                weights = None if weights is None else weights[keep]
            exclude = None if seen is None else seen_prefixes(seen, positions)  # (N, T)
            return full_ce(h, t, item_emb, hp["label_smoothing"], bias, weights, exclude)
        real = targets != PAD  # (B, T)
        h, t = hidden[real], targets[real]  # (N, D), (N,)
        if hp["loss"] == "sampled_softmax":
            probs = self.sampling_probs if hp["negative_sampling"] == "popularity" else None
            return sampled_softmax(h, t, item_emb, hp["n_negatives"], probs)
        if hp["loss"] == "gbce":
            return sampled_gbce(h, t, item_emb, hp["n_negatives"], hp["gbce_t"])
        return sampled_bce(h, t, item_emb, hp["n_negatives"])

    def _ranking_metrics(
        self, user: torch.Tensor, history: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor | None = None,
        types: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        # Rank in float32 even under bf16 autocast: bf16 scores tie often and ties count against the target.
        compete = not self.hparams.get("exclude_seen", True)  # evaluate.exclude_seen=false: seen items compete
        with torch.autocast(self.device.type, enabled=False):
            scores = self.model.score(user.float())  # (B, I + 1)
            if inputs is not None and compete:  # with repeat_bias: the window items' bonus (not with seen items
                scores = self.model.add_history_bias(scores, inputs, types)  # excluded: see model_scorer)
        if compete:
            history = history[:, :0]
        exclude = exclusion_mask(history, self.hparams["n_items"], keep=targets)  # (B, I + 1)
        ranks = target_ranks(scores, targets, exclude)  # (B, M)
        return metrics_from_ranks(ranks, (VAL_K,))

    def configure_optimizers(self) -> dict:
        # Decay matrices and embeddings only; biases and LayerNorm gains are left alone.
        biases = self.model.repeat_parameters()  # an ensemble's: every member's
        params = [p for p in self.parameters() if p.requires_grad and all(p is not b for b in biases)]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.hparams["weight_decay"]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if biases:  # max_len (+ n_types) scalars shared by every user: at the base rate they would need thousands
            # of steps to reach the scale of the dot-product scores (the Taobao sample has 7 steps an epoch)
            groups.append({"params": biases, "weight_decay": 0.0, "lr": self.hparams["lr"] * REPEAT_LR_MULT})
        optimizer = torch.optim.AdamW(groups, lr=self.hparams["lr"], fused=self.device.type == "cuda")
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        per_epoch = total / max(self.trainer.max_epochs or 1, 1)
        factor = lr_factor(self.hparams["lr_schedule"], round(self.hparams["warmup_epochs"] * per_epoch), total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def seen_prefixes(seen: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(N, T): for each flat position ``b * T + t`` of ``positions`` (N,), the row ``seen[b]`` (B, T) with its
    columns after t set to padding: what the user had seen up to that position (padding excludes nothing)."""
    width = seen.shape[1]
    cols = torch.arange(width, device=seen.device)
    return seen[positions // width] * (cols <= (positions % width).unsqueeze(1))


def lr_factor(schedule: Literal["constant", "cosine"], warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warm-up from 1/(warmup_steps + 1) to 1 over ``warmup_steps``, then 1 (constant) or a cosine from 1
    down to 0 at ``total_steps``.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
