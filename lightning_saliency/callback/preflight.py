"""Before any training step: what the callback refuses, and what it checks on the real model.

:func:`refuse_unsupported` runs at ``setup``, before the model is placed: no logger, FSDP1 and
DeepSpeed are errors that name the fix. :func:`prepare` runs at ``on_fit_start`` (or the start
of ``trainer.validate()``) on every rank: it chooses the fixed samples, finds the
normalisation to undo and the class names, and dry-runs every method on two samples
(:mod:`.dry_run`), so a mistake that depends on the model or the data is an error before
training, not a failure at epoch 0.
"""

from __future__ import annotations

import lightning as L

from lightning_saliency import console
from lightning_saliency.callback.dry_run import dry_run
from lightning_saliency.callback.record import FitRecord
from lightning_saliency.callback.samples import choose_samples, find_class_names, find_normalize
from lightning_saliency.errors import SaliencyConfigError


def refuse_unsupported(trainer: L.Trainer) -> None:
    """Raises:
    SaliencyConfigError: no logger, FSDP1 or DeepSpeed (FSDP2 and DDP are supported).
    """
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


def prepare(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    stage: str,
    record: FitRecord,
    from_training: bool,
) -> bool:
    """Choose the samples (from the training set when ``from_training``), find what to undo
    for display and the class names, and dry-run every method; ``False`` when there is nothing
    to explain (said once).

    Raises:
        SaliencyConfigError: what the dry run finds, non-image batches, or no loader to take
            samples from.
    """
    config, loader = record.config, None
    if record.samples is None:
        record.samples, loader = choose_samples(
            trainer,
            pl_module,
            stage,
            config.num_samples,
            config.seed,
            config.keys,
            config.dataloader_idx,
            train=from_training,
        )
    if record.samples is None:
        console.warn("SaliencyCallback: the val set yields no images; nothing to explain.")
        return False
    if len(record.samples) < config.num_samples and config.samples is None:
        console.warn(
            f"SaliencyCallback: only {len(record.samples)} images available, fewer than "
            f"num_samples={config.num_samples}; explaining those."
        )
    if record.mean is None and config.denormalize is not False and loader is not None:
        found = find_normalize(getattr(loader, "dataset", None))
        if found is not None:
            record.mean, record.std = found
    if record.class_names is None:
        record.set_class_names(find_class_names(trainer, loader))
    _dry_run(pl_module, record)
    return True


def _dry_run(pl_module: L.LightningModule, record: FitRecord) -> None:
    """Every method still on, on two of the samples; keeps the target layer it found."""
    config, explainer = record.config, record.explainer
    assert record.samples is not None
    samples = record.samples.to(pl_module.device)
    mean, std = record.display_normalisation
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
    if explainer.layer_name:
        console.info(f"SaliencyCallback: explaining layer '{explainer.layer_name}'.")
