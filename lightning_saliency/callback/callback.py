"""``SaliencyCallback``: Lightning hooks, cadence, failure policy and state; no maths.

Each logged epoch goes one way: the hook explains the fixed samples (:func:`explain`), the
:class:`~lightning_saliency.evaluate.monitor.ScoreMonitor` scores them and keeps the alarm record,
:class:`~lightning_saliency.viz.figures.EpochFigures` draws them (with :mod:`render`), and the
:class:`~lightning_saliency.publish.loggers.Publisher` writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from lightning_saliency import console
from lightning_saliency.callback import arguments
from lightning_saliency.callback.dry_run import dry_run
from lightning_saliency.callback.samples import (
    BatchKeys,
    FixedSamples,
    choose_samples,
    find_class_names,
    find_normalize,
)
from lightning_saliency.callback.sharing import (
    gather_activations,
    gather_explanations,
    merge,
    share_of,
    shareable,
)
from lightning_saliency.callback.watchers import StaleCheckGuard, watching
from lightning_saliency.engine.class_names import class_name
from lightning_saliency.engine.explanations import (
    Explanations,
    explain,
    explanation_context,
    layer_activations,
    normalize_methods,
)
from lightning_saliency.engine.layers import LAYOUTS, Layout, Reshape
from lightning_saliency.engine.methods import DEFAULT_METHODS, METHODS, MethodOptions
from lightning_saliency.engine.methods.session import OutputTransform, TargetFunction
from lightning_saliency.engine.options import resolve_options
from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.evaluate.deletion import FaithfulnessReport, faithfulness
from lightning_saliency.evaluate.monitor import AlarmEvent, EpochScores, ScoreMonitor
from lightning_saliency.evaluate.sanity import SanityReport
from lightning_saliency.evaluate.sanity import sanity_check as randomisation_test
from lightning_saliency.evaluate.scores import pointing_tolerance
from lightning_saliency.evaluate.shortcut_probes import shortcut_scores
from lightning_saliency.publish.publisher import Publisher
from lightning_saliency.viz.figures import EpochFigures, Timeline, first_map_method


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
        target: ``"label"`` (falls back to ``"pred"`` without labels), ``"pred"``, a class, or a
            function ``(outputs) -> (N,)`` score (see :func:`~lightning_saliency.explain`).
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
            :func:`lightning_saliency.evaluate.alarms.default_thresholds`.
        timeline_method: the method shown in the timeline (default: the first map method).
        seed: the sample choice and the noise of noisy methods use private generators from it.
        name: for several callbacks in one Trainer (e.g. Grad-CAM at two layers): each logs
            under ``saliency/<name>/`` and saves its state under its own ``state_key``. Two
            callbacks without distinct names share the ``state_key``, which the Trainer
            refuses; give each a ``name=``.
        per_class: log per-class means under ``saliency_per_class/`` (alarms judge them
            either way).
        grey_background: draw the maps over a greyscale copy of the images (``False``: over
            the images in colour).
        sign: which part of signed maps (IG, SmoothGrad, Guided Grad-CAM, occlusion) the
            pictures show, as captum's ``visualize_image_attr``: ``"all"`` (blue -, red +,
            around zero), ``"positive"``, ``"negative"`` or ``"absolute_value"``; or a dict
            ``{method: sign}``. Scores do not depend on it.
        signed_mass: how the scores count signed maps: ``"positive"`` (the evidence for the
            explained class; default) or ``"absolute"`` (magnitude, both signs).
        sanity_check: run :func:`lightning_saliency.sanity_check` (the cascading
            randomisation test) and :func:`lightning_saliency.faithfulness` once, at the first
            logged run of a fit, on the fixed samples; their tables and figure go to the
            loggers (``saliency/sanity``). It costs about five explanations of the samples,
            once. ``check_sanity()`` runs it on demand.
        sanity_gate: a method that fails the sanity check keeps its pictures and scores, but
            raises no alarm (``False``: it alarms as the others).
        shortcut_probes: score every logged run's maps for shortcuts without masks, by
            asking the model (:func:`lightning_saliency.shortcut_scores`: small-cue reliance,
            attended-content consensus, background reliance). Three extra forwards per sample
            and method; ``False`` leaves them out.
        layout: how to read the target layer's output: ``"auto"``, ``"nchw"``, ``"nhwc"``
            (channels last, e.g. Swin) or ``"tokens"`` (ViTs, any prefix tokens).
        reshape: a function from the layer's output to ``(N, C, h, w)`` for other layouts.
        output_transform: a function from the model's output to ``(N, classes)`` scores, when
            it is not a tensor or has no ``logits`` key or attribute.

    Cadence: every validation run of a ``fit`` counts (several per epoch with
    ``val_check_interval < 1``, one every k epochs with ``check_val_every_n_epoch=k``); runs
    ``0, n, 2n, ...`` are logged, ``n = every_n_epochs``, and a method of
    ``method_every_n_epochs={m: k}`` runs on those logged runs whose count is a multiple of k.
    Between logged runs the last values stay in the metrics, so ``EarlyStopping`` and
    ``ModelCheckpoint`` can watch a saliency key; an ``EarlyStopping`` on one counts logged
    runs only.

    Raises:
        SaliencyConfigError: at construction for a bad argument (unknown method, option or
            score; a value of the wrong type or range; labels, masks or mean/std that do not
            fit the samples); before any training step, by a dry run of every method on two
            samples, for what depends on the model or the data (no logger, non-image batches,
            an unusable target layer, labels or target out of range, mean/std that do not fit
            the channels, outputs that are not finite, a sharded strategy).

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
        target: Literal["label", "pred"] | int | TargetFunction = "label",
        samples: Tensor | None = None,
        labels: Tensor | Sequence[int] | None = None,
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
        name: str | None = None,
        per_class: bool = True,
        grey_background: bool = True,
        sign: str | dict[str, str] = "all",
        signed_mass: Literal["positive", "absolute"] = "positive",
        sanity_check: bool = True,
        sanity_gate: bool = True,
        shortcut_probes: bool = True,
        layout: Layout = "auto",
        reshape: Reshape | None = None,
        output_transform: OutputTransform | None = None,
    ) -> None:
        super().__init__()
        self.methods = normalize_methods(methods)
        self.num_samples = arguments.positive_int("num_samples", num_samples)
        self.every_n_epochs = arguments.positive_int("every_n_epochs", every_n_epochs)
        self.method_every_n_epochs = arguments.method_cadences(
            method_every_n_epochs, self.methods, lambda m: normalize_methods([m])[0]
        )
        if (
            target not in ("label", "pred")
            and not callable(target)
            and not (isinstance(target, int) and not isinstance(target, bool) and target >= 0)
        ):
            raise SaliencyConfigError(
                f"target must be 'label', 'pred', a class index >= 0 or a function from the "
                f"model's output to one score per image, got {target!r}."
            )
        if target_layer is not None and not isinstance(target_layer, (str, nn.Module)):
            raise SaliencyConfigError(
                "target_layer must be a dotted module name ('backbone.layer4'), an nn.Module "
                f"or None, got {target_layer!r}."
            )
        given = arguments.samples_tensor(samples)
        count = None if given is None else given.shape[0]
        self._explicit = (
            given,
            arguments.labels_tensor(labels, count),
            arguments.masks_tensor(masks, given),
        )
        self.mean, self.std = arguments.normalisation(
            mean, std, None if given is None else given.shape[1]
        )
        self._given_normalisation = (self.mean, self.std)
        self.method_options: dict[str, MethodOptions] = resolve_options(
            self.methods,
            method_options,
            {
                "ig_steps": ig_steps,
                "ig_internal_batch_size": ig_internal_batch_size,
                "dff_components": dff_components,
            },
        )
        keys = {"image_key": image_key, "label_key": label_key, "mask_key": mask_key}
        for key, value in keys.items():
            if not isinstance(value, str) or not value:
                raise SaliencyConfigError(f"{key} must be a non-empty string, got {value!r}.")
        self.target_layer = target_layer
        self.target = target
        self.keys = BatchKeys(image_key, label_key, mask_key)
        self.dataloader_idx = arguments.positive_int("dataloader_idx", dataloader_idx, minimum=0)
        self.denormalize = arguments.one_of("denormalize", denormalize, (None, True, False))
        self.class_names = arguments.class_names_list(class_names)
        self._given_class_names = self.class_names
        self.tile_size = arguments.positive_int("tile_size", tile_size, minimum=16)
        if timeline_method is not None:
            chosen = normalize_methods([timeline_method])[0]
            if chosen not in self.methods or METHODS[chosen].kind != "map":
                maps = [m for m in self.methods if METHODS[m].kind == "map"]
                raise SaliencyConfigError(
                    f"timeline_method={timeline_method!r} must be one of the map methods in "
                    f"methods: {maps}."
                )
            self.timeline_method: str | None = chosen
        else:
            self.timeline_method = first_map_method(self.methods)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SaliencyConfigError(f"seed must be an int, got {seed!r}.")
        self.seed = seed
        self.layout = arguments.one_of("layout", layout, LAYOUTS)
        for key, function in (("reshape", reshape), ("output_transform", output_transform)):
            if function is not None and not callable(function):
                raise SaliencyConfigError(f"{key} must be a function or None, got {function!r}.")
        self.reshape = reshape
        self.output_transform = output_transform
        self.name = arguments.callback_name(name)
        self.prefix = "saliency" if self.name is None else f"saliency/{self.name}"
        self._thresholds = thresholds
        self.per_class = arguments.one_of("per_class", per_class, (True, False))
        self.grey_background = arguments.one_of("grey_background", grey_background, (True, False))
        self.sign = arguments.display_sign(
            sign,
            self.methods,
            [m for m, spec in METHODS.items() if spec.sign == "signed"],
            lambda m: normalize_methods([m])[0],
        )
        self.signed_mass = arguments.one_of("signed_mass", signed_mass, ("positive", "absolute"))
        self.sanity_check = arguments.one_of("sanity_check", sanity_check, (True, False))
        self.sanity_gate = arguments.one_of("sanity_gate", sanity_gate, (True, False))
        self.shortcut_probes = arguments.one_of("shortcut_probes", shortcut_probes, (True, False))
        self.sanity: SanityReport | None = None  # the last sanity check's report
        self.faithfulness: FaithfulnessReport | None = None
        self.explanations: Explanations | None = None  # the last logged run's, all samples
        self._sanity_checked = False  # this fit's check ran (a resumed fit does not rerun it)
        self.monitor = self._new_monitor()
        self.alarm_prefix = self.monitor.alarm_prefix
        self.timeline = Timeline()
        self.timeline_path: str | None = None
        self._samples: FixedSamples | None = None
        self._layer_name: str | None = None
        self._switched_off: dict[str, str] = {}
        self._warm_start: dict[str, dict[str, Any]] = {}
        self._validations = 0  # validation runs of this fit seen so far (the cadence's count)
        self._last_metrics: dict[str, float] = {}  # kept in the metrics between logged runs
        self._warned: set[str] = set()
        self._news: list[str] = []  # this run's lines for the alarm text
        self._guard: StaleCheckGuard | None = None
        self._publisher: Publisher | None = None
        self._enabled = True
        self._in_run = False  # between setup and teardown (or on_exception)
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
        """``SaliencyCallback``, or with ``name=``, ``SaliencyCallback{'name': ...}``: the
        methods are not part of it, so a run resumed with other methods keeps what applies."""
        if self.name is None:
            return type(self).__qualname__
        return self._generate_state_key(name=self.name)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The chosen samples, the drift references, the alarm record and history, the
        timeline, the cadence's count: a resumed run continues the same story. Plain tensors,
        lists and dicts only (``torch.load(weights_only=True)`` loads it)."""
        return {
            "version": STATE_VERSION,
            "methods": list(self.methods),
            "samples": None if self._samples is None else self._samples.state(),
            "layer_name": self._layer_name,
            "monitor": self.monitor.state_dict(),
            "timeline": self.timeline.state_dict(),
            "timeline_method": self.timeline_method,
            "warm_start": {k: dict(v) for k, v in self._warm_start.items()},
            "validations": self._validations,
            "last_metrics": dict(self._last_metrics),
            "sanity_checked": self._sanity_checked,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a saved state; what no longer applies (methods not chosen now, another
        timeline method, another target layer) is dropped, and said once."""
        state = state_dict
        if state.get("samples") is not None and self._explicit[0] is None:
            self._samples = FixedSamples.from_state(state["samples"])
        saved_methods = list(state.get("methods") or _methods_in(state))
        dropped = [m for m in saved_methods if m not in self.methods]
        layer = state.get("layer_name")
        new_layer = isinstance(self.target_layer, str) and layer and self.target_layer != layer
        stale = set(dropped)
        if new_layer:
            stale |= {m for m in saved_methods if m in METHODS and METHODS[m].needs_layer}
        else:
            self._layer_name = layer
        self.monitor.load_state_dict(state.get("monitor", state), drop=stale)
        timeline = state.get("timeline", {})
        if isinstance(timeline, list):  # 0.1.0: the columns and their labels side by side
            timeline = {"columns": timeline, "labels": state.get("timeline_labels", [])}
        saved_timeline = state.get("timeline_method", self.timeline_method)
        if saved_timeline == self.timeline_method and saved_timeline not in stale:
            self.timeline.load_state_dict(timeline)
        elif timeline.get("columns"):
            stale.add(f"the timeline of {saved_timeline}")
        self._warm_start = {
            k: dict(v) for k, v in state.get("warm_start", {}).items() if k in self.methods
        }
        self._validations = int(state.get("validations", len(self.monitor.history)))
        self._last_metrics = {
            k: float(v)
            for k, v in state.get("last_metrics", {}).items()
            if _method_of(k, self.prefix) not in stale
        }
        self._sanity_checked = bool(state.get("sanity_checked", False))
        if stale:
            why = "another target_layer" if new_layer else "methods or timeline_method changed"
            console.warn(
                f"SaliencyCallback: resumed; dropped the saved state of {', '.join(sorted(stale))} "
                f"({why}); kept the samples and the rest."
            )

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Checkpoints of 0.1 saved this callback's state under a key holding its methods and
        seed; Lightning looks for the new key only, so a legacy state is loaded here."""
        states = checkpoint.get("callbacks", {})
        if self.state_key in states or self.name is not None:
            return
        legacy = [v for k, v in states.items() if k.startswith("SaliencyCallback{'methods'")]
        if len(legacy) == 1:
            self.load_state_dict(legacy[0])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_publisher"] = None  # loggers hold file handles; re-created at setup
        state["_guard"] = None
        return state

    def _fresh_state(self) -> None:
        """A new ``fit``: new samples (unless given), references, alarms, timeline and count.
        A resumed fit loads its saved state right after this."""
        self._samples = None
        self._layer_name = None
        self.mean, self.std = self._given_normalisation
        self.class_names = self._given_class_names
        self.monitor = self._new_monitor()
        self.timeline = Timeline()
        self.timeline_path = None
        self._switched_off = {}
        self._warm_start = {}
        self._validations = 0
        self._last_metrics = {}
        self._warned = set()
        self.sanity = None
        self.faithfulness = None
        self.explanations = None
        self._sanity_checked = False

    # -- setup ---------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check what can be checked before the model is placed.

        Raises:
            SaliencyConfigError: no logger, FSDP1 or DeepSpeed (FSDP2 and DDP are supported).
        """
        self._enabled = stage in ("fit", "validate")
        self._in_run = True
        if not self._enabled:
            return  # test() and predict() get no saliency, and need no logger for it
        if getattr(trainer, "fast_dev_run", False):
            self._enabled = False
            console.info("SaliencyCallback: fast_dev_run is on, so no saliency is computed.")
            return
        if not trainer.loggers:
            raise SaliencyConfigError(
                "SaliencyCallback needs a logger to write images to; pass "
                "Trainer(logger=TensorBoardLogger('logs')) (or CSVLogger for PNG files)."
            )
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy:  # FSDP1; FSDP2 is ModelParallelStrategy with fully_shard
            raise SaliencyConfigError(
                f"SaliencyCallback does not support {strategy} (FSDP1): Lightning runs it on GPUs "
                "only, where this project cannot test it. Shard with FSDP2 instead: "
                "strategy=ModelParallelStrategy() and fully_shard() in configure_model(), which "
                "the callback supports (all ranks explain together); or use strategy='ddp'."
            )
        if "DeepSpeed" in strategy:
            raise SaliencyConfigError(
                f"SaliencyCallback does not support {strategy}: DeepSpeed runs the model inside "
                "its own engine, where the callback cannot take input gradients with the "
                "parameters frozen. Use FSDP2 (strategy=ModelParallelStrategy() and fully_shard() "
                "in configure_model()) or strategy='ddp'."
            )
        if self._publisher is not None:
            self._publisher.close()
        self._publisher = Publisher(trainer.loggers, background=True)
        if stage == "fit":
            self._fresh_state()
            has_val = is_overridden("validation_step", pl_module)
            self._explain_at_train_epoch_end = not has_val or trainer.limit_val_batches == 0
            if self._explain_at_train_epoch_end:
                why = "no validation_step" if not has_val else "limit_val_batches=0"
                console.warn(
                    f"SaliencyCallback: {why}, so saliency is computed at the end of training "
                    "epochs instead, on samples from the training set (or samples=...)."
                )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Choose the samples and dry-run every method on two of them, before any training
        step, on every rank.

        Raises:
            SaliencyConfigError: what the dry run finds (:mod:`.dry_run`),
                non-image batches, or no loader to take samples from.
        """
        if not self._enabled:
            return
        self._prepare(trainer, pl_module, "fit")
        watchers = watching(trainer.callbacks, self.prefix)  # type: ignore[attr-defined]
        if watchers and self._enabled:
            self._guard = StaleCheckGuard(watchers)
            trainer.callbacks.append(self._guard)  # type: ignore[attr-defined]

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Under ``trainer.validate()``: the same checks as :meth:`on_fit_start` (after a
        ``fit``, the same samples are explained again).

        Raises:
            SaliencyConfigError: as :meth:`on_fit_start`.
        """
        if self._enabled and self._samples is None and not trainer.sanity_checking:
            self._prepare(trainer, pl_module, "validate")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the timeline as ``saliency_timeline.png`` beside the logs (independent of
        TensorBoard's ``--samples_per_plugin``). TensorBoard already has it: each logged run
        logs the timeline so far at that run's step, like the other pictures."""
        self._drop_guard(trainer)
        if not (self._enabled and trainer.is_global_zero and len(self.timeline)):
            self._flush()
            return
        if self._publisher is None:  # a callback unpickled after setup has no loggers
            return
        try:
            picture = self.timeline.picture()
            suffix = "" if self.name is None else f"_{self.name}"
            filename = f"saliency_timeline{suffix}.png"
            self.timeline_path = self._publisher.save_png(picture, filename)
        except Exception as err:  # a monitor never kills a run, at its end neither
            self._warn_once("timeline", "writing the timeline", err, "the run is done")
        self._flush()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """The end of ``fit``, ``validate`` or ``test``: every picture is written before
        Lightning closes the loggers; the writer's thread stops (a later run starts one)."""
        self._drop_guard(trainer)
        self._end_run()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Training failed: write what was queued before Lightning closes the loggers, and
        stop the writer (Lightning calls no ``teardown`` after an exception)."""
        self._end_run()

    def _end_run(self) -> None:
        """The run is over: every queued picture written, the writer's thread stopped and
        TensorBoard's own event checksum put back (:meth:`Publisher.close`)."""
        self._in_run = False
        self._flush()
        if self._publisher is not None:
            self._publisher.close()

    def flush(self) -> None:
        """Wait until every picture and text queued so far has reached the loggers (the
        callback does so itself at the end of ``fit``, ``validate`` and ``test``, and on an
        exception); a logger that failed is said once."""
        self._flush()

    def _flush(self) -> None:
        """Wait for the background writer; a logger that failed in it is said once."""
        if self._publisher is None:
            return
        try:
            for err in self._publisher.flush():
                self._warn_once("writer", "writing a picture", err, "training goes on")
        finally:
            self._say_failures()

    def _say_failures(self) -> None:
        """Each logger that failed in the writer: said once, and in the next alarm text."""
        if self._publisher is None:
            return
        for name, err in self._publisher.failures():
            consequence = f"{name} gets no more saliency pictures; training goes on"
            self._warn_once(f"logger {name}", f"writing to {name}", err, consequence)
            self._news.append(
                f"writing to {name} failed ({_describe(err)}): it gets no more pictures"
            )

    def _drop_guard(self, trainer: L.Trainer) -> None:
        if self._guard is not None and self._guard in trainer.callbacks:  # type: ignore[attr-defined]
            trainer.callbacks.remove(self._guard)  # type: ignore[attr-defined]
        self._guard = None

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
            console.warn("SaliencyCallback: the val set yields no images; nothing to explain.")
            self._enabled = False
            return
        if len(self._samples) < self.num_samples and self._explicit[0] is None:
            console.warn(
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
        samples = self._samples.to(pl_module.device)
        self._layer_name = dry_run(
            pl_module,
            samples.images,
            samples.labels,
            self.target,
            [m for m in self.methods if m not in self._switched_off],
            self.target_layer or self._layer_name,  # a resumed run keeps its layer
            self.method_options,
            self.mean if self.denormalize is not False else None,
            self.std if self.denormalize is not False else None,
            self.seed,
            samples.masks,
            layout=self.layout,
            reshape=self.reshape,
            output_transform=self.output_transform,
        )
        if self._layer_name:
            console.info(f"SaliencyCallback: explaining layer '{self._layer_name}'.")

    # -- cadence -------------------------------------------------------------------------------
    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every validation run of a ``fit`` counts; runs ``0, n, 2n, ...`` are logged
        (``n = every_n_epochs``), so the cadence meets ``check_val_every_n_epoch`` and
        ``val_check_interval < 1`` (several runs per epoch) alike. ``trainer.validate()``
        always logs."""
        if not self._enabled or trainer.sanity_checking or self._explain_at_train_epoch_end:
            return
        if trainer.state.fn != "fit":
            self._explain_and_log(trainer, pl_module, None)
            return
        self._tick(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and self._explain_at_train_epoch_end:
            self._tick(trainer, pl_module)

    def _tick(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        index = self._validations
        self._validations += 1
        if index % self.every_n_epochs == 0:
            self._explain_and_log(trainer, pl_module, index)
        else:
            self._keep_metrics(trainer, pl_module, set())

    def _new_monitor(self) -> ScoreMonitor:
        return ScoreMonitor(
            self._thresholds, self.class_names, self.prefix, self.per_class, self.signed_mass
        )

    def _due(self, method: str, index: int | None) -> bool:
        every = self.method_every_n_epochs.get(method, 1)
        return method not in self._switched_off and (index is None or index % every == 0)

    def _label(self, trainer: L.Trainer) -> tuple[str, float]:
        """The timeline's column label and position: ``ep 3`` for the validation at the end of
        epoch 3, ``ep 3 50%`` for one halfway through it (``val_check_interval < 1``)."""
        epoch = trainer.current_epoch
        batches = trainer.num_training_batches
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if trainer.state.fn == "fit" and isinstance(batches, int) and 0 < done < batches:
            return f"ep {epoch} {done / batches:.0%}", epoch - 1 + done / batches
        return f"ep {epoch}", float(epoch)

    def _keep_metrics(
        self, trainer: L.Trainer, pl_module: L.LightningModule, fresh: set[str]
    ) -> None:
        """Log the last value of every key not logged fresh this run, so each key stays present
        and finite at every validation; an EarlyStopping that watches one does not count it."""
        stale = {k: v for k, v in self._last_metrics.items() if k not in fresh}
        if not stale:
            return
        if self._guard is not None:
            self._guard.hold(trainer, set(stale))
        self._log_metrics(pl_module, stale)

    def _log_metrics(self, pl_module: L.LightningModule, metrics: dict[str, float]) -> None:
        # Every rank computes the same values; sync_dist=True says so to Lightning (a mean of
        # equal numbers) and keeps callback_metrics equal on all ranks.
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    # -- one logged run: explain -> monitor -> figures -> loggers --------------------------------
    def _explain_and_log(
        self, trainer: L.Trainer, pl_module: L.LightningModule, index: int | None
    ) -> None:
        """Everything of one logged run sits inside the failure policy: a failing method is
        switched off (on every rank alike) and the others go on; a failing step of the
        bookkeeping warns once and the run goes on. Whatever happened, the run's alarm text
        (events, methods switched off, the alarms raised now) is written."""
        self._say_failures()  # the writer's failures since the last run join this run's text
        events: list[AlarmEvent] = []
        ran = False
        try:
            ran, events = self._logged_run(trainer, pl_module, index)
        finally:
            if ran or self._news:
                self._write_alarm_text(trainer, events)

    def _logged_run(
        self, trainer: L.Trainer, pl_module: L.LightningModule, index: int | None
    ) -> tuple[bool, list[AlarmEvent]]:
        if self._samples is None:
            return False, []
        epoch = trainer.current_epoch
        active = [m for m in self.methods if self._due(m, index)]
        if not active:
            self._keep_metrics(trainer, pl_module, set())
            return False, []
        fitting = trainer.state.fn == "fit"
        try:
            samples = self._samples.to(pl_module.device)
        except Exception as err:
            self._warn_once("transfer", "moving the samples", err, "this run is skipped")
            return False, []
        out, errors = self._explain_shared(trainer, pl_module, samples, active)
        self._agree_and_switch_off(trainer, active, errors, pl_module)
        self.explanations = out
        if out is None or not len(out):
            self._keep_metrics(trainer, pl_module, set())
            return True, []
        if not bool(torch.isfinite(out.logits).all()):
            self._nonfinite(trainer, pl_module, epoch)
            return True, []
        if self.sanity_check and fitting and not self._sanity_checked:
            self._sanity_checked = True
            self._check_sanity(trainer, pl_module, samples, out)
        tolerance = pointing_tolerance(
            (samples.images.shape[-2], samples.images.shape[-1]), out.layer_cells
        )
        probes = self._probe_shortcuts(pl_module, samples, out) if self.shortcut_probes else {}
        try:
            report = self.monitor.observe(
                epoch,
                out,
                samples.labels,
                samples.masks,
                tolerance,
                update_references=fitting,
                extra_scores=probes,
            )
        except Exception as err:
            self._warn_once("scores", "scoring", err, "no scores this run")
            return True, []
        self._agree_and_switch_off(trainer, list(out), dict(report.errors), pl_module)
        metrics = {  # all ranks agreed on what is off: they log the same keys
            k: v for k, v in report.metrics.items() if self._method_of(k) not in self._switched_off
        }
        metrics.update({f"{self.alarm_prefix}/switched_off/{m}": 1.0 for m in self._switched_off})
        details = {k: v for k, v in metrics.items() if self._chart_only(k)}
        watched = {k: v for k, v in metrics.items() if k not in details}
        self._log_metrics(pl_module, watched)  # EarlyStopping and checkpoints may watch these
        self._keep_metrics(trainer, pl_module, set(watched))
        self._last_metrics.update(watched)
        if trainer.is_global_zero and self._publisher is not None:
            self._publisher.metrics(details, metrics_step(trainer))  # charts: no self.log cost
        for event in report.events:
            if event.state == "cleared":
                console.info(event.message())
            else:
                console.warn(event.message())
        if trainer.is_global_zero and self._publisher is not None:
            self._publish(trainer, samples, out, epoch)
        return True, report.events

    def _probe_shortcuts(
        self, pl_module: L.LightningModule, samples: FixedSamples, out: Explanations
    ) -> dict[str, dict[str, Tensor]]:
        """The mask-free shortcut scores of this run's maps; a failure warns once and the run
        goes on without them. Class scores from a target function have no probabilities to
        probe: nothing is probed then."""
        if callable(self.target) or out.logits.dim() != 2 or out.logits.shape[1] < 2:
            return {}
        maps = {m: v for m, v in out.items() if METHODS[m].kind == "map"}
        if not maps:
            return {}
        labels = samples.labels
        correct = None if labels is None else out.logits.argmax(1) == labels.to(out.logits.device)
        try:
            return shortcut_scores(
                pl_module,
                samples.images,
                maps,
                out.targets,
                labels,
                correct,
                signed_mass=self.signed_mass,
                output_transform=self.output_transform,
            )
        except Exception as err:
            self._warn_once(
                "probes", "the shortcut probes", err, "no mask-free shortcut scores this run"
            )
            return {}

    def check_sanity(self, trainer: L.Trainer, pl_module: L.LightningModule) -> SanityReport | None:
        """Run the sanity check and the faithfulness test now, on the fixed samples, log them,
        and gate the alarms by the verdict (``sanity_gate``); returns the sanity report."""
        if self._samples is None:
            raise SaliencyConfigError(
                "check_sanity() needs the fixed samples: call it once the fit has started "
                "(from a hook at or after on_validation_start)."
            )
        samples = self._samples.to(pl_module.device)
        self._check_sanity(trainer, pl_module, samples, None)
        if not self._in_run:  # after the fit: written before it returns
            self._end_run()
        return self.sanity

    def _check_sanity(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        samples: FixedSamples,
        out: Explanations | None,
    ) -> None:
        """The sanity check and faithfulness on this run's maps; a failure warns once and
        leaves the alarms ungated. Every rank runs it (the same samples and weights give the
        same verdict); rank zero logs it."""
        methods = [m for m in self.methods if METHODS[m].kind == "map" and self._due(m, None)]
        if out is not None:
            methods = [m for m in methods if m in out.maps]
        if not methods:
            return
        try:
            if out is None:  # on demand: the maps of now, explained once for both tests
                out, errors = self._explain(pl_module, samples, methods)
                if out is None:
                    raise next(iter(errors.values()))
            report = randomisation_test(
                pl_module,
                samples.images,
                self._targets(samples),
                methods,
                self.target_layer or self._layer_name,
                noise_seed=self.seed,
                original=out,
                method_options={m: self.method_options[m] for m in methods},
                layout=self.layout,
                reshape=self.reshape,
                output_transform=self.output_transform,
            )
            faith = faithfulness(
                pl_module,
                samples.images,
                {m: out[m] for m in report.methods},
                out.targets,
                steps=FAITHFULNESS_STEPS,
                random_maps=FAITHFULNESS_RANDOM_MAPS,
                signed_mass=self.signed_mass,
                seed=self.seed,
                output_transform=self.output_transform,
            )
        except Exception as err:
            self._warn_once("sanity", "the sanity check", err, "alarms are not gated by it")
            return
        self.sanity, self.faithfulness = report, faith
        if self.sanity_gate:
            self.monitor.set_insensitive(report.failed)
        for method in report.failed:
            rho = report.similarity(method)
            consequence = (
                "its pictures and scores stay, its alarms are left out"
                if self.sanity_gate
                else "it still raises alarms (sanity_gate=False)"
            )
            self._news.append(
                f"{method} is not model-sensitive: with the network randomised from the head "
                f"down its maps stay at Spearman {rho:.2f} of the trained model's (pass: < "
                f"{report.threshold}); {consequence}."
            )
        if trainer.is_global_zero and self._publisher is not None:
            step = metrics_step(trainer)
            text = (
                "**Sanity check** (cascading model-parameter randomisation, Adebayo et al. "
                "2018): Spearman of each method's maps with the trained model's as the network "
                "is randomised from the head down. Lower is better; a method at or above "
                f"{report.threshold} shows the input more than the model.\n\n"
                + report.table()
                + "\n\n**Faithfulness** (deletion and insertion, Petsiuk et al. 2018)\n\n"
                + faith.table()
            )
            try:
                self._publisher.text(f"{self.prefix}/sanity", text, step)
                self._publisher.drawn(f"{self.prefix}/sanity", report.picture, step)
            except Exception as err:
                self._warn_once("loggers", "writing to the loggers", err, "training goes on")

    def _chart_only(self, key: str) -> bool:
        """Keys that go to the loggers' charts only, not through ``self.log``: per-class
        means and each alarm's state (``self.log`` costs about a millisecond a key; what a
        rule may watch, the scores and ``saliency_alarms/count``, stays in
        ``callback_metrics``)."""
        if key.startswith(self.monitor.per_class_prefix + "/"):
            return True
        alarm = self.alarm_prefix + "/"
        rest = key[len(alarm) :] if key.startswith(alarm) else None
        return rest is not None and rest != "count" and not rest.startswith("switched_off/")

    def _method_of(self, tag: str) -> str | None:
        """The method a logged tag belongs to (under any of the callback's prefixes)."""
        for prefix in (self.prefix, self.alarm_prefix, self.monitor.per_class_prefix):
            method = _method_of(tag, prefix)
            if method is not None:
                return method
        return None

    def _write_alarm_text(self, trainer: L.Trainer, events: Sequence[AlarmEvent]) -> None:
        """The run's alarm text (TensorBoard text, W&B and MLflow text, ``alarms.txt``)."""
        if not (trainer.is_global_zero and self._publisher is not None):
            return
        lines = [f"- {e.message()}" for e in events] + [f"- {n}" for n in self._news]
        raised = ", ".join(f"{m} {s}" for m, s in self.monitor.raised) or "none"
        lines.append(f"- raised now: {raised}")
        if self._switched_off:
            lines.append(f"- switched off: {', '.join(self._switched_off)}")
        self._news = []
        step = metrics_step(trainer)
        text = f"**epoch {trainer.current_epoch}**  \n" + "  \n".join(lines)
        try:
            self._publisher.text(f"{self.alarm_prefix}/alarms", text, step)
        except Exception as err:
            self._warn_once("loggers", "writing to the loggers", err, "training goes on")

    def _explain(
        self, pl_module: L.LightningModule, samples: FixedSamples, active: Sequence[str]
    ) -> tuple[Explanations | None, dict[str, BaseException]]:
        """Explain ``active`` together; if the pass as a whole fails, each method alone, so
        that only the methods that fail by themselves are switched off."""

        def run(methods: Sequence[str]) -> Explanations:
            return explain(
                pl_module,
                samples.images,
                self._targets(samples),
                methods,
                self.target_layer or self._layer_name,
                on_error="collect",
                method_options={m: self.method_options[m] for m in methods},
                seed=self.seed,
                warm_start=self._warm_start,
                layout=self.layout,
                reshape=self.reshape,
                output_transform=self.output_transform,
            )

        try:
            out = run(active)
            return out, dict(out.errors)
        except Exception as whole:
            if len(active) == 1:
                return None, {active[0]: whole}
        kept: Explanations | None = None
        errors: dict[str, BaseException] = {}
        for method in active:
            try:
                alone = run([method])
            except Exception as err:
                errors[method] = err
                continue
            errors.update(alone.errors)
            kept = merge(kept, alone)
        return kept, errors

    def _explain_shared(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        samples: FixedSamples,
        active: Sequence[str],
    ) -> tuple[Explanations | None, dict[str, BaseException]]:
        """Under DDP, each rank explains its share of the samples (``samples[rank::world]``)
        and the shares are gathered (:mod:`.sharing`): W ranks, 1/W of the
        work each. Methods that factorise all samples jointly (DFF) share the forward and
        factorise the gathered activations on every rank. One process, fewer samples than
        ranks, or another strategy: every rank explains all samples."""
        world, rank = trainer.world_size, trainer.global_rank
        if world == 1 or not isinstance(trainer.strategy, DDPStrategy) or len(samples) < world:
            return self._explain(pl_module, samples, active)
        split, whole = shareable(active)
        mine = samples.subset(share_of(len(samples), rank, world))
        size = (int(samples.images.shape[-2]), int(samples.images.shape[-1]))
        shared: Explanations | None = None
        errors: dict[str, BaseException] = {}
        if split:
            local, local_errors = self._explain(pl_module, mine, split)
            shared, errors = gather_explanations(
                trainer.strategy,
                local,
                local_errors,
                split,
                len(samples),
                rank,
                world,
                size,
                samples.images.device,
            )
        joint = [m for m in whole if METHODS[m].joint is not None] if shared is not None else []
        if joint:
            assert shared is not None
            found = self._explain_joint(trainer, pl_module, samples, mine, size, joint, shared)
            errors.update(found)
        rest: Explanations | None = None
        alone = [m for m in whole if m not in joint]
        if alone:
            rest, rest_errors = self._explain(pl_module, samples, alone)
            errors.update(rest_errors)
        return merge(shared, rest), errors

    def _explain_joint(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        samples: FixedSamples,
        mine: FixedSamples,
        size: tuple[int, int],
        joint: Sequence[str],
        shared: Explanations,
    ) -> dict[str, BaseException]:
        """Methods that factorise all samples jointly (DFF) under DDP: each rank takes its
        share's (``mine``) layer activations, they are gathered, and every rank factorises all
        of them alike; the maps join ``shared``. Returns the failures (the same on every
        rank)."""
        world, rank = trainer.world_size, trainer.global_rank
        local: Tensor | None = None
        failure: BaseException | None = None
        try:
            local, _ = layer_activations(
                pl_module,
                mine.images,
                self.target_layer or self._layer_name,
                layout=self.layout,
                reshape=self.reshape,
                output_transform=self.output_transform,
            )
        except Exception as err:
            failure = err
        everything = gather_activations(
            trainer.strategy, local, len(samples), rank, world, samples.images.device
        )
        if everything is None:
            error = failure or RuntimeError("the layer's activations failed on another rank")
            return {m: error for m in joint}
        errors: dict[str, BaseException] = {}
        for method in joint:
            compute = METHODS[method].joint
            assert compute is not None
            try:
                options = resolve_options([method], {method: self.method_options[method]})
                with explanation_context(pl_module):
                    maps, extras = compute(
                        everything,
                        pl_module,
                        size,
                        options[method],
                        self._warm_start.setdefault(method, {}),
                    )
            except Exception as err:  # the same inputs on every rank: the same outcome
                errors[method] = err
                continue
            shared.maps[method] = maps.detach().float()
            shared.extras.update(extras)
        return errors

    def _agree_and_switch_off(
        self,
        trainer: L.Trainer,
        active: Sequence[str],
        errors: dict[str, BaseException],
        pl_module: L.LightningModule,
    ) -> None:
        """A method that failed on any rank is switched off on every rank, so all ranks keep
        logging the same keys (their metrics are synced)."""
        for method in active:
            failed = method in errors
            if trainer.world_size > 1:
                failed = trainer.strategy.reduce_boolean_decision(failed, all=False)
            if failed:
                error = errors.get(method, RuntimeError("failed on another rank"))
                self._switch_off(method, error, trainer)

    def _nonfinite(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        message = (
            f"SaliencyCallback: the model's outputs on the fixed samples are not finite at "
            f"epoch {epoch} (training diverged?); no maps or scores this run."
        )
        self._say_once("nonfinite", message)
        metrics = {f"{self.alarm_prefix}/nonfinite_outputs": 1.0}
        self._log_metrics(pl_module, metrics)
        self._keep_metrics(trainer, pl_module, set())
        self._announce(trainer, message)

    def _publish(
        self,
        trainer: L.Trainer,
        samples: FixedSamples,
        out: Explanations,
        epoch: int,
    ) -> None:
        """Pictures and text to the loggers (rank zero): a method whose pictures fail is
        switched off; a logger that fails warns once."""
        assert self._publisher is not None
        try:
            figures = EpochFigures(
                samples.images,
                out,
                samples.labels,
                self.class_names,
                self.mean if self.denormalize is not False else None,
                self.std if self.denormalize is not False else None,
                self.tile_size,
                grey=self.grey_background,
                sign=self.sign,
            )
        except Exception as err:
            self._warn_once("figures", "drawing", err, "no pictures this run")
            return
        for method, error in figures.errors.items():
            self._switch_off(method, error, trainer, agreed=True)
        pictures = {f"{self.prefix}/{m}": grid for m, grid in figures.grids().items()}
        if figures.tiles:
            pictures[f"{self.prefix}/overview"] = figures.overview()
        if self.timeline_method in figures.tiles:
            labels = samples.labels.tolist() if samples.labels is not None else None
            self.timeline.rows = [
                f"#{i}" + ("" if labels is None else f"\n{class_name(self.class_names, labels[i])}")
                for i in range(len(samples))
            ]
            label, position = self._label(trainer)
            self.timeline.add(figures.tiles[self.timeline_method], epoch, label, position)
            pictures[f"{self.prefix}/timeline"] = self.timeline.picture()  # at most 32 columns
        step = metrics_step(trainer)
        try:
            self._publisher.images(pictures, step)
            self._publisher.text(f"{self.prefix}/captions", "  \n".join(figures.texts), step)
            self._thresholds_and_layout(list(out), step)
        except Exception as err:
            self._warn_once("loggers", "writing to the loggers", err, "training goes on")

    def _targets(self, samples: FixedSamples) -> Tensor | int | TargetFunction | None:
        if callable(self.target):
            return self.target
        if self.target == "label" and samples.labels is not None:
            return samples.labels
        return self.target if isinstance(self.target, int) else None

    def _switch_off(
        self, method: str, err: BaseException, trainer: L.Trainer, agreed: bool = False
    ) -> None:
        """The failure policy: said once on the ``lightning_saliency`` logger and in
        TensorBoard; the method is skipped from now on, the others and training go on."""
        if method in self._switched_off:
            return
        self._switched_off[method] = repr(err)
        message = (
            f"SaliencyCallback: {method} failed and is switched off from now on "
            f"({_describe(err)}); the other methods and training go on."
        )
        console.warn(message)
        self._announce(trainer, message)

    def _announce(self, trainer: L.Trainer, message: str) -> None:
        """A line for this run's alarm text, for people who only look at TensorBoard."""
        self._news.append(message.removeprefix("SaliencyCallback: "))

    def _thresholds_and_layout(self, methods: Sequence[str], step: int) -> None:
        """Each alarm's threshold beside its score, grouped in a custom-scalars layout."""
        assert self._publisher is not None
        charts: dict[str, list[str]] = {}
        values: dict[str, float] = {}
        for method in methods:
            if METHODS[method].kind != "map":
                continue
            for score, threshold in self.monitor.thresholds.items():
                tag = f"{self.prefix}/{method}/{score}"
                if tag not in self._last_metrics:
                    continue
                line = f"{self.alarm_prefix}/{method}/{score}/threshold"
                values[line] = threshold
                charts[f"{method} {score}"] = [tag, line]
        if values:
            self._publisher.scalars(values, step)
            self._publisher.layout({self.prefix: charts})

    def _warn_once(self, key: str, step: str, err: BaseException, consequence: str) -> None:
        """A failing step of the bookkeeping: said once per kind, then quiet."""
        message = f"SaliencyCallback: {step} failed ({_describe(err)}); {consequence}."
        self._say_once(key, message)

    def _say_once(self, key: str, message: str) -> None:
        """A warning said once per kind (``key``) in a fit, then quiet."""
        if key not in self._warned:
            self._warned.add(key)
            console.warn(message)


def metrics_step(trainer: Any) -> int:
    """The step Lightning logs validation metrics at, so pictures line up with them.

    Lightning has no public name for it: ``trainer.global_step`` counts optimizer steps (it
    differs under manual optimisation with several optimizers), while the logger connector
    logs at the fit loop's count of batches that stepped.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


STATE_VERSION = 2
FAITHFULNESS_STEPS = 8  # the callback's curves: a ninth of the pixels a step, 2 random maps:
FAITHFULNESS_RANDOM_MAPS = 2  # a quarter of faithfulness()'s default forwards, once per fit


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _method_of(tag: str, prefix: str) -> str | None:
    """``saliency/gradcam/consensus`` -> ``gradcam``."""
    if not tag.startswith(prefix + "/"):
        return None
    return tag[len(prefix) + 1 :].split("/", 1)[0]


def _methods_in(state: dict[str, Any]) -> list[str]:
    """Methods a saved state has references for (states before ``methods`` was saved)."""
    monitor = state.get("monitor", state)
    return list(monitor.get("first", {}))
