"""LightningModule: losses, optimisation, metrics and logging for VG-LAW.

Batches come from `vglaw.data.datamodule.ReferDataModule` (see its docstring for the keys).
"""
from __future__ import annotations

import math
from functools import partial

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from vglaw.data.datamodule import CALIBRATION
from vglaw.errors import UsageError
from vglaw.models.checkpoint import load_visual_weights
from vglaw.models.config import ModelArgs, ScratchConfig
from vglaw.models.generalised import EXIST_THRESHOLD
from vglaw.models.loading import VARIANTS, config_from_hparams, model_args_dict, monitor_metric
from vglaw.models.postprocess import to_original
from vglaw.models.text_encoder import DEFAULT_TEXT_ENCODER
from vglaw.training.calibration import CalibrationPeaks, calibration_samples, fit_platt
from vglaw.training.describe import DESCRIBE_PARTS, describe_losses
from vglaw.training.finetune import freeze as freeze_parts
from vglaw.training.finetune import initialise_from
from vglaw.training.gmetrics import GeneralisedMetrics, grec_correct
from vglaw.training.losses import grounding_loss
from vglaw.training.metrics import GroundingMetrics, measure_predictions


def lr_factor(step: int, steps_per_epoch: int, warmup_steps: int, warmup_start: float, milestones: tuple[int, ...],
              gamma: float) -> float:
    """The learning rate at optimiser step `step` as a factor of the base rate: linear from
    `warmup_start` to 1 over `warmup_steps`, times `gamma` for each milestone epoch reached."""
    warm = warmup_start + (1 - warmup_start) * min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * gamma ** sum(step // steps_per_epoch >= m for m in milestones)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters AdamW leaves undecayed: every 1-D parameter (biases, norms) and those a module
    lists in its `no_weight_decay()` (timm's convention), with their full names."""
    names = {n for n, p in model.named_parameters() if p.ndim < 2}
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return names


class VGLAWModule(pl.LightningModule):
    """Train and evaluate a VG-LAW variant.

    Args:
        variant: model name from `vglaw.list_models()`.
        img_size: input side (linked from the data module by the CLI).
        text_encoder: BERT name or folder (linked from the data module by the CLI).
        task: "both", "box" (REC only) or "mask" (RES only).
        visual_weights: detectron2 / MAE / SAM checkpoint for the visual backbone.
        visual_rel_pos: how the checkpoint's longer relative-position tables reach the model's
            grid: "crop" (the paper's centre crop) or "interpolate" (detectron2's).
        model_args: further fields of the variant's config (`ModelArgs`, e.g. {"text_layers": 6}),
            checked field by field by LightningCLI; a plain dict as older checkpoints hold it.
        seg_classes: categories of a from-scratch variant's auxiliary classifier (background
            included; linked by the CLI from the data module's `num_categories`); 0 for none.
        grad_checkpointing: recompute backbone blocks during backward to save memory.
        weight_l1, weight_giou, weight_focal, weight_dice: loss weights (paper: 1, 1, 4, 4).
        weight_lap: weight of the box head's attention supervision (`lap_attention_loss`;
            paper: 0, none). Needs the mask targets, so not with task "mask".
        weight_centre, weight_exist: weights of a generalised model's centre-map and existence
            losses (`set_losses`); its boxes use weight_l1 and weight_giou.
        weight_seg: weight of the per-pixel category loss (`category_loss`; paper: 0, none).
            Needs a from-scratch variant with `seg_classes` (the CLI links both, and the data
            module's `categories`, from this weight).
        lr_visual: learning rate of the visual backbone.
        lr_text: learning rate of the text encoder.
        lr_other: learning rate of everything else (aggregation, weight generation, heads).
        weight_decay: AdamW decay of matrices: 1-D parameters and those a module lists in its
            `no_weight_decay()` (stacked per-block biases and norms, learned queries, position
            tables) get none.
        adam_eps: AdamW's epsilon (the official port's 1e-6).
        warmup_steps: optimiser steps of linear warm-up, from `warmup_start` x lr to lr.
        warmup_start: the learning-rate factor the warm-up starts from (the official port's 1%).
        milestones: epochs at which the learning rate is multiplied by `gamma`.
        gamma: step decay factor.
        init_from: a trained model (folder or hub id) whose weights the model starts from
            (`vglaw.training.finetune.initialise_from`): fine-tuning.
        freeze: parts kept fixed: "text", "backbone" (its static weights; the language-adaptive
            updates still come from the trained weight generator), "aggregator",
            "weight_generator", "box_head", "mask_head". With every grounding part fixed, the
            grounding losses (which would train nothing) are not computed in training.
        weight_describe: weight of a describing variant's next-token loss
            (`vglaw.training.describe`); 0 trains no describing head.
        weight_locate: weight of the box head's grounding of the query box through the
            location-adapted backbone (a describing variant's auxiliary term).
    """

    def __init__(
        self,
        variant: str = "vglaw_vitb",
        img_size: int = 448,
        text_encoder: str = DEFAULT_TEXT_ENCODER,
        task: str = "both",
        visual_weights: str | None = None,
        visual_rel_pos: str = "crop",
        model_args: ModelArgs | None = None,
        seg_classes: int = 0,
        grad_checkpointing: bool = False,
        weight_l1: float = 1.0,
        weight_giou: float = 1.0,
        weight_focal: float = 4.0,
        weight_dice: float = 4.0,
        weight_lap: float = 0.0,
        weight_seg: float = 0.0,
        weight_centre: float = 1.0,
        weight_exist: float = 1.0,
        lr_visual: float = 4e-5,
        lr_text: float = 4e-5,
        lr_other: float = 4e-4,
        weight_decay: float = 1e-4,
        adam_eps: float = 1e-6,
        warmup_steps: int = 0,
        warmup_start: float = 0.01,
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        init_from: str | None = None,
        freeze: list[str] | None = None,
        weight_describe: float = 0.0,
        weight_locate: float = 0.0,
    ) -> None:
        super().__init__()
        model_args = model_args_dict(model_args)  # checkpoints hold plain data: the fields set, as a dict
        self.save_hyperparameters()
        config = config_from_hparams(self.hparams)
        self.model = VARIANTS[variant][0](config)
        if visual_weights is not None:
            load_visual_weights(self.model.backbone, visual_weights, rel_pos=visual_rel_pos)
        if init_from is not None:
            self.init_report = initialise_from(self.model, init_from)
            rank_zero_info(self.init_report)
        self.frozen = freeze_parts(self.model, list(freeze or []))
        self.train()  # frozen parts in eval mode now: Lightning keeps each module's mode from the start of fit
        self.model.set_grad_checkpointing(grad_checkpointing)
        self.img_size = img_size
        if weight_lap < 0:
            raise UsageError(f"weight_lap must be >= 0, got {weight_lap}")
        if weight_lap > 0 and task == "mask":
            raise UsageError("weight_lap supervises the box head, which task 'mask' does not have")
        self.loss_weights = {"l1": weight_l1, "giou": weight_giou, "focal": weight_focal, "dice": weight_dice,
                             "centre": weight_centre, "exist": weight_exist}
        if weight_lap > 0:
            self.loss_weights["lap"] = weight_lap
        if weight_seg < 0:
            raise UsageError(f"weight_seg must be >= 0, got {weight_seg}")
        if weight_seg > 0:
            if not (isinstance(self.model.config, ScratchConfig) and self.model.config.seg_classes):
                raise UsageError("weight_seg needs a from-scratch variant with a category classifier: seg_classes "
                                 "(the dataset's categories + 1) and a mask task")
            self.loss_weights["seg"] = weight_seg
        self.milestones = list(milestones if milestones is not None else [10, 60])
        if not 0.0 <= warmup_start <= 1.0:
            raise UsageError(f"warmup_start must be in [0, 1], got {warmup_start}")
        if not adam_eps > 0:
            raise UsageError(f"adam_eps must be > 0, got {adam_eps}")
        if weight_describe < 0 or weight_locate < 0:
            raise UsageError("weight_describe and weight_locate must be >= 0")
        if (weight_describe or weight_locate) and not self.model.describes:
            raise UsageError(f"weight_describe / weight_locate need a variant with a describing head "
                             f"(e.g. vglaw_small_scratch_describe), not {variant}")
        # A loss term whose parameters are all fixed trains nothing: skip the grounding pass then.
        grounding = [p for n, p in self.model.named_parameters() if not n.startswith(DESCRIBE_PARTS)]
        self.trains_grounding = any(p.requires_grad for p in grounding)
        self.metrics = nn.ModuleDict()
        self._calibrating = False  # collecting box-score calibration peaks (generalised, validation in fit)
        self.calibration_peaks = CalibrationPeaks()

    def train(self, mode: bool = True) -> VGLAWModule:
        super().train(mode)
        for module in self.frozen:  # fixed parts keep their BatchNorm statistics and no dropout
            module.eval()
        return self

    def forward(self, batch: dict, return_attention: bool = False) -> dict[str, Tensor]:
        return self.model(batch["images"], batch["input_ids"], batch["attention_mask"], return_attention)

    def _losses(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        if "seg" in self.loss_weights and "categories" not in batch:
            raise UsageError("weight_seg > 0 but the batch has no 'categories' maps: set data.categories: true")
        return grounding_loss(outputs, batch["boxes"], batch["masks"], self.loss_weights, batch.get("categories"),
                              batch.get("boxes_set"), batch.get("has_target"))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms: dict[str, Tensor] = {}
        if self.trains_grounding:
            # The attention supervision needs the box head's pooling map.
            terms = self._losses(self(batch, return_attention="lap" in self.loss_weights), batch)
        if self.hparams.weight_describe > 0:
            described = self._describe_losses(batch)
            loss = described.pop("loss") + terms.pop("loss", 0.0)
            terms = {**terms, **described, "loss": loss}
        if not torch.isfinite(terms["loss"]):
            bad = [f"{k}={v.item()}" for k, v in terms.items() if k != "loss" and not torch.isfinite(v)]
            raise FloatingPointError(
                f"non-finite training loss at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}): {', '.join(bad) or 'loss=' + str(terms['loss'].item())}; stopping before "
                "the weights are corrupted (try a lower learning rate or fp32)"
            )
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=len(batch["texts"]))
        self.log("loss", terms["loss"], prog_bar=True, logger=False, batch_size=len(batch["texts"]))
        return terms["loss"]

    def _describe_losses(self, batch: dict) -> dict[str, Tensor]:
        return describe_losses(self.model, batch, self.hparams.weight_describe, self.hparams.weight_locate)

    # ---- evaluation -------------------------------------------------------------------------

    def _splits(self, stage: str) -> list[str]:
        """The splits of this stage's dataloaders, in order: while fitting, the data module's
        calibration slice (when it has one) comes before the validation splits."""
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "val_splits" if stage == "val" else "test_splits", None)
        names = list(names) if names else ["val" if stage == "val" else "test"]
        calibration = getattr(dm, "calibration_split", None)
        if stage == "val" and calibration and self.trainer.state.fn == "fit":
            names.insert(0, calibration)
        return names

    def _reset_metrics(self, stage: str) -> None:
        self._stage_splits = self._splits(stage)
        metric = GeneralisedMetrics if self.generalised else GroundingMetrics
        self.metrics = nn.ModuleDict({s: metric() for s in self._stage_splits if s != CALIBRATION}).to(self.device)

    @property
    def generalised(self) -> bool:
        """The model grounds 0..N objects (gRefCOCO metrics and losses)."""
        return self.model.generalised

    @property
    def monitor(self) -> str:
        """The validation metric that picks checkpoints (`monitor_metric`)."""
        return monitor_metric(self.hparams.variant, self.hparams.task)

    @torch.no_grad()
    def measure(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """Per-sentence box IoU and mask intersection / union, in original-image pixels (for a
        generalised model, the `GeneralisedMetrics` values: its mask is measured as drawn, beside
        its no-target decision)."""
        pred = to_original(outputs, batch["scale"], batch["pad"], batch["orig_size"], self.img_size, gate_masks=False)
        if "box_sets" in pred:
            return self._measure_sets(pred, batch)
        return measure_predictions(pred, batch)

    def _measure_sets(self, pred: dict, batch: dict) -> dict[str, Tensor]:
        targets = [t.to(b.device) for b, t in zip(pred["box_sets"], batch["orig_boxes_set"])]
        flags = lambda values: torch.tensor(values, dtype=torch.bool)  # noqa: E731
        return {
            "has_target": batch["has_target"],
            "pred_no_target": pred["exists"] < EXIST_THRESHOLD,  # the existence head decides, as ReLA's nt head
            **measure_predictions({"masks": pred["masks"]}, batch),  # the mask as drawn vs the target union
            "grec": flags([grec_correct(b, t) for b, t in zip(pred["box_sets"], targets)]),
            "grec_iou": flags([grec_correct(b, t, giou=False) for b, t in zip(pred["box_sets"], targets)]),
            "boxes_empty": flags([len(b) == 0 for b in pred["box_sets"]]),
        }

    def _eval_step(self, batch: dict, dataloader_idx: int) -> None:
        outputs = self(batch)
        split = self._stage_splits[dataloader_idx]
        if split == CALIBRATION:  # held-out training images: only the box-score calibration reads them
            if self._calibrating:
                self.calibration_peaks.update(*calibration_samples(outputs, batch, self.img_size))
            return
        if self._calibrating:  # the slice is done: fit, so validation and the checkpoint use the same scores
            self._calibrate()
        terms = self._losses(outputs, batch)
        self.log(f"{split}/loss", terms["loss"], batch_size=len(batch["texts"]), add_dataloader_idx=False,
                 sync_dist=True)
        if self.hparams.weight_describe > 0:
            described = self._describe_losses(batch)
            self.log_dict({f"{split}/{k}": described[k] for k in ("describe", "word_acc")},
                          batch_size=len(batch["texts"]), add_dataloader_idx=False, sync_dist=True)
        self.metrics[split].update(batch["index"], **self.measure(outputs, batch))

    def _log_metrics(self) -> None:
        for split, metric in self.metrics.items():
            values = metric.compute()
            values.pop("n", None)
            self.log_dict({f"{split}/{k}": v.float() for k, v in values.items()}, add_dataloader_idx=False)
            metric.reset()

    def on_fit_start(self) -> None:
        if self.generalised and CALIBRATION not in self._splits("val"):
            rank_zero_warn("box scores stay uncalibrated: the data module holds no calibration slice "
                           "(set data.calibration_holdout, e.g. 0.05)")

    def on_validation_epoch_start(self) -> None:
        self._reset_metrics("val")
        # A generalised model's box scores are recalibrated on the held-out training images while
        # it trains (`vglaw.training.calibration`), not in the sanity check.
        self._calibrating = (self.generalised and CALIBRATION in self._stage_splits
                             and not self.trainer.sanity_checking)
        self.calibration_peaks.reset()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics()
        if self._calibrating:  # no validation batch came after the slice
            self._calibrate()

    def _calibrate(self) -> None:
        """Fit the box-score calibration on the calibration slice's peaks (gathered from every
        process), once per validation."""
        self._calibrating = False
        logits, labels = self.calibration_peaks.compute()  # every process fits the same scaling from all the peaks
        self.calibration_peaks.reset()
        fit = fit_platt(logits, labels)
        head = self.model.centre_head
        if fit is None:
            rank_zero_warn(f"box-score calibration skipped at epoch {self.current_epoch}: {int(labels.sum())} "
                           f"matching and {int((1 - labels).sum())} other peaks on the calibration slice; keeping "
                           f"{head.score_calibration.tolist()}")
        else:
            head.score_calibration.copy_(torch.tensor(fit, dtype=head.score_calibration.dtype))
        a, b = head.score_calibration.tolist()
        self.log_dict({"val/score_scale": a, "val/score_bias": b}, add_dataloader_idx=False)

    def on_test_epoch_start(self) -> None:
        self._reset_metrics("test")
        self._calibrating = False

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_metrics()

    # ---- optimisation -----------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        """AdamW's parameter groups: the visual backbone, the text encoder and the rest, each
        with its learning rate, split into decayed and undecayed (`no_weight_decay_names`)."""
        hp = self.hparams
        groups: dict[str, dict[str, list]] = {}
        undecayed = no_weight_decay_names(self.model)
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            part = "visual" if name.startswith("backbone.") else "text" if name.startswith("text.") else "other"
            no_decay = name in undecayed
            groups.setdefault(f"{part}{'_nd' if no_decay else ''}", {"params": []})["params"].append(p)
        lrs = {"visual": hp.lr_visual, "text": hp.lr_text, "other": hp.lr_other}
        return [{"params": g["params"], "lr": lrs[k.split("_")[0]], "name": k,
                 "weight_decay": 0.0 if k.endswith("_nd") else hp.weight_decay} for k, g in groups.items()]

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.param_groups(), eps=hp.adam_eps, fused=True)
        steps_per_epoch = max(1, math.ceil(self.trainer.estimated_stepping_batches / max(1, self.trainer.max_epochs)))
        factor = partial(lr_factor, steps_per_epoch=steps_per_epoch, warmup_steps=hp.warmup_steps,
                         warmup_start=hp.warmup_start, milestones=tuple(self.milestones), gamma=hp.gamma)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
