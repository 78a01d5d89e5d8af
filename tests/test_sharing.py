"""Sharing the samples across ranks, with the collectives simulated by threads: the gathered
explanations equal one explain() of all samples, in order, whatever failed where."""

import copy
import threading

import pytest
import torch
from torch import nn

from lightning_saliency import explain
from lightning_saliency.callback.sharing import gather_explanations, share_of


class ThreadGather:
    """``all_gather`` across threads that stand for ranks (one barrier per call)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world)
        self.calls = [0] * world

    def for_rank(self, rank: int):
        gather = self

        class Strategy:
            def all_gather(self, tensor, group=None, sync_grads=False):
                gather.calls[rank] += 1
                gather.slots[rank] = tensor.clone()
                gather.barrier.wait()
                out = torch.stack(list(gather.slots))
                gather.barrier.wait()
                return out

        return Strategy()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


METHODS = ("gradcam", "integrated_gradients")


def _run_ranks(n: int, world: int, fail: dict[int, str] | None = None):
    model, images = _model(), torch.rand(n, 3, 12, 12)
    labels = torch.arange(n) % 3
    gather = ThreadGather(world)
    results: list = [None] * world

    replicas = [copy.deepcopy(model) for _ in range(world)]  # one model per rank, as DDP

    def rank_main(rank: int) -> None:
        rows = share_of(n, rank, world)
        local = explain(
            replicas[rank], images[rows], labels[rows], METHODS, ig_steps=8, on_error="collect"
        )
        errors = dict(local.errors)
        if fail and rank in fail:  # this method failed here only
            local.maps.pop(fail[rank])
            errors[fail[rank]] = RuntimeError("boom")
        results[rank] = gather_explanations(
            gather.for_rank(rank), local, errors, METHODS, n, rank, world, (12, 12), images.device
        )

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    whole = explain(model, images, labels, METHODS, ig_steps=8)
    return results, whole, gather


@pytest.mark.parametrize(("n", "world"), [(4, 2), (5, 2), (7, 3)])
def test_every_rank_holds_the_single_device_explanations_in_order(n, world):
    results, whole, gather = _run_ranks(n, world)
    for out, errors in results:
        assert errors == {}
        for method in METHODS:
            torch.testing.assert_close(out[method], whole[method], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.logits, whole.logits)
        assert torch.equal(out.targets, whole.targets)
        torch.testing.assert_close(
            out.extras["ig_completeness_error"], whole.extras["ig_completeness_error"]
        )
        assert out.layer_cells == whole.layer_cells
    assert len(set(gather.calls)) == 1  # the same collectives on every rank


def test_a_method_failing_on_one_rank_is_dropped_on_every_rank_without_a_hang():
    results, whole, gather = _run_ranks(4, 2, fail={1: "integrated_gradients"})
    for out, errors in results:
        assert set(errors) == {"integrated_gradients"} and list(out.maps) == ["gradcam"]
        torch.testing.assert_close(out["gradcam"], whole["gradcam"], atol=1e-5, rtol=1e-4)
    assert "another rank" in str(results[0][1]["integrated_gradients"])
    assert str(results[1][1]["integrated_gradients"]) == "boom"  # the rank's own error
    assert len(set(gather.calls)) == 1


def test_a_rank_whose_whole_pass_failed_still_gathers():
    model, images = _model(), torch.rand(4, 3, 12, 12)
    gather = ThreadGather(2)
    results: list = [None, None]

    def rank_main(rank: int) -> None:
        rows = share_of(4, rank, 2)
        local = (
            None if rank == 1 else explain(model, images[rows], None, METHODS, ig_steps=4)
        )  # only rank 0 runs the model
        errors = {m: RuntimeError("all gone") for m in METHODS} if rank == 1 else {}
        results[rank] = gather_explanations(
            gather.for_rank(rank), local, errors, METHODS, 4, rank, 2, (12, 12), images.device
        )

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for out, errors in results:
        assert set(errors) == set(METHODS) and out is not None and not out.maps


def _gather_activations_on_threads(pieces, n):
    from lightning_saliency.callback.sharing import gather_activations

    gather = ThreadGather(len(pieces))
    results: list = [None] * len(pieces)

    def rank_main(rank: int) -> None:
        results[rank] = gather_activations(
            gather.for_rank(rank), pieces[rank], n, rank, len(pieces), torch.device("cpu")
        )

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(pieces))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_layer_activations_are_gathered_in_sample_order_or_skipped_by_all():
    acts = torch.rand(5, 4, 3, 3)
    pieces = [acts[share_of(5, r, 2)] for r in range(2)]
    for gathered in _gather_activations_on_threads(pieces, 5):
        assert torch.equal(gathered, acts)
    assert _gather_activations_on_threads([pieces[0], None], 5) == [None, None]


def test_dff_of_gathered_activations_is_the_single_device_dff():
    from lightning_saliency.engine.explanations import layer_activations
    from lightning_saliency.engine.methods import METHODS
    from lightning_saliency.engine.methods.dff import DFFOptions

    model, images = _model(), torch.rand(6, 3, 12, 12)
    whole = explain(model, images, None, ("dff",))
    pieces = [layer_activations(model, images[share_of(6, r, 2)])[0] for r in range(2)]
    gathered = _gather_activations_on_threads(pieces, 6)[0]
    maps, extras = METHODS["dff"].joint(gathered, model, (12, 12), DFFOptions(), {})
    torch.testing.assert_close(maps, whole["dff"])
    torch.testing.assert_close(extras["dff_concept_scores"], whole.extras["dff_concept_scores"])
