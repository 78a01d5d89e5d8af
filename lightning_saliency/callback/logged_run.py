"""One logged run, from the fixed samples to the loggers: :class:`LoggedRun`.

The callback's hook calls it once per logged validation run. It goes one way, down: the
samples are explained on every rank (:class:`~.sharing.Sharing`, the engine), the maps are
scored and judged (:mod:`lightning_saliency.evaluate`: the shortcut probes, the score monitor
and, once per fit, the sanity check), drawn (:mod:`lightning_saliency.viz`) and handed to the
loggers (:mod:`lightning_saliency.publish`), and it returns the scalars for ``self.log``.
Every step sits inside the :class:`~.failures.FailurePolicy`: a failing method is switched off
on every rank alike and the others go on; a failing step warns once and the run goes on.
Whatever happened, the run's alarm text is written. It needs no Trainer: the hook hands it a
:class:`RunContext`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import lightning as L
import torch
from torch import Tensor, nn

from lightning_saliency import console
from lightning_saliency.callback.alarm_text import alarm_alert, alarm_text
from lightning_saliency.callback.failures import FailurePolicy, describe
from lightning_saliency.callback.record import FitRecord, method_of
from lightning_saliency.callback.samples import FixedSamples
from lightning_saliency.callback.sharing import Sharing
from lightning_saliency.callback.trust import trust_checks, trust_record, trust_text, verdict_lines
from lightning_saliency.engine.class_names import class_name
from lightning_saliency.engine.explanations import Explanations
from lightning_saliency.engine.methods import METHODS
from lightning_saliency.evaluate.alarms import is_health
from lightning_saliency.evaluate.deletion import FaithfulnessReport
from lightning_saliency.evaluate.hysteresis import AlarmEvent
from lightning_saliency.evaluate.map_health import blank_maps, blank_reason
from lightning_saliency.evaluate.monitor import EpochReport
from lightning_saliency.evaluate.sanity import SanityReport
from lightning_saliency.evaluate.scores import pointing_tolerance
from lightning_saliency.evaluate.shortcut_probes import shortcut_scores
from lightning_saliency.publish.publisher import Publisher
from lightning_saliency.viz.figures import EpochFigures
from lightning_saliency.viz.sample_table import sample_table


@dataclass(frozen=True)
class RunContext:
    """Where a logged run stands in the fit.

    Attributes:
        epoch: the trainer's epoch.
        step: the step Lightning logs validation metrics at (the pictures' step).
        fitting: inside ``fit`` (``False``: ``trainer.validate()``, which moves no drift
            reference and runs no sanity check).
        column: the timeline's label and position of this run.
    """

    epoch: int
    step: int
    fitting: bool
    column: tuple[str, float]

    @classmethod
    def of(cls, trainer: L.Trainer) -> RunContext:
        """The trainer's position. Lightning logs validation metrics at the fit loop's count
        of batches that stepped, which has no public name (``global_step`` counts optimizer
        steps, and differs under manual optimisation with several optimizers). The column is
        ``ep 3`` for the validation at the end of epoch 3, ``ep 3 50%`` for one halfway
        through it (``val_check_interval < 1``), ``step 300`` on a stream (an
        ``IterableDataset`` without length: one endless epoch)."""
        epoch = trainer.current_epoch
        fitting = trainer.state.fn == "fit"
        batches = trainer.num_training_batches
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        step = int(trainer.fit_loop.epoch_loop._batches_that_stepped)
        column = (f"ep {epoch}", float(epoch))
        if fitting and isinstance(batches, int) and 0 < done < batches:
            column = (f"ep {epoch} {done / batches:.0%}", epoch - 1 + done / batches)
        elif fitting and not isinstance(batches, int):  # a stream: no epochs, steps
            column = (f"step {step}", float(step))
        return cls(epoch, step, fitting, column)


@dataclass
class RunOutcome:
    """What a logged run tells the hook: values to log this run only (``once``; the scores
    go to the record's held metrics, :meth:`~.record.FitRecord.keep`), the alarm events, and
    whether maps were made."""

    once: dict[str, float] = field(default_factory=dict)
    events: list[AlarmEvent] = field(default_factory=list)
    ran: bool = False


class LoggedRun:
    """Explains, scores, draws and publishes one logged run of a fit.

    Args:
        record: the fit's record (samples, explainer, monitor, timeline).
        sharing: the ranks, as the pipeline sees them.
        policy: the failure policy.
        publisher: where pictures and text go (``None`` on ranks other than zero).

    Attributes:
        explanations: the last run's explanations of all samples.
        sanity, faithfulness: the reports of the last sanity check.
    """

    def __init__(
        self,
        record: FitRecord,
        sharing: Sharing,
        policy: FailurePolicy,
        publisher: Publisher | None,
    ) -> None:
        self.record = record
        self.config = record.config
        self.sharing = sharing
        self.policy = policy
        self.publisher = publisher
        self.explanations: Explanations | None = None
        self.sanity: SanityReport | None = None
        self.faithfulness: FaithfulnessReport | None = None

    def detached(self) -> LoggedRun:
        """A copy without the loggers and the ranks (they hold files and processes), for
        pickling; ``setup`` gives them back."""
        run = copy.copy(self)
        run.publisher, run.sharing = None, Sharing()
        return run

    def __call__(self, ctx: RunContext, model: nn.Module, methods: Sequence[str]) -> RunOutcome:
        """The run of ``methods`` (those due and still on, the same on every rank); its alarm
        text is written whatever happened."""
        self.report_writer_failures()  # they join this run's text
        outcome = RunOutcome()
        try:
            outcome = self._run(ctx, model, methods)
        finally:
            if outcome.ran or self.policy.has_news:
                self._write_alarm_text(ctx, outcome.events)
        return outcome

    def _run(self, ctx: RunContext, model: nn.Module, methods: Sequence[str]) -> RunOutcome:
        if self.record.samples is None or not methods:
            return RunOutcome()
        samples: FixedSamples | None = None
        with self.policy.step("transfer", "moving the samples", "this run is skipped"):
            samples = self.record.samples.to(_device_of(model))
        if samples is None:
            return RunOutcome()
        out, errors = self.sharing.explain(self.record.explainer, model, samples, methods)
        self._agree(methods, errors)
        self.explanations = out
        if out is None or not len(out):
            return RunOutcome(ran=True)
        if not bool(torch.isfinite(out.logits).all()):
            return self._nonfinite(ctx)
        self._say_blank(ctx, out)
        if self.config.sanity_check and ctx.fitting and not self.record.sanity_checked:
            self.record.sanity_checked = True
            self.check_trust(ctx, model, samples, out)
        report = self._score(ctx, model, samples, out)
        self._agree(methods, {} if report is None else report.errors)
        outcome = RunOutcome(ran=True) if report is None else self._metrics(ctx, report)
        if self.publisher is not None and report is not None:
            self._publish(ctx, samples, out, report.per_sample)
        self.policy.agree(self.sharing, methods)  # pictures fail on rank zero alone
        return outcome

    def _say_blank(self, ctx: RunContext, out: Explanations) -> None:
        """Blank maps are said once per method, with the reason, in the log and the text."""
        for method, count in blank_maps(out).items():
            message = (
                f"SaliencyCallback: {count} of {len(out[method])} {method} maps are blank at "
                f"epoch {ctx.epoch}: {blank_reason(method, out.layer_name)}."
            )
            if self.policy.warn_once(f"blank {method}", message):
                self.policy.announce(message)

    def _agree(self, methods: Sequence[str], errors: Mapping[str, BaseException]) -> None:
        """Every rank switches off the methods that failed on any rank."""
        for method, error in errors.items():
            self.policy.failed(method, error)
        self.policy.agree(self.sharing, methods)

    def _score(
        self, ctx: RunContext, model: nn.Module, samples: FixedSamples, out: Explanations
    ) -> EpochReport | None:
        """The maps' scores, drift and alarms (``None`` if scoring failed: said once)."""
        size = (samples.images.shape[-2], samples.images.shape[-1])
        tolerance = pointing_tolerance(size, out.layer_cells)
        probes = self._probe_shortcuts(model, samples, out) if self.config.shortcut_probes else {}
        report = None
        with self.policy.step("scores", "scoring", "no scores this run"):
            report = self.record.monitor.observe(
                ctx.epoch,
                out,
                samples.labels,
                samples.masks,
                tolerance,
                update_references=ctx.fitting,
                extra_scores=probes,
            )
        return report

    def _probe_shortcuts(
        self, model: nn.Module, samples: FixedSamples, out: Explanations
    ) -> dict[str, dict[str, Tensor]]:
        """The mask-free shortcut scores of this run's maps. Class scores from a target
        function have no probabilities to probe: nothing is probed then."""
        if callable(self.config.target) or out.logits.dim() != 2 or out.logits.shape[1] < 2:
            return {}
        maps = {m: v for m, v in out.items() if METHODS[m].kind == "map"}
        if not maps:
            return {}
        labels = samples.labels
        correct = None if labels is None else out.logits.argmax(1) == labels.to(out.logits.device)
        probes: dict[str, dict[str, Tensor]] = {}
        consequence = "no mask-free shortcut scores this run"
        with self.policy.step("probes", "the shortcut probes", consequence):
            probes = shortcut_scores(
                model,
                samples.images,
                maps,
                out.targets,
                labels,
                correct,
                signed_mass=self.config.signed_mass,
                output_transform=self.config.output_transform,
            )
        return probes

    def _metrics(self, ctx: RunContext, report: EpochReport) -> RunOutcome:
        """What to log: the scores of the methods still on, and which are off. Per-class
        means and each alarm's state go to the loggers' charts only (``self.log`` costs about
        a millisecond a key; what a rule may watch stays in ``callback_metrics``)."""
        off = self.policy.switched_off
        prefixes = self.record.prefixes
        metrics = {k: v for k, v in report.metrics.items() if method_of(k, prefixes) not in off}
        health = self.record.monitor.health_prefix
        metrics.update({f"{health}/switched_off/{m}": 1.0 for m in off})
        charts = {k: v for k, v in metrics.items() if self._chart_only(k)}
        if self.publisher is not None:
            self.publisher.metrics(charts, ctx.step)
        for event in report.events:
            (console.info if event.state == "cleared" else console.warn)(event.message())
        self.record.keep({k: v for k, v in metrics.items() if k not in charts})
        return RunOutcome(events=report.events, ran=True)

    def _chart_only(self, key: str) -> bool:
        monitor = self.record.monitor
        if key.startswith(monitor.per_class_prefix + "/"):
            return True
        for flags in (monitor.alarm_prefix + "/", monitor.health_prefix + "/"):
            rest = key[len(flags) :] if key.startswith(flags) else None
            if rest is not None and rest != "count" and not rest.startswith("switched_off/"):
                return True
        return False

    @property
    def _alarm_prefix(self) -> str:
        return self.record.monitor.alarm_prefix

    def _nonfinite(self, ctx: RunContext) -> RunOutcome:
        message = (
            f"SaliencyCallback: the model's outputs on the fixed samples are not finite at "
            f"epoch {ctx.epoch} (training diverged?); no maps or scores this run."
        )
        self.policy.warn_once("nonfinite", message)
        self.policy.announce(message)
        return RunOutcome(once={f"{self._alarm_prefix}/nonfinite_outputs": 1.0}, ran=True)

    # -- once per fit: can the maps be trusted? -----------------------------------------------
    def check_trust(
        self,
        ctx: RunContext,
        model: nn.Module,
        samples: FixedSamples,
        out: Explanations | None,
    ) -> None:
        """The sanity check and faithfulness on ``out`` (``None``: the maps of now, explained
        once for both); a failure warns once and leaves the alarms ungated."""
        methods = [m for m in self.config.methods if METHODS[m].kind == "map"]
        methods = [m for m in methods if self.policy.is_on(m) and (out is None or m in out)]
        if not methods:
            return
        consequence = "alarms are not gated by it"
        with self.policy.step("sanity", "the sanity check", consequence):
            if out is None:
                out, errors = self.record.explainer.explain(model, samples, methods)
                if out is None:
                    raise next(iter(errors.values()))
            self.sanity, self.faithfulness = trust_checks(
                self.record.explainer, model, samples, out, methods
            )
            if self.config.sanity_gate:
                self.record.monitor.set_insensitive(self.sanity.failed)
            for line in verdict_lines(self.sanity, self.config):
                self.policy.announce(line)
            if self.publisher is not None:
                self._publish_trust(ctx, self.sanity, self.faithfulness)

    def _publish_trust(
        self, ctx: RunContext, report: SanityReport, faith: FaithfulnessReport
    ) -> None:
        assert self.publisher is not None
        with self.policy.step("loggers", "writing to the loggers", "training goes on"):
            tag = f"{self.config.prefix}/sanity"
            self.publisher.text(tag, trust_text(report, faith), ctx.step)
            self.publisher.record(tag, trust_record(report, faith), ctx.step)
            self.publisher.drawn(tag, report.picture, ctx.step)

    # -- pictures and text, rank zero ---------------------------------------------------------
    def _publish(
        self,
        ctx: RunContext,
        samples: FixedSamples,
        out: Explanations,
        scores: Mapping[str, Mapping[str, Tensor]],
    ) -> None:
        """This run's pictures, and a row per sample for the loggers that keep tables: a
        method whose pictures fail is reported to the policy (every rank switches it off at
        the next agreement); a logger that fails warns once."""
        assert self.publisher is not None
        record, config = self.record, self.config
        figures = None
        mean, std = record.display_normalisation
        with self.policy.step("figures", "drawing", "no pictures this run"):
            figures = EpochFigures(
                samples.images,
                out,
                samples.labels,
                record.class_names,
                mean,
                std,
                config.tile_size,
                grey=config.grey_background,
                sign=config.sign,
            )
        if figures is None:
            return
        for method, error in figures.errors.items():
            self.policy.failed(method, error)
        pictures = {f"{config.prefix}/{m}": grid for m, grid in figures.grids().items()}
        if figures.tiles:
            pictures[f"{config.prefix}/overview"] = figures.overview()
        if config.timeline_method in figures.tiles:
            pictures[f"{config.prefix}/timeline"] = self._timeline(ctx, samples, figures)
        with self.policy.step("loggers", "writing to the loggers", "training goes on"):
            self.publisher.images(pictures, ctx.step)
            self.publisher.text(f"{config.prefix}/captions", "  \n".join(figures.texts), ctx.step)
            self._thresholds_and_layout(list(out), ctx.step)
            if self.publisher.takes_tables:
                table = sample_table(
                    figures.picture, figures.tiles, out, samples.labels, record.class_names,
                    scores, samples.masks,
                )  # fmt: skip
                self.publisher.table(
                    f"{config.prefix}/samples", table.columns, table.rows, ctx.step
                )

    def _timeline(self, ctx: RunContext, samples: FixedSamples, figures: EpochFigures) -> Tensor:
        """The timeline with this run's column (at most 32 columns)."""
        record = self.record
        timeline = record.timeline
        labels = samples.labels.tolist() if samples.labels is not None else None
        timeline.rows = [
            f"#{i}" + ("" if labels is None else f"\n{class_name(record.class_names, labels[i])}")
            for i in range(len(samples))
        ]
        label, position = ctx.column
        assert self.config.timeline_method is not None
        timeline.add(figures.tiles[self.config.timeline_method], ctx.epoch, label, position)
        return timeline.picture()

    def _thresholds_and_layout(self, methods: Sequence[str], step: int) -> None:
        """Each alarm's threshold beside its score, grouped in a custom-scalars layout."""
        assert self.publisher is not None
        charts: dict[str, list[str]] = {}
        values: dict[str, float] = {}
        for method in methods:
            if METHODS[method].kind != "map":
                continue
            for score, threshold in self.record.monitor.thresholds.items():
                tag = f"{self.config.prefix}/{method}/{score}"
                if tag not in self.record.held:
                    continue
                note = is_health(score)
                flags = self.record.monitor.health_prefix if note else self._alarm_prefix
                line = f"{flags}/{method}/{score}/threshold"
                values[line] = threshold
                charts[f"{method} {score}"] = [tag, line]
        if values:
            self.publisher.scalars(values, step)
            self.publisher.layout({self.config.prefix: charts})

    def _write_alarm_text(self, ctx: RunContext, events: Sequence[AlarmEvent]) -> None:
        """The run's alarm text (TensorBoard text, W&B and MLflow text, ``alarms.txt``), and
        one alert where loggers send them (W&B) when the run raised news about the model."""
        news = self.policy.news()
        if self.publisher is None:
            return
        text = alarm_text(ctx.epoch, events, self.record.monitor, self.policy, news)
        alert = alarm_alert(events)
        with self.policy.step("loggers", "writing to the loggers", "training goes on"):
            self.publisher.text(f"{self._alarm_prefix}/alarms", text, ctx.step)
            if alert is not None:
                self.publisher.alert(*alert)

    # -- the writer ---------------------------------------------------------------------------
    def report_writer_failures(self) -> None:
        """Each logger that failed in the writer: said once, and in the next alarm text."""
        if self.publisher is None:
            return
        for name, err in self.publisher.failures():
            consequence = f"{name} gets no more saliency pictures; training goes on"
            self.policy.warn_failed(f"logger {name}", f"writing to {name}", err, consequence)
            self.policy.announce(
                f"writing to {name} failed ({describe(err)}): it gets no more pictures"
            )

    def save_timeline(self) -> str | None:
        """Save the timeline as ``saliency_timeline[_<name>].png`` beside the logs (rank zero,
        independent of TensorBoard's ``--samples_per_plugin``); its path, or ``None``."""
        timeline, publisher = self.record.timeline, self.publisher
        if publisher is None or not len(timeline):
            return None
        suffix = "" if self.config.name is None else f"_{self.config.name}"
        with self.policy.step("timeline", "writing the timeline", "the run is done"):
            return publisher.save_png(timeline.picture(), f"saliency_timeline{suffix}.png")
        return None

    def flush(self) -> None:
        """Wait for the writer; a failure in it is said once."""
        if self.publisher is None:
            return
        try:
            for err in self.publisher.flush():
                self.policy.warn_failed("writer", "writing a picture", err, "training goes on")
        finally:
            self.report_writer_failures()


def _device_of(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
