"""Evaluation: class logits of any model's output, accuracy and loss on a split, and the check
that a model's outputs fit a dataset's classes."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from kshare.data import Adapter, ImageData, adapter_for
from kshare.errors import DataError, TrainingError, param
from kshare.fit.fidelity import logits_of
from kshare.training.precision import Setup, candidates, choose_setup, time_steps
from kshare.training.runtime import Runtime, all_sum, index_batches


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, adapter: Adapter | None = None, batch_size: int = 256,
             rt: Runtime | None = None, setup: Setup | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy on `data` (sharded over ranks under DDP).

    Without an `adapter`, images are fed as the model was trained (its recipe), else as they
    are with the data's normalisation. `setup`: the precision and memory format to run in.
    Figures stay on the device until the end: one host sync per evaluation."""
    if not data.labelled:
        raise DataError(f"{data.name} has no labels: it can fit or recalibrate a model, not evaluate one")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TrainingError(f"{param('batch_size')} must be at least 1, got {batch_size!r}")
    rt = rt or Runtime(0, 1, next(model.parameters()).device)
    setup = setup or Setup()
    adapter = adapter or adapter_for(model, data)
    images, labels = data.images.to(rt.device), data.labels.to(rt.device)
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=rt.device)
    correct = torch.zeros((), dtype=torch.long, device=rt.device)
    count = 0
    for idx in index_batches(len(data.labels), batch_size, rt, None, every=True, device=rt.device):
        x, y = setup.layout(adapter(images[idx])), labels[idx]
        with setup.autocast(rt.device):
            logits = logits_of(model(x))
        loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        count += len(idx)
    model.train(was_training)
    total, right, count = all_sum([loss.item(), float(correct.item()), float(count)], rt)
    return {"loss": total / max(count, 1), "acc": right / max(count, 1), "n": count}


def choose_eval_setup(model: nn.Module, x: torch.Tensor, device: torch.device, precision: str = "auto",
                      channels_last: bool | None = None) -> Setup:
    """The precision and memory format to evaluate in: on a GPU under `auto`, the fastest of the
    candidates by timed forward passes of a copy of the model on `x`."""
    options = candidates(device, precision, channels_last)

    def seconds(setup: Setup) -> float:
        trial = copy.deepcopy(model).eval().to(memory_format=torch.channels_last if setup.channels_last
                                               else torch.contiguous_format)
        xs = setup.layout(x)

        def step() -> None:
            with torch.no_grad(), setup.autocast(device):
                trial(xs)

        return time_steps(step, device)

    return choose_setup(options, seconds)


def check_classes(model: nn.Module, data: ImageData, adapter: Adapter, device: torch.device) -> None:
    """Refuse a model whose output width differs from the dataset's number of classes."""
    if not data.labelled:
        return
    model_was = model.training
    model.eval()
    with torch.no_grad():
        out = logits_of(model(adapter(data.images[:2].to(device))))
    model.train(model_was)
    if out.ndim != 2 or out.shape[1] != len(data.classes):
        width = out.shape[1] if out.ndim == 2 else tuple(out.shape[1:])
        raise TrainingError(f"the model outputs {width} classes but {data.name} has {len(data.classes)}: "
                            f"build it with {param('num_classes', len(data.classes))}")
