"""How a model is called: its family, and the example arguments of one forward pass.

A classifier takes one image batch. torchvision's detection models take a list of images
(and also a batch, which kshare's fit feeds them), optical-flow models take two batches, and a
user's own model may take anything: `example_inputs` (a tensor, a tuple of arguments, or a
list, as for detection) says how it is called. Without it, the family of a known model picks
the example; everything else gets one random batch of `input_size`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kshare.errors import InputSizeError, param

FAMILIES = ("classification", "detection", "segmentation", "video", "optical_flow")
_TORCHVISION_FAMILIES = {  # torchvision.models.<package> -> family
    "detection": "detection",
    "segmentation": "segmentation",
    "video": "video",
    "optical_flow": "optical_flow",
}


def family_of(model: nn.Module) -> str:
    """`detection`, `segmentation`, `video`, `optical_flow` for torchvision's models of those kinds
    (found from the class's module, so a model the user built is recognised too), else
    `classification`."""
    parts = type(model).__module__.split(".")
    if parts[:2] == ["torchvision", "models"] and len(parts) > 2:
        return _TORCHVISION_FAMILIES.get(parts[2], "classification")
    return "classification"


def _reference(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)


def random_batch(model: nn.Module, input_size: tuple[int, ...], seed: int = 0, batch: int = 1) -> torch.Tensor:
    """A fixed random batch of `input_size` on the model's device and in its dtype."""
    device, dtype = _reference(model)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *input_size), generator=gen).to(device=device, dtype=dtype)


def example_call(model: nn.Module, input_size: tuple[int, ...], example_inputs: Any = None) -> tuple[Any, ...]:
    """The positional arguments of one example forward pass (see the module docstring): a tuple
    `example_inputs` is the arguments, anything else (a tensor, a list) the one argument."""
    if example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        if not args or not any(isinstance(t, torch.Tensor) for t in tensors_of(args)):
            raise InputSizeError(f"{param('example_inputs')} holds no tensor: give a tensor, a tuple of the "
                                 "model's arguments, or a list of images")
        return args
    family = family_of(model)
    x = random_batch(model, input_size)
    if family == "detection":
        return ([x[0]],)
    if family == "optical_flow":
        return (x, random_batch(model, input_size, seed=1))
    return (x,)


def tensors_of(value: Any) -> list[torch.Tensor]:
    """Every tensor of a nested value (tensors, tuples, lists, dicts, an output with `.logits`), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_of(v)]
    if hasattr(value, "logits"):
        return tensors_of(value.logits)
    return []


def size_of_call(args: tuple[Any, ...]) -> tuple[int, ...]:
    """The per-example input size of a call's first image: a batch tensor loses its batch
    dimension; the images of a list (detection) are one example each already."""
    first = args[0]
    if isinstance(first, torch.Tensor):
        return tuple(first.shape[1:])
    return tuple(tensors_of(first)[0].shape) if isinstance(first, (list, tuple)) and tensors_of(first) \
        else tuple(tensors_of(args)[0].shape[1:])
