"""``SaliencyCallback``: Lightning's hooks, the cadence and the state; no maths.

Each hook hands its work down and never does it itself: ``setup`` and ``on_fit_start`` to the
pre-flight (:mod:`.preflight`: refusals, the samples, the dry run), each logged validation run
to :class:`~.logged_run.LoggedRun` (explain, score, draw, publish), the state to
:class:`~.record.FitRecord`. The arguments are checked by :class:`~.config.SaliencyConfig`;
what fails mid-run is handled by :class:`~.failures.FailurePolicy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
from torch import Tensor, nn
from typing_extensions import override

from lightning_saliency import console
from lightning_saliency.callback.config import SaliencyConfig
from lightning_saliency.callback.early_stopping import refuse_plain_early_stopping
from lightning_saliency.callback.failures import FailurePolicy
from lightning_saliency.callback.intake import SampleIntake
from lightning_saliency.callback.logged_run import LoggedRun, RunContext
from lightning_saliency.callback.preflight import refuse_unsupported, without_validation
from lightning_saliency.callback.record import FitRecord
from lightning_saliency.callback.samples import FixedSamples
from lightning_saliency.callback.sharing import Sharing
from lightning_saliency.engine.explanations import Explanations
from lightning_saliency.engine.layers import Layout, Reshape
from lightning_saliency.engine.methods import DEFAULT_METHODS, MethodOptions
from lightning_saliency.engine.methods.session import OutputTransform, TargetFunction
from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.evaluate.deletion import FaithfulnessReport
from lightning_saliency.evaluate.monitor import AlarmEvent, EpochScores, ScoreMonitor
from lightning_saliency.evaluate.sanity import SanityReport
from lightning_saliency.publish.publisher import Publisher
from lightning_saliency.viz.figures import Timeline


class SaliencyCallback(L.Callback):
    """Log where the model looks on fixed validation images, every validation epoch.

    Each logged epoch computes the chosen maps on the trainer's device and logs, under
    ``saliency/``: one grid per method, an ``overview`` (a row per sample), a ``timeline`` of a
    method across epochs, and scalars (drift, localisation and shortcut scores, alarms).
    Training is left bit-identical: no parameter gradients, no leftover hooks, RNG isolated.

    Args:
        methods: maps to compute; see :func:`lightning_saliency.available_methods`.
        num_samples: how many fixed validation images (sub-class scores: 16 per class).
        every_n_epochs: cadence of logged epochs.
        method_every_n_epochs: a slower cadence for expensive methods, e.g.
            ``{"integrated_gradients": 5}``.
        target_layer: dotted module path (``"backbone.layer4"``); ``None`` auto-detects.
        target: ``"label"`` (falls back to ``"pred"`` without labels), ``"pred"``, a class, or a
            function ``(outputs) -> (N,)`` score (see :func:`~lightning_saliency.explain`).
        samples: explicit images ``N×C×H×W`` instead of sampling the val set.
        labels: labels of explicit ``samples``.
        masks: object masks ``N×H×W`` of explicit ``samples`` (enable localisation scores).
        image_key: the images' key in dict batches.
        label_key: the labels' key.
        mask_key: the object masks' key.
        dataloader_idx: which val dataloader to sample from when there are several.
        ig_steps: integration steps, or ``"auto"`` (fewest steps with <= 1 % completeness error).
        ig_internal_batch_size: images per IG pass (bounds memory); ``None``: the memory of 16
            images at 224 px.
        dff_components: concepts for deep feature factorization.
        method_options: any method's options, ``{"smoothgrad": {"samples": 16}}``; see
            :func:`lightning_saliency.available_options`.
        denormalize: undo the input normalisation for display (auto-detected ``Normalize``).
        mean: the normalisation's mean, to undo when it cannot be detected.
        std: its standard deviation.
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
            logged run of a fit, on the fixed samples (``saliency/sanity``; about five
            explanations, once). ``check_sanity()`` runs it on demand.
        sanity_gate: a method that fails the sanity check keeps its pictures and scores, but
            raises no alarm (``False``: it alarms as the others).
        shortcut_probes: score every logged run's maps for shortcuts without masks, by
            asking the model (:func:`lightning_saliency.shortcut_scores`); ``False``: none.
        layout: how to read the target layer's output: ``"auto"``, ``"nchw"``, ``"nhwc"``
            (channels last, e.g. Swin) or ``"tokens"`` (ViTs, any prefix tokens).
        reshape: a function from the layer's output to ``(N, C, h, w)`` for other layouts.
        output_transform: a function from the model's output to ``(N, classes)`` scores, when
            it is not a tensor or has no ``logits`` key or attribute.

    Cadence: every validation run of a ``fit`` counts (several per epoch with
    ``val_check_interval < 1``, one every k epochs with ``check_val_every_n_epoch=k``); runs
    ``0, n, 2n, ...`` are logged, ``n = every_n_epochs``, and a method of
    ``method_every_n_epochs={m: k}`` runs on those logged runs whose count is a multiple of k.
    Between logged runs the last values stay in the metrics, so
    :class:`~lightning_saliency.SaliencyEarlyStopping` and ``ModelCheckpoint`` can watch a
    saliency key, counting logged runs only (a plain ``EarlyStopping`` on one is refused).

    Raises:
        SaliencyConfigError: at construction for a bad argument (unknown method, option or
            score; a value of the wrong type or range; labels, masks or mean/std that do not
            fit the samples); by a dry run of every method on two samples at the end of
            Lightning's sanity check (before any training step; without one, before the first
            explanation), for what depends on the model or the data (no logger, non-image batches,
            an unusable target layer, labels or target out of range, mean/std that do not fit
            the channels, outputs that are not finite, a sharded strategy).

    Examples:
        >>> from lightning_saliency import SaliencyCallback
        >>> cb = SaliencyCallback(methods=("gradcam", "ig"), num_samples=4, every_n_epochs=2)
        >>> cb.methods, cb.config.every_n_epochs
        (('gradcam', 'integrated_gradients'), 2)
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
        ig_steps: int | Literal["auto"] = "auto",
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
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.config = SaliencyConfig.check(arguments)
        self._new_record()
        self._enabled = True
        self._in_run = False  # between setup and teardown (or on_exception)
        self._at_train_epoch_end = False  # no validation to explain at

    def _new_record(self) -> None:
        """A fit starts a new story: record, failure policy, logged run, sample intake."""
        self._record, self._policy = FitRecord(self.config), FailurePolicy()
        self._run = LoggedRun(self._record, Sharing(), self._policy, None)
        self._intake = SampleIntake(self._record, self._policy)
        self.timeline_path: str | None = None

    # -- the public record ---------------------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        """The methods explained, by their canonical names."""
        return self.config.methods

    @property
    def method_options(self) -> dict[str, MethodOptions]:
        """Each method's typed options."""
        return self.config.method_options

    @property
    def alarms(self) -> list[AlarmEvent]:
        """Every alarm raised, cleared and back again, in order (the same on every rank)."""
        return self._record.monitor.alarms

    @property
    def history(self) -> list[EpochScores]:
        """The scores of each logged epoch (means and per class, per method)."""
        return self._record.monitor.history

    @property
    def monitor(self) -> ScoreMonitor:
        """The score monitor: drift references, the alarm record, the history."""
        return self._record.monitor

    @property
    def timeline(self) -> Timeline:
        """The timeline method's tiles across logged runs."""
        return self._record.timeline

    @property
    def fixed_samples(self) -> FixedSamples | None:
        """The images explained every run, with labels and masks (``None`` until a run ends)."""
        return self._record.samples

    @property
    def layer_name(self) -> str | None:
        """The target layer layer methods explain (``None`` before setup, or if unused)."""
        return self._record.explainer.layer_name

    @property
    def class_names(self) -> list[str] | None:
        """The class names in captions and per-class scores (given, or found at setup)."""
        return self._record.class_names

    @property
    def switched_off(self) -> dict[str, str]:
        """Methods switched off after a failure, with the error that did it."""
        return dict(self._policy.switched_off)

    @property
    def explanations(self) -> Explanations | None:
        """The last logged run's explanations of all samples (gathered under DDP)."""
        return self._run.explanations

    @property
    def sanity(self) -> SanityReport | None:
        """The last sanity check's report."""
        return self._run.sanity

    @property
    def faithfulness(self) -> FaithfulnessReport | None:
        """The last faithfulness test's report."""
        return self._run.faithfulness

    def logged_anew(self, key: str) -> bool | None:
        """Whether ``key`` was logged anew at the latest validation run (``False``: its last
        value was held), ``None`` if it is not one of this callback's keys
        (:class:`~lightning_saliency.SaliencyEarlyStopping` asks)."""
        if key in self._record.fresh:
            return True
        return False if key in self._record.held else None

    # -- state -------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        """``SaliencyCallback``, or with ``name=``, ``SaliencyCallback{'name': ...}``: the
        methods are not part of it, so a run resumed with other methods keeps what applies."""
        if self.config.name is None:
            return type(self).__qualname__
        return self._generate_state_key(name=self.config.name)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The chosen samples, the drift references, the alarm record and history, the
        timeline, the cadence's count (:class:`~.record.FitRecord`): a resumed run continues
        the same story; ``torch.load(weights_only=True)`` loads it."""
        return self._record.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a saved state; what no longer applies (methods not chosen now, another
        timeline method, another target layer) is dropped, and said once."""
        stale, new_layer = self._record.load_state_dict(state_dict)
        if stale:
            why = "another target_layer" if new_layer else "methods or timeline_method changed"
            console.warn(
                f"SaliencyCallback: resumed; dropped the saved state of {', '.join(stale)} "
                f"({why}); kept the samples and the rest."
            )

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A 0.1 checkpoint's state, saved under an older key (:meth:`FitRecord.legacy_state`)."""
        legacy = FitRecord.legacy_state(checkpoint, self.state_key, self.config.name)
        if legacy is not None:
            self.load_state_dict(dict(legacy))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_run"] = self._run.detached()  # loggers hold file handles: re-made at setup
        return state

    # -- setup and teardown --------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse what cannot work before the model is placed; a ``fit`` starts a new record.

        Raises:
            SaliencyConfigError: no logger, FSDP1 or DeepSpeed (FSDP2 and DDP are supported),
                or a plain ``EarlyStopping`` on a saliency key (use ``SaliencyEarlyStopping``).
        """
        self._enabled = stage in ("fit", "validate") and not getattr(trainer, "fast_dev_run", 0)
        self._in_run = True
        if not self._enabled:  # test() and predict() get no saliency, and need no logger for it
            if stage in ("fit", "validate"):
                console.info("SaliencyCallback: fast_dev_run is on, so no saliency is computed.")
            return
        refuse_unsupported(trainer)
        if self._run.publisher is not None:
            self._run.publisher.close()
        if stage == "fit":
            callbacks: list[L.Callback] = trainer.callbacks  # type: ignore[attr-defined]
            refuse_plain_early_stopping(callbacks, self._record.prefixes[:3])
            self._new_record()
            self._at_train_epoch_end = without_validation(trainer, pl_module)
        self._run.sharing = Sharing.of(trainer)
        publisher = Publisher(trainer.loggers, background=True) if trainer.is_global_zero else None
        self._run.publisher = publisher

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With ``samples=``, the dry run (:meth:`~.intake.SampleIntake.before_training`)."""
        if self._enabled:
            self._intake.before_training(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A validation run starts: the samples will be read from its batches."""
        if self._enabled and not self._at_train_epoch_end:
            self._intake.start(trainer, training=False)

    @override
    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Copy the samples' rows of the batch ``validation_step`` is about to get."""
        if self._enabled and dataloader_idx == self.config.dataloader_idx:
            self._intake.see(batch, batch_idx)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._enabled and self._at_train_epoch_end:  # no validation: training batches
            self._intake.see_training(trainer, batch, batch_idx)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the timeline beside the logs (:meth:`~.logged_run.LoggedRun.save_timeline`)."""
        if self._enabled:
            self.timeline_path = self._run.save_timeline() or self.timeline_path
        self._run.flush()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """The end of ``fit``, ``validate`` or ``test``: every picture is written before
        Lightning closes the loggers; the writer's thread stops (a later run starts one)."""
        self._end_run()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Training failed: write what was queued and stop the writer (no ``teardown`` follows)."""
        self._end_run()

    def _end_run(self) -> None:
        """Every queued picture written, the writer's thread stopped, TensorBoard's own
        event checksum back (:meth:`~lightning_saliency.publish.publisher.Publisher.close`)."""
        self._in_run = False
        self._run.flush()
        if self._run.publisher is not None:
            self._run.publisher.close()

    def flush(self) -> None:
        """Wait until every picture and text queued so far has reached the loggers (done at the
        end of ``fit``, ``validate``, ``test`` and on an exception); a failure is said once."""
        self._run.flush()

    # -- cadence -------------------------------------------------------------------------------
    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every validation run of a ``fit`` counts; runs ``0, n, 2n, ...`` are logged
        (``n = every_n_epochs``), so the cadence meets ``check_val_every_n_epoch`` and
        ``val_check_interval < 1`` (several runs per epoch) alike. ``trainer.validate()``
        always logs."""
        if not self._enabled or self._at_train_epoch_end:
            return
        if trainer.sanity_checking:
            self._intake.check_early(pl_module, self._run.sharing)
        elif self._intake.ready(pl_module, self._run.sharing):
            self._tick(trainer, pl_module, fitting=trainer.state.fn == "fit")

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ready = self._enabled and self._at_train_epoch_end
        if ready and self._intake.ready(pl_module, self._run.sharing):
            self._tick(trainer, pl_module, fitting=True)

    def _tick(self, trainer: L.Trainer, pl_module: L.LightningModule, fitting: bool) -> None:
        """One validation run: logged if the cadence says so; every key logged before keeps
        its last value in the metrics either way."""
        record = self._record
        run = record.validations if fitting else None
        record.validations += int(fitting)
        record.keep({})
        once: dict[str, float] = {}
        if run is None or run % self.config.every_n_epochs == 0:
            methods = [m for m in self.config.methods if self._policy.is_on(m)]
            due = [m for m in methods if self.config.due(m, run)]
            once = self._run(RunContext.of(trainer), pl_module, due).once
        values = {**record.held, **once}
        if values:  # every rank computes the same values; sync_dist says so (a mean of equals)
            pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=True)

    def check_sanity(self, trainer: L.Trainer, pl_module: L.LightningModule) -> SanityReport | None:
        """Run the sanity check and the faithfulness test now, on the fixed samples, log them,
        and gate the alarms by the verdict (``sanity_gate``); returns the sanity report."""
        if self._record.samples is None:
            raise SaliencyConfigError(
                "check_sanity() needs the fixed samples, read from the first validation run: "
                "call it from on_validation_end or later (or pass samples=)."
            )
        samples = self._record.samples.to(pl_module.device)
        self._run.check_trust(RunContext.of(trainer), pl_module, samples, None)
        if not self._in_run:  # after the fit: written before it returns
            self._end_run()
        return self._run.sanity
