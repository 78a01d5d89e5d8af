"""The fixed samples of a fit, from the batches the loop runs to the record: :class:`SampleIntake`.

The callback hands it each run's start (the loader Lightning built), each batch and the run's
end; it never calls a loader or a transfer hook itself (:mod:`.capture`). At a run's end it puts
the samples in the :class:`~.record.FitRecord` and, once, checks the model against them:

- the samples are re-read at every run where the loader's order is fixed (the same dataset
  indices), so a change that enters the validation data later reaches them; elsewhere the
  first samples are kept, and that is said once;
- the rule for a change of size (progressive resizing, or a resumed run whose val images
  changed shape): the same indices are explained at the new size (where the order is not
  fixed, the new run's first images), and the drift references are dropped, said once;
- a resumed run reads the saved indices; if they no longer lie among the batches validation
  runs, the samples are chosen anew and the references dropped, said once;
- the normalisation to undo and the class names are looked for behind the loader's dataset
  (torchvision ``Normalize`` v1 and v2, ``Subset``/``ConcatDataset`` chains); images outside
  ``[0, 1]`` without a ``Normalize`` to undo are said once, naming ``mean=``/``std=``;
- labels that cannot be read as classes are said once; multi-hot labels with
  ``target="label"`` are an error naming ``target=``;
- the dry run (:mod:`.dry_run`) runs on the first batch's first rows at the end of Lightning's
  sanity check, before any training step (or, without one, before the first explanation);
  explicit ``samples=`` are checked at the start of the fit instead.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from lightning_saliency import console
from lightning_saliency.callback.capture import SampleCapture
from lightning_saliency.callback.dry_run import attention_advice, dry_run
from lightning_saliency.callback.failures import FailurePolicy
from lightning_saliency.callback.record import FitRecord
from lightning_saliency.callback.samples import (
    FixedSamples,
    find_class_names,
    find_normalize,
    pick_loader,
)
from lightning_saliency.callback.sharing import Sharing
from lightning_saliency.errors import SaliencyConfigError


class SampleIntake:
    """Takes the fixed samples of one fit from the loop's batches into ``record``.

    Args:
        record: the fit's record (the samples go there).
        policy: the fit's failure policy: each message is said once through it.

    Attributes:
        checked: whether the dry run passed.
    """

    def __init__(self, record: FitRecord, policy: FailurePolicy) -> None:
        self.record = record
        self.policy = policy
        self.checked = False  # the dry run passed
        self._capture: SampleCapture | None = None
        self._loader: Any = None

    @property
    def given(self) -> bool:
        """The user passed ``samples=``: nothing is taken from the batches."""
        return self.record.config.samples is not None

    def start(self, trainer: L.Trainer, training: bool) -> None:
        """A validation run (``training``: a training epoch) starts on the loader Lightning
        built, as the loop iterates it."""
        record, config = self.record, self.record.config
        if training:
            loader = pick_loader(trainer.train_dataloader, 0)
            batches = trainer.num_training_batches
        else:
            loader = pick_loader(trainer.val_dataloaders, config.dataloader_idx)
            batches = trainer.num_val_batches[config.dataloader_idx]
        if loader is not None and loader is not self._loader:
            self._loader = loader
            self._find_display(trainer, loader)
        if self.given or loader is None:
            return
        capture = self._capture
        reuse = None
        if capture is None:
            capture = SampleCapture(
                config.num_samples,
                config.seed,
                config.keys,
                trainer.global_rank,
                trainer.world_size,
            )
            self._capture = capture
            saved = record.samples
            reuse = None if saved is None else saved.indices
        capture.start(loader, batches, reuse)
        if reuse is not None and capture.indices is not None and capture.indices != reuse:
            record.monitor.forget_references()
            self._say(
                "SaliencyCallback: resumed, but the saved samples' indices are not among the "
                "batches validation runs now; chose the samples anew and dropped the drift "
                "references."
            )

    def see(self, batch: Any, batch_idx: int) -> None:
        """One batch of the run, as ``validation_step`` (or ``training_step``) gets it."""
        if self._capture is not None:
            self._capture.see(batch, batch_idx)

    def before_training(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The start of a fit: explicit ``samples=`` are checked now; otherwise, without
        Lightning's sanity check, say when the check comes."""
        if self.given:
            self.check_early(pl_module)
        elif trainer.num_sanity_val_steps == 0 and not self.checked:
            self._say(
                "SaliencyCallback: num_sanity_val_steps=0, so the dry run checks the model and "
                "the data at the first validation, after the first training steps; keep "
                "Lightning's sanity check (the default) to meet a mistake before training."
            )

    def see_training(self, trainer: L.Trainer, batch: Any, batch_idx: int) -> None:
        """Without validation: a training batch (the first one starts the epoch's run)."""
        if batch_idx == 0:
            self.start(trainer, training=True)
        self.see(batch, batch_idx)

    def check_early(self, pl_module: L.LightningModule, sharing: Sharing | None = None) -> None:
        """At the end of Lightning's sanity check (or the start of a fit with ``samples=``):
        the dry run, before any training step, on the first rows of rank zero's first batch
        (every rank checks the same images, so they decide alike)."""
        capture = self._capture
        if self.checked:
            return
        if self.given or capture is None:
            probe = self.record.samples
        else:
            probe = capture.shared_probe(Sharing().sum if sharing is None else sharing.sum)
        if probe is not None:
            self._read_labels()
            self._dry_run(pl_module, probe)

    def ready(self, pl_module: L.LightningModule, sharing: Sharing) -> bool:
        """The run ended: the samples are in the record and checked; ``False`` when there is
        nothing to explain (said once).

        Raises:
            SaliencyConfigError: what the dry run finds; multi-hot labels with
                ``target="label"``.
        """
        record, capture = self.record, self._capture
        if capture is not None:
            self._take(capture.finish(sharing.sum), capture)
        if record.samples is None:
            self._say("SaliencyCallback: the val set yields no images; nothing to explain.")
            return False
        if not self.checked:
            self._read_labels()
            self._dry_run(pl_module, record.samples)
        return True

    def _take(self, fresh: FixedSamples | None, capture: SampleCapture) -> None:
        record, old = self.record, self.record.samples
        if fresh is None:
            return
        resized = old is not None and old.images.shape[1:] != fresh.images.shape[1:]
        if capture.kept is not None and old is not None and not resized:
            self._say(
                f"SaliencyCallback: the val loader's order is not fixed ({capture.kept}), so "
                f"the {len(old)} samples taken at the first validation are explained every "
                "run and not re-read (a change to the validation data later does not reach "
                "them); pass samples= to choose them."
            )
            return
        if resized:
            assert old is not None
            record.monitor.forget_references()
            which = "the same samples" if capture.kept is None else "this run's first samples"
            console.warn(
                f"SaliencyCallback: the validation images changed size from "
                f"{tuple(old.images.shape[-2:])} to {tuple(fresh.images.shape[-2:])}; explaining "
                f"{which} at the new size, with new drift references."
            )
        if old is None and len(fresh) < record.config.num_samples:
            console.warn(
                f"SaliencyCallback: only {len(fresh)} images available, fewer than "
                f"num_samples={record.config.num_samples}; explaining those."
            )
        record.samples = fresh

    def _find_display(self, trainer: L.Trainer, loader: Any) -> None:
        """The normalisation to undo and the class names, behind the loader's dataset."""
        record, config = self.record, self.record.config
        dataset = getattr(loader, "dataset", None)
        if record.mean is None and config.denormalize is not False:
            found = find_normalize(dataset)
            if found is not None:
                record.mean, record.std = found
        if record.class_names is None:
            record.set_class_names(find_class_names(getattr(trainer, "datamodule", None), dataset))

    def _read_labels(self) -> None:
        """What the batches' labels say about the target, said once."""
        capture, config = self._capture, self.record.config
        if capture is None or capture.labels_problem is None:
            return
        if capture.multi_hot and config.target == "label":
            raise SaliencyConfigError(
                f"the batches' labels are {capture.labels_problem}: several classes per image "
                "(multi-label). SaliencyCallback explains one class per image; pass target= "
                "('pred', a class index, or a function of the outputs)."
            )
        self._say(
            f"SaliencyCallback: the batches' labels are {capture.labels_problem}, not classes; "
            "maps explain the predicted class and alarms judge all samples (pass label_key= "
            "for the key that holds the classes)."
        )

    def _dry_run(self, pl_module: L.LightningModule, samples: FixedSamples) -> None:
        record = self.record
        config, explainer = record.config, record.explainer
        samples = samples.to(pl_module.device)
        mean, std = record.display_normalisation
        if mean is None and config.denormalize is not False:
            low, high = float(samples.images.min()), float(samples.images.max())
            if low < -0.01 or high > 1.01:
                self._say(
                    f"SaliencyCallback: the images range over [{low:.2f}, {high:.2f}] and no "
                    "torchvision Normalize was found behind the val dataset (one applied in "
                    "on_after_batch_transfer or inside the model cannot be); the pictures "
                    "stretch each image to its own range. Pass mean= and std= to undo it."
                )
        explainer.layer_name = dry_run(
            pl_module,
            samples.images,
            samples.labels,
            config.target,
            config.methods,
            explainer.layer,  # a resumed run keeps its layer
            config.method_options,
            mean,
            std,
            config.seed,
            samples.masks,
            layout=config.layout,
            reshape=config.reshape,
            output_transform=config.output_transform,
        )
        advice = attention_advice(pl_module, config.methods)
        if advice is not None:
            self._say(advice)
        self.checked = True
        if explainer.layer_name:
            console.info(f"SaliencyCallback: explaining layer '{explainer.layer_name}'.")

    def _say(self, message: str) -> None:
        self.policy.warn_once(message, message)
