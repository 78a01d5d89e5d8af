"""``SaliencyCallback``: Lightning hooks, cadence and orchestration; the maths lives elsewhere."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from lightning_saliency import alarms as alarm_rules
from lightning_saliency import render
from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.explain import (
    DEFAULT_METHODS,
    check_options,
    explanation_context,
    model_dtype,
    normalize_methods,
)
from lightning_saliency.explain import explain as run_explain
from lightning_saliency.layers import find_target_layer, resolve_layer
from lightning_saliency.loggers import ImageSink, log_dir_of, sinks_for
from lightning_saliency.methods import METHODS
from lightning_saliency.methods.base import as_logits
from lightning_saliency.samples import (
    BatchKeys,
    FixedSamples,
    collect_samples,
    find_normalize,
    pick_loader,
    split_batch,
)
from lightning_saliency.scores import _small, map_scores

PER_CLASS_SCORES = (
    "object_enrichment",
    "object_energy",
    "pointing_game",
    "corner_enrichment",
    "dead_maps",
)


def _finite(values: dict[str, float]) -> dict[str, float]:
    """Drop NaN scores (every map of the group was dead): nothing to log or alarm on."""
    return {k: v for k, v in values.items() if v == v}


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
        denormalize: undo the input normalisation for display (auto-detected ``Normalize``).
        mean, std: normalisation to undo when it cannot be detected.
        class_names: names for captions; default: the datamodule's or dataset's ``classes``.
        tile_size: side of each tile in pixels (caps event-file size).
        thresholds: alarm thresholds over the defaults in
            :data:`lightning_saliency.alarms.DEFAULT_THRESHOLDS`.
        timeline_method: the method shown in the timeline (default: the first map method).
        seed: the sample choice (and SmoothGrad's noise) use private generators from this seed.

    Example:
        >>> from lightning_saliency import SaliencyCallback
        >>> cb = SaliencyCallback(methods=("gradcam", "ig"), num_samples=4, every_n_epochs=2)
        >>> cb.methods
        ('gradcam', 'integrated_gradients')
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
        self.options = check_options(
            self.methods,
            {
                "ig_steps": ig_steps,
                "ig_internal_batch_size": ig_internal_batch_size,
                "dff_components": dff_components,
                "smoothgrad_seed": seed,  # SmoothGrad's noise comes from the callback's seed
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
        self.thresholds = alarm_rules.merge_thresholds(thresholds)
        map_methods = [m for m in self.methods if m != "dff"]
        self.timeline_method = (
            normalize_methods([timeline_method])[0]
            if timeline_method
            else (map_methods[0] if map_methods else None)
        )
        self.seed = seed
        self._explicit = (samples, labels, masks)
        self._reset_state()

    # -- state -------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self._samples: FixedSamples | None = None
        self._layer_name: str | None = None
        self._first: dict[str, Tensor] = {}
        self._prev: dict[str, Tensor] = {}
        self._alarmed: set[tuple[str, str]] = set()
        self._failed: dict[str, str] = {}
        self._timeline: list[Tensor] = []
        self._timeline_labels: list[str] = []
        self._ig_steps_start: int | None = None
        self._sinks: list[ImageSink] = []
        self._enabled = True
        self._on_train_end_instead = False
        self.timeline_path: str | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(methods=self.methods, seed=self.seed)

    def state_dict(self) -> dict[str, Any]:
        """The chosen samples, the reference maps for drift, the alarms raised: a resumed run
        continues the same story. Plain tensors only (``weights_only=True`` loads it)."""
        return {
            "samples": None if self._samples is None else self._samples.state(),
            "layer_name": self._layer_name,
            "first": {k: v.cpu() for k, v in self._first.items()},
            "prev": {k: v.cpu() for k, v in self._prev.items()},
            "alarmed": [list(k) for k in sorted(self._alarmed)],
            "timeline": [t.cpu() for t in self._timeline],
            "timeline_labels": list(self._timeline_labels),
            "ig_steps_start": self._ig_steps_start,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("samples") is not None:
            self._samples = FixedSamples.from_state(state_dict["samples"])
        self._layer_name = state_dict.get("layer_name")
        self._first = dict(state_dict.get("first", {}))
        self._prev = dict(state_dict.get("prev", {}))
        self._alarmed = {tuple(k) for k in state_dict.get("alarmed", [])}
        self._timeline = list(state_dict.get("timeline", []))
        self._timeline_labels = list(state_dict.get("timeline_labels", []))
        self._ig_steps_start = state_dict.get("ig_steps_start")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sinks"] = []  # loggers hold file handles; re-created at setup
        return state

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._enabled = True
        if trainer.fast_dev_run:
            self._enabled = False
            rank_zero_info("SaliencyCallback: fast_dev_run is on, so no saliency is computed.")
            return
        if not trainer.loggers:
            raise SaliencyConfigError(
                "SaliencyCallback needs a logger to write images to; pass "
                "Trainer(logger=TensorBoardLogger('logs')) (or CSVLogger for PNG files)."
            )
        self._sinks = sinks_for(trainer.loggers)
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
                self._on_train_end_instead = True
                rank_zero_warn(
                    f"SaliencyCallback: {why}, so saliency is computed at the end of training "
                    "epochs instead, on samples from the training set (or samples=...)."
                )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled:
            self._prepare(trainer, pl_module, "fit")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and self._samples is None and not trainer.sanity_checking:
            self._prepare(trainer, pl_module, "validate")

    def _source_loader(self, trainer: L.Trainer, stage: str) -> Any:
        from lightning.pytorch.trainer.connectors.data_connector import _request_dataloader

        if self._on_train_end_instead:
            source = trainer.fit_loop._data_source
        elif stage == "fit":
            source = trainer.fit_loop.epoch_loop.val_loop._data_source
        else:
            source = trainer.validate_loop._data_source
        if not source.is_defined():
            return None
        loaders = _request_dataloader(source)
        return pick_loader(loaders, 0 if self._on_train_end_instead else self.dataloader_idx)

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Choose the samples and check the model on them: misconfiguration raises here,
        before any training step."""
        device = pl_module.device
        loader = None
        if self._samples is None:
            with isolate_rng(include_cuda=False):
                self._samples, loader = self._choose_samples(trainer, pl_module, stage)
        if self._samples is None:
            rank_zero_warn("SaliencyCallback: the val set yields no images; nothing to explain.")
            self._enabled = False
            return
        if len(self._samples) < self.num_samples:
            rank_zero_warn(
                f"SaliencyCallback: only {len(self._samples)} images available, fewer than "
                f"num_samples={self.num_samples}; explaining those."
            )
        self._picture_settings(trainer, loader)
        images = self._samples.images.to(device)
        needs_layer = any(METHODS[m].needs_layer for m in self.methods)
        with explanation_context(pl_module):
            x = images[:2].detach().clone().to(model_dtype(pl_module))
            if needs_layer:
                if self.target_layer is not None:
                    self._layer_name = resolve_layer(pl_module, self.target_layer)[0]
                elif self._layer_name is None:
                    self._layer_name = find_target_layer(pl_module, x)[0]
            logits = as_logits(pl_module(x))
        if isinstance(self.target, int) and self.target >= logits.shape[1]:
            raise SaliencyConfigError(
                f"target={self.target} but the model has {logits.shape[1]} classes."
            )
        if self._layer_name:
            rank_zero_info(f"SaliencyCallback: explaining layer '{self._layer_name}'.")

    def _choose_samples(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str
    ) -> tuple[FixedSamples | None, Any]:
        images, labels, masks = self._explicit
        if images is not None:
            if masks is not None and masks.dim() == 4:
                masks = masks[:, 0]
            return FixedSamples(images.detach().clone(), labels, masks), None
        loader = self._source_loader(trainer, stage)
        if loader is None:
            raise SaliencyConfigError(
                "SaliencyCallback found no val dataloader to take samples from; define "
                "val_dataloader() or pass samples=<tensor N×C×H×W>."
            )
        batch, indices = collect_samples(loader, self.num_samples, self.seed, self.keys)
        if batch is None:
            return None, loader
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=self.dataloader_idx)
        images, labels, masks = split_batch(batch, self.keys)
        images = images.detach().clone()
        return FixedSamples(images, labels, masks, indices), loader

    def _picture_settings(self, trainer: L.Trainer, loader: Any) -> None:
        if self.mean is None and self.denormalize is not False and loader is not None:
            found = find_normalize(getattr(loader, "dataset", None))
            if found is not None:
                self.mean, self.std = found
        if self.class_names is None:
            for owner in (trainer.datamodule, getattr(loader, "dataset", None)):
                names = getattr(owner, "classes", None)
                if isinstance(names, (list, tuple)) and names:
                    self.class_names = [str(n) for n in names]
                    break

    # -- the per-epoch work --------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking or self._on_train_end_instead:
            return
        if trainer.state.fn == "fit" and trainer.current_epoch % self.every_n_epochs != 0:
            return
        self._explain_and_log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = trainer.current_epoch % self.every_n_epochs == 0
        if self._enabled and self._on_train_end_instead and due:
            self._explain_and_log(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the whole timeline once more and save it as ``saliency_timeline.png`` beside the
        logs (independent of TensorBoard's ``--samples_per_plugin``)."""
        if not (self._enabled and trainer.is_global_zero and self._timeline):
            return
        picture = render.to_uint8(render.timeline(self._timeline, self._timeline_labels)).cpu()
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for sink in self._sinks:
            sink.image("saliency/timeline", picture, step)
        directory = log_dir_of(self._sinks)
        if directory:
            path = os.path.join(directory, "saliency_timeline.png")
            self.timeline_path = self._sinks[0].save_png(picture, path)

    def _due(self, method: str, epoch: int) -> bool:
        return method not in self._failed and epoch % self.method_every_n_epochs.get(method, 1) == 0

    def _explain_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._samples is None:
            return
        epoch = trainer.current_epoch
        active = [m for m in self.methods if self._due(m, epoch)]
        if not active:
            return
        samples = self._samples.to(pl_module.device)
        try:
            out = self._explain(pl_module, samples, active)
        except Exception as err:  # a monitor never kills a training run
            self._failed.update(dict.fromkeys(active, repr(err)))  # warn once, skip from now on
            self._warn_failure(", ".join(active), err)
            return
        for method, err in out.errors.items():
            self._failed[method] = repr(err)
            self._warn_failure(method, err)
        self._log_scores(trainer, pl_module, samples, out, epoch)
        if trainer.is_global_zero:
            self._log_pictures(trainer, samples, out, epoch)

    def _explain(self, pl_module: L.LightningModule, samples: FixedSamples, active: list[str]):
        if self.target == "label" and samples.labels is not None:
            targets: Any = samples.labels
        elif isinstance(self.target, int):
            targets = self.target
        else:
            targets = None
        options = dict(self.options)
        if options.get("ig_steps") == "auto" and self._ig_steps_start:
            options["ig_steps_start"] = max(8, self._ig_steps_start // 2)
        out = run_explain(
            pl_module,
            samples.images,
            targets,
            active,
            self.target_layer or self._layer_name,
            on_error="collect",
            **options,
        )
        if "ig_steps" in out.extras:
            self._ig_steps_start = int(out.extras["ig_steps"])
        return out

    def _warn_failure(self, method: str, err: BaseException) -> None:
        rank_zero_warn(
            f"SaliencyCallback: {method} failed and is skipped from now on "
            f"({type(err).__name__}: {err}). Training goes on."
        )

    # -- scores --------------------------------------------------------------------------------
    def _class_name(self, index: int) -> str:
        if self.class_names and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return str(index)

    def _log_scores(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        samples: FixedSamples,
        out: Any,
        epoch: int,
    ) -> None:
        metrics: dict[str, float] = {}
        raised: list[alarm_rules.Alarm] = []
        groups = out.targets if samples.labels is None else samples.labels
        tolerance = self._cell_tolerance(samples)
        for method, maps in out.items():
            if maps.dim() != 3:
                continue
            small = _small(maps)
            scores = map_scores(
                maps, samples.masks, self._prev.get(method), self._first.get(method), tolerance
            )
            if method == "integrated_gradients" and "ig_completeness_error" in out.extras:
                scores["ig_completeness_error"] = out.extras["ig_completeness_error"]
                metrics[f"saliency/{method}/steps"] = float(out.extras["ig_steps"])
            means, per_class = self._group_means(scores, groups, None)
            for name, value in means.items():
                metrics[f"saliency/{method}/{name}"] = value
            for class_name, values in per_class.items():
                for name, value in values.items():
                    metrics[f"saliency/{method}/{name}/{class_name}"] = value
            # Alarms judge the samples the model gets right: right for the wrong reason is a
            # shortcut; the maps of a class the model does not know yet mean nothing.
            if samples.labels is not None:
                correct = out.logits.argmax(1) == samples.labels.to(out.logits.device)
                means, per_class = self._group_means(scores, groups, correct)
            alarms = alarm_rules.check(method, means, per_class, self.thresholds)
            tripped = {a.score for a in alarms}
            for score in self.thresholds:
                if score in tripped or score in means:
                    metrics[f"saliency/{method}/alarm/{score}"] = float(score in tripped)
            raised.extend(alarms)
            self._first.setdefault(method, small)
            self._prev[method] = small
        metrics["saliency/alarms"] = float(len(raised))
        for alarm in raised:
            if alarm.key not in self._alarmed:
                self._alarmed.add(alarm.key)
                rank_zero_warn(alarm.message(epoch))
        for name, value in metrics.items():
            pl_module.log(
                name,
                value,
                on_epoch=True,
                on_step=False,
                sync_dist=False,
                logger=True,
                prog_bar=False,
            )

    def _group_means(
        self, scores: dict[str, Tensor], groups: Tensor, select: Tensor | None, min_count: int = 2
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Mean of each score over the selected samples, and per class (groups with fewer than
        ``min_count`` selected samples are left out when a selection is given)."""
        need = 1 if select is None or bool(select.all()) else min_count
        select = torch.ones_like(groups, dtype=torch.bool) if select is None else select
        means: dict[str, float] = {}
        if int(select.sum()) >= need:
            means = _finite({k: float(v[select].float().nanmean()) for k, v in scores.items()})
        per_class: dict[str, dict[str, float]] = {}
        for cls in groups.unique().tolist():
            chosen = (groups == cls) & select
            if int(chosen.sum()) >= need:
                per_class[self._class_name(int(cls))] = _finite(
                    {
                        k: float(scores[k][chosen].float().nanmean())
                        for k in PER_CLASS_SCORES
                        if k in scores
                    }
                )
        return means, per_class

    def _cell_tolerance(self, samples: FixedSamples) -> int:
        """One feature-map cell, in input pixels (pointing-game tolerance)."""
        return max(1, samples.images.shape[-1] // 8)

    # -- pictures ------------------------------------------------------------------------------
    def _captions(self, samples: FixedSamples, out: Any) -> list[str]:
        probs = out.logits.softmax(dim=1)
        conf, pred = probs.max(dim=1)
        pred_l, conf_l = pred.tolist(), conf.tolist()
        labels = None if samples.labels is None else samples.labels.tolist()
        texts = []
        for i in range(len(pred_l)):
            p = self._class_name(pred_l[i])[:8]
            if labels is None:
                texts.append(f"pred {p} {conf_l[i]:.0%}")
            else:
                mark = "ok" if labels[i] == pred_l[i] else "X"
                texts.append(f"{self._class_name(labels[i])[:7]}>{p} {conf_l[i]:.0%} {mark}")
        return texts

    def _log_pictures(
        self, trainer: L.Trainer, samples: FixedSamples, out: Any, epoch: int
    ) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        size = self._tile_shape(samples.images)
        picture = render.resize(render.to_picture(samples.images, self.mean, self.std), size)
        captions = self._captions(samples, out)
        ncol = min(len(samples), 4)
        tiles: dict[str, Tensor] = {}
        for method, maps in out.items():
            tiles[method] = render.method_tiles(maps, picture)
            legend, swatches = None, None
            if maps.dim() == 4:
                legend, swatches = self._concept_legend(out, maps.shape[1], picture.device)
            grid = render.method_grid(tiles[method], captions, ncol, legend, swatches)
            self._emit(f"saliency/{method}", grid, step)
        self._emit("saliency/overview", render.overview(picture, tiles, captions), step)
        if self.timeline_method in tiles:
            small = render.resize(tiles[self.timeline_method], (64, 64))
            self._timeline.append(render.to_uint8(small).cpu())
            self._timeline_labels.append(f"ep {epoch}")
            if len(self._timeline) > 32:  # keep memory flat: thin out the older half
                self._timeline = self._timeline[:16:2] + self._timeline[16:]
                self._timeline_labels = self._timeline_labels[:16:2] + self._timeline_labels[16:]
            if len(self._timeline) % 5 == 1:  # the full picture is logged at the end of fit
                self._emit(
                    "saliency/timeline",
                    render.timeline(self._timeline, self._timeline_labels),
                    step,
                )
        for sink in self._sinks:
            sink.text("saliency/captions", "  \n".join(captions), step)

    def _tile_shape(self, images: Tensor) -> tuple[int, int]:
        """Tiles at most ``tile_size``; small inputs are enlarged by a whole factor (crisp
        pixels, and PNGs that compress well), large ones shrunk."""
        h, w = images.shape[-2:]
        side = max(h, w)
        scale = max(1, self.tile_size // side) if side <= self.tile_size else self.tile_size / side
        return max(8, round(h * scale)), max(8, round(w * scale))

    def _concept_legend(self, out: Any, k: int, device: torch.device):
        swatches = render.concept_palette(k, device)
        scores = out.extras.get("dff_concept_scores")
        texts = []
        for c in range(k):
            if scores is None:
                texts.append(f"concept {c}")
                continue
            top = scores[c].softmax(0).topk(min(2, scores.shape[1]))
            names = ", ".join(
                f"{self._class_name(int(i))[:8]} {float(p):.0%}"
                for p, i in zip(top.values.tolist(), top.indices.tolist())
            )
            texts.append(f"c{c}: {names}")
        return texts, swatches

    def _emit(self, tag: str, picture: Tensor, step: int) -> None:
        host = render.to_uint8(picture).cpu()  # the only device-to-host copy of a picture
        for sink in self._sinks:
            sink.image(tag, host, step)
