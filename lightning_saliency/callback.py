"""``SaliencyCallback``: Lightning hooks, cadence, failure policy and state; no maths.

Each logged epoch goes one way: the hook explains the fixed samples (:func:`explain`), the
:class:`~lightning_saliency.monitor.ScoreMonitor` scores them and keeps the alarm record,
:class:`~lightning_saliency.figures.EpochFigures` draws them (with :mod:`render`), and the
:class:`~lightning_saliency.loggers.Publisher` writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.explain import (
    explain,
    explanation_context,
    model_dtype,
    normalize_methods,
)
from lightning_saliency.figures import EpochFigures, Timeline, first_map_method
from lightning_saliency.layers import choose_layer
from lightning_saliency.loggers import Publisher, metrics_step
from lightning_saliency.methods import DEFAULT_METHODS, METHODS, MethodOptions, as_logits
from lightning_saliency.monitor import AlarmEvent, EpochScores, ScoreMonitor
from lightning_saliency.options import resolve_options
from lightning_saliency.samples import (
    BatchKeys,
    FixedSamples,
    choose_samples,
    find_class_names,
    find_normalize,
)
from lightning_saliency.scores import pointing_tolerance

TIMELINE_EVERY = 5  # the timeline picture is logged every 5th logged epoch, and at fit end


class SaliencyCallback(L.Callback):
    """Log where the model looks on fixed validation images, every validation epoch.

    Each logged epoch computes the chosen maps on the trainer's device and logs, under
    ``saliency/``: one grid per method, an ``overview`` (a row per sample), a ``timeline`` of a
    method across epochs, and scalars (drift, localisation and shortcut scores, alarms).
    Training is left bit-identical: no parameter gradients, no leftover hooks, RNG isolated.

    Args:
        methods: maps to compute; see :func:`lightning_saliency.available_methods`.
        num_samples: how many fixed validation images.
        every_n_epochs: cadence of logged epochs.
        method_every_n_epochs: a slower cadence for expensive methods, e.g.
            ``{"integrated_gradients": 5}``.
        target_layer: dotted module path (``"backbone.layer4"``); ``None`` auto-detects.
        target: ``"label"`` (falls back to ``"pred"`` without labels), ``"pred"`` or a class.
        samples: explicit images ``N×C×H×W`` instead of sampling the val set.
        labels: labels of explicit ``samples``.
        masks: object masks ``N×H×W`` of explicit ``samples`` (enable localisation scores).
        image_key, label_key, mask_key: dict-batch keys.
        dataloader_idx: which val dataloader to sample from when there are several.
        ig_steps: integration steps, or ``"auto"`` (fewest steps with <= 1 % completeness error).
        ig_internal_batch_size: images per IG pass (bounds memory); ``None``: the memory of 16
            images at 224 px.
        dff_components: concepts for deep feature factorization.
        method_options: any method's options, ``{"smoothgrad": {"samples": 16}}``; see
            :func:`lightning_saliency.available_options`.
        denormalize: undo the input normalisation for display (auto-detected ``Normalize``).
        mean, std: normalisation to undo when it cannot be detected.
        class_names: names for captions; default: the datamodule's or dataset's ``classes``.
        tile_size: side of each tile in pixels (caps event-file size).
        thresholds: alarm thresholds over the defaults of
            :func:`lightning_saliency.alarms.default_thresholds`.
        timeline_method: the method shown in the timeline (default: the first map method).
        seed: the sample choice and the noise of noisy methods use private generators from it.

    Raises:
        SaliencyConfigError: at construction for a bad argument (unknown method, option or
            score; a value of the wrong type); at setup, before any training step, for what
            depends on the model or the data (no logger, non-image batches, an unknown layer, a
            target out of range, a sharded strategy).

    Example:
        >>> from lightning_saliency import SaliencyCallback
        >>> cb = SaliencyCallback(methods=("gradcam", "ig"), num_samples=4, every_n_epochs=2)
        >>> cb.methods
        ('gradcam', 'integrated_gradients')
        >>> cb.alarms, cb.history
        ([], [])
    """

    def __init__(
        self,
        methods: Sequence[str] = DEFAULT_METHODS,
        num_samples: int = 8,
        every_n_epochs: int = 1,
        method_every_n_epochs: dict[str, int] | None = None,
        target_layer: str | nn.Module | None = None,
        target: Literal["label", "pred"] | int = "label",
        samples: Tensor | None = None,
        labels: Tensor | None = None,
        masks: Tensor | None = None,
        image_key: str = "image",
        label_key: str = "label",
        mask_key: str = "mask",
        dataloader_idx: int = 0,
        ig_steps: int | Literal["auto"] = 32,
        ig_internal_batch_size: int | None = None,
        dff_components: int = 4,
        method_options: dict[str, dict[str, Any]] | None = None,
        denormalize: bool | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        class_names: list[str] | None = None,
        tile_size: int = 112,
        thresholds: dict[str, float] | None = None,
        timeline_method: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.methods = normalize_methods(methods)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise SaliencyConfigError(f"num_samples must be a positive int, got {num_samples!r}.")
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise SaliencyConfigError(
                f"every_n_epochs must be a positive int, got {every_n_epochs!r}."
            )
        if target not in ("label", "pred") and not (isinstance(target, int) and target >= 0):
            raise SaliencyConfigError(
                f"target must be 'label', 'pred' or a class index, got {target!r}."
            )
        if samples is not None and (not isinstance(samples, Tensor) or samples.dim() != 4):
            raise SaliencyConfigError("samples must be an image tensor of shape (N, C, H, W).")
        if (mean is None) != (std is None):
            raise SaliencyConfigError("pass both mean= and std= (or neither).")
        self.method_every_n_epochs = {
            normalize_methods([k])[0]: int(v) for k, v in (method_every_n_epochs or {}).items()
        }
        self.method_options: dict[str, MethodOptions] = resolve_options(
            self.methods,
            method_options,
            {
                "ig_steps": ig_steps,
                "ig_internal_batch_size": ig_internal_batch_size,
                "dff_components": dff_components,
            },
        )
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.target_layer = target_layer
        self.target = target
        self.keys = BatchKeys(image_key, label_key, mask_key)
        self.dataloader_idx = dataloader_idx
        self.denormalize = denormalize
        self.mean, self.std = mean, std
        self.class_names = class_names
        self.tile_size = tile_size
        self.timeline_method = (
            normalize_methods([timeline_method])[0]
            if timeline_method
            else first_map_method(self.methods)
        )
        self.seed = seed
        self.monitor = ScoreMonitor(thresholds, class_names)
        self.timeline = Timeline()
        self.timeline_path: str | None = None
        self._explicit = (samples, labels, masks)
        self._samples: FixedSamples | None = None
        self._layer_name: str | None = None
        self._switched_off: dict[str, str] = {}
        self._warm_start: dict[str, dict[str, Any]] = {}
        self._publisher: Publisher | None = None
        self._enabled = True
        self._explain_at_train_epoch_end = False

    # -- the public record ---------------------------------------------------------------------
    @property
    def alarms(self) -> list[AlarmEvent]:
        """Every alarm raised, cleared and back again, in order (the same on every rank)."""
        return self.monitor.alarms

    @property
    def history(self) -> list[EpochScores]:
        """The scores of each logged epoch (means and per class, per method)."""
        return self.monitor.history

    @property
    def fixed_samples(self) -> FixedSamples | None:
        """The images explained every epoch, with labels and masks (``None`` before setup)."""
        return self._samples

    @property
    def layer_name(self) -> str | None:
        """The target layer layer methods explain (``None`` before setup, or if unused)."""
        return self._layer_name

    @property
    def switched_off(self) -> dict[str, str]:
        """Methods switched off after a failure, with the error that did it."""
        return dict(self._switched_off)

    # -- state -------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(methods=self.methods, seed=self.seed)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The chosen samples, the drift references, the alarm record and history, the
        timeline: a resumed run continues the same story. Plain tensors, lists and dicts only
        (``torch.load(weights_only=True)`` loads it)."""
        return {
            "samples": None if self._samples is None else self._samples.state(),
            "layer_name": self._layer_name,
            "monitor": self.monitor.state_dict(),
            "timeline": self.timeline.state_dict(),
            "warm_start": {k: dict(v) for k, v in self._warm_start.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("samples") is not None:
            self._samples = FixedSamples.from_state(state_dict["samples"])
        self._layer_name = state_dict.get("layer_name")
        self.monitor.load_state_dict(state_dict.get("monitor", state_dict))
        timeline = state_dict.get("timeline", {})
        if isinstance(timeline, list):  # 0.1.0: the columns and their labels side by side
            timeline = {"columns": timeline, "labels": state_dict.get("timeline_labels", [])}
        self.timeline.load_state_dict(timeline)
        self._warm_start = {k: dict(v) for k, v in state_dict.get("warm_start", {}).items()}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_publisher"] = None  # loggers hold file handles; re-created at setup
        return state

    # -- setup ---------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check what can be checked before the model is placed.

        Raises:
            SaliencyConfigError: no logger, or a sharded strategy.
        """
        self._enabled = True
        if getattr(trainer, "fast_dev_run", False):
            self._enabled = False
            rank_zero_info("SaliencyCallback: fast_dev_run is on, so no saliency is computed.")
            return
        if not trainer.loggers:
            raise SaliencyConfigError(
                "SaliencyCallback needs a logger to write images to; pass "
                "Trainer(logger=TensorBoardLogger('logs')) (or CSVLogger for PNG files)."
            )
        self._publisher = Publisher(trainer.loggers)
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy or "ModelParallel" in strategy:
            raise SaliencyConfigError(
                f"SaliencyCallback does not support the sharded strategy {strategy}: its forward "
                "needs every rank, and saliency runs on rank-local samples. Use strategy='ddp' "
                "(or explain() on a gathered model after training)."
            )
        if stage == "fit":
            has_val = is_overridden("validation_step", pl_module)
            if not has_val or trainer.limit_val_batches == 0:
                why = "no validation_step" if not has_val else "limit_val_batches=0"
                self._explain_at_train_epoch_end = True
                rank_zero_warn(
                    f"SaliencyCallback: {why}, so saliency is computed at the end of training "
                    "epochs instead, on samples from the training set (or samples=...)."
                )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Choose the samples and check the model on them, before any training step.

        Raises:
            SaliencyConfigError: non-image batches, an unknown target layer, no usable layer,
                or a target class out of range.
        """
        if self._enabled:
            self._prepare(trainer, pl_module, "fit")

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Under ``trainer.validate()``: the same checks as :meth:`on_fit_start`.

        Raises:
            SaliencyConfigError: as :meth:`on_fit_start`.
        """
        if self._enabled and self._samples is None and not trainer.sanity_checking:
            self._prepare(trainer, pl_module, "validate")

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        loader = None
        if self._samples is None:
            images, labels, masks = self._explicit
            if images is not None:
                self._samples = FixedSamples.given(images, labels, masks)
            else:
                self._samples, loader = choose_samples(
                    trainer,
                    pl_module,
                    stage,
                    self.num_samples,
                    self.seed,
                    self.keys,
                    self.dataloader_idx,
                    train=self._explain_at_train_epoch_end,
                )
        if self._samples is None:
            rank_zero_warn("SaliencyCallback: the val set yields no images; nothing to explain.")
            self._enabled = False
            return
        if len(self._samples) < self.num_samples:
            rank_zero_warn(
                f"SaliencyCallback: only {len(self._samples)} images available, fewer than "
                f"num_samples={self.num_samples}; explaining those."
            )
        if self.mean is None and self.denormalize is not False and loader is not None:
            found = find_normalize(getattr(loader, "dataset", None))
            if found is not None:
                self.mean, self.std = found
        if self.class_names is None:
            self.class_names = find_class_names(trainer, loader)
            self.monitor.class_names = self.class_names
        self._check_model(pl_module)

    def _check_model(self, pl_module: L.LightningModule) -> None:
        """A forward on two samples: the layer resolves (or is found), the classes fit."""
        assert self._samples is not None
        images = self._samples.images.to(pl_module.device)
        with explanation_context(pl_module):
            x = images[:2].detach().clone().to(model_dtype(pl_module))
            if any(METHODS[m].needs_layer for m in self.methods):
                layer = self.target_layer or self._layer_name  # a resumed run keeps its layer
                self._layer_name = choose_layer(pl_module, x, layer)[0]
            logits = as_logits(pl_module(x))
        if isinstance(self.target, int) and self.target >= logits.shape[1]:
            raise SaliencyConfigError(
                f"target={self.target} but the model has {logits.shape[1]} classes."
            )
        if self._layer_name:
            rank_zero_info(f"SaliencyCallback: explaining layer '{self._layer_name}'.")

    # -- cadence -------------------------------------------------------------------------------
    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking or self._explain_at_train_epoch_end:
            return
        if trainer.state.fn == "fit" and trainer.current_epoch % self.every_n_epochs != 0:
            return
        self._explain_and_log(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = trainer.current_epoch % self.every_n_epochs == 0
        if self._enabled and self._explain_at_train_epoch_end and due:
            self._explain_and_log(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the whole timeline once more and save it as ``saliency_timeline.png`` beside the
        logs (independent of TensorBoard's ``--samples_per_plugin``)."""
        if not (self._enabled and trainer.is_global_zero and len(self.timeline)):
            return
        if self._publisher is None:  # a callback unpickled after setup has no loggers
            return
        picture = self.timeline.picture()
        self._publisher.images({"saliency/timeline": picture}, metrics_step(trainer))
        self.timeline_path = self._publisher.save_png(picture, "saliency_timeline.png")

    def _due(self, method: str, epoch: int) -> bool:
        every = self.method_every_n_epochs.get(method, 1)
        return method not in self._switched_off and epoch % every == 0

    # -- one logged epoch: explain -> monitor -> figures -> loggers ------------------------------
    def _explain_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._samples is None:
            return
        epoch = trainer.current_epoch
        active = [m for m in self.methods if self._due(m, epoch)]
        if not active:
            return
        samples = self._samples.to(pl_module.device)
        try:
            out = explain(
                pl_module,
                samples.images,
                self._targets(samples),
                active,
                self.target_layer or self._layer_name,
                on_error="collect",
                method_options={m: self.method_options[m] for m in active},
                seed=self.seed,
                warm_start=self._warm_start,
            )
        except Exception as err:  # a monitor never kills a training run
            self._switch_off(active, err)
            return
        for method, error in out.errors.items():
            self._switch_off([method], error)
        tolerance = pointing_tolerance(samples.images.shape[-1])
        report = self.monitor.observe(epoch, out, samples.labels, samples.masks, tolerance)
        pl_module.log_dict(report.metrics, on_step=False, on_epoch=True, sync_dist=False)
        for event in report.events:
            if event.state == "cleared":
                rank_zero_info(event.message())
            else:
                rank_zero_warn(event.message())
        if not (trainer.is_global_zero and self._publisher is not None):
            return
        figures = EpochFigures(
            samples.images,
            out,
            samples.labels,
            self.class_names,
            self.mean,
            self.std,
            self.tile_size,
        )
        pictures = {f"saliency/{m}": grid for m, grid in figures.grids().items()}
        pictures["saliency/overview"] = figures.overview()
        if self.timeline_method in figures.tiles:
            self.timeline.add(figures.tiles[self.timeline_method], epoch)
            if len(self.timeline) % TIMELINE_EVERY == 1:  # the whole picture again at fit end
                pictures["saliency/timeline"] = self.timeline.picture()
        step = metrics_step(trainer)
        self._publisher.images(pictures, step)
        self._publisher.text("saliency/captions", "  \n".join(figures.captions), step)

    def _targets(self, samples: FixedSamples) -> Tensor | int | None:
        if self.target == "label" and samples.labels is not None:
            return samples.labels
        return self.target if isinstance(self.target, int) else None

    def _switch_off(self, methods: Sequence[str], err: BaseException) -> None:
        """The failure policy: warn once, skip the methods from now on, keep training."""
        for method in methods:
            self._switched_off[method] = repr(err)
        rank_zero_warn(
            f"SaliencyCallback: {', '.join(methods)} failed and is skipped from now on "
            f"({type(err).__name__}: {err}). Training goes on."
        )
