"""Resolve a model name to a freshly built `nn.Module`, never downloading anything.

Accepted names, tried in this order for a bare name:

- `kshare:NAME`: the paper's CIFAR models (`convmixer_256_16`, `se_resnet_cifar_d2`, and
  `_shared` variants; any `convmixer_DIM_DEPTH` or `se_resnet_cifar_dN` builds);
- `torchvision:NAME` (a bare name that torchvision knows is torchvision's, e.g. `resnet50`,
  `retinanet_resnet50_fpn`, `deeplabv3_resnet50`, `r3d_18`, `raft_small`: every family);
- `timm:NAME` (a bare name only timm knows, e.g. `convnext_atto`, goes to timm);
- `package.module:factory` and `path/to/file.py:factory` for the user's own models.

Models are built with random init; `kshare.models.weights` loads a local state dict on top.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kshare.analysis.signature import is_conv
from kshare.errors import ModelBuildError, ModelNotFoundError, param
from kshare.models.recipe import recipe_of
from kshare.models.weights import load_weights

PREFIXES = ("kshare", "torchvision", "timm")
# `module:Class` specs under these packages build a model class of theirs: no code of anyone else.
TRUSTED_MODEL_MODULES = ("torchvision.models.", "timm.models.")
# Model arguments that would make a factory read or fetch weights by itself, outside `safe_load`.
LOADING_KWARGS = ("checkpoint_path", "pretrained_cfg_overlay", "cache_dir")
PAPER_MODELS = (
    "convmixer_256_16",
    "convmixer_256_8",
    "se_resnet_cifar_d2",
    "se_resnet_cifar_d3",
    "se_resnet_cifar_d4",
    "se_resnet_cifar_d6",
    "se_resnet_cifar_d8",
    "se_resnet_cifar_d10",
)
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_CONVMIXER = re.compile(r"convmixer_(\d+)_(\d+)(_shared)?")
_SERESNET = re.compile(r"se_resnet_cifar_d(\d+)(_shared)?")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: enough to build the same architecture again."""

    source: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """The unambiguous name, e.g. `torchvision:resnet50` or `my_pkg.nets:small_cnn`."""
        return f"{self.source}:{self.name}" if self.source in PREFIXES else self.name

    @property
    def runs_user_code(self) -> bool:
        """Whether building it imports or calls code outside kshare, torchvision and timm's model
        classes: such a spec, read from a file, must not be built unless the user trusts the file."""
        if self.source in PREFIXES:
            return False
        if self.source != "python":
            return True
        module, _, attr = self.name.rpartition(":")
        if not any(module == pkg.rstrip(".") or module.startswith(pkg) for pkg in TRUSTED_MODEL_MODULES):
            return True
        try:  # a module inside torchvision's or timm's model packages: importing it runs only theirs
            target = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            return True
        return not (isinstance(target, type) and issubclass(target, nn.Module))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        return cls(str(data["source"]), str(data["name"]), dict(data.get("kwargs") or {}))


_SPEC_ATTR = "_kshare_spec"


def spec_of(model: nn.Module) -> ModelSpec | None:
    """Where `model` came from, if `load_model` (or `kshare.load`) built it."""
    return getattr(model, _SPEC_ATTR, None)


def attach_spec(model: nn.Module, spec: ModelSpec) -> nn.Module:
    object.__setattr__(model, _SPEC_ATTR, spec)
    return model


def kshare_names() -> list[str]:
    return [n for base in PAPER_MODELS for n in (base, base + "_shared")]


def _kshare_factory(name: str) -> Callable[..., nn.Module] | None:
    from kshare.models import paper

    if m := _CONVMIXER.fullmatch(name):
        dim, depth, shared = int(m[1]), int(m[2]), bool(m[3])
        return lambda **kw: paper.convmixer(dim, depth, shared=shared, **kw)
    if m := _SERESNET.fullmatch(name):
        depth, shared = int(m[1]), bool(m[2])
        return lambda **kw: paper.se_resnet_cifar(depth, shared=shared, **kw)
    return None


def _torchvision_names() -> list[str]:
    """Every torchvision builder: classification, detection, segmentation, video, optical flow
    and the quantisable classifiers."""
    import torchvision

    return list(torchvision.models.list_models())


def _torchvision_factory(name: str) -> Callable[..., nn.Module]:
    """torchvision's builder, with what it would download by default switched off: detection and
    segmentation builders fetch ImageNet backbone weights unless `weights_backbone=None`."""
    import inspect

    import torchvision

    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" not in inspect.signature(builder).parameters:
        return builder

    def build_offline(**kwargs: Any) -> nn.Module:
        if kwargs.setdefault("weights_backbone", None) is not None:
            raise ModelBuildError(
                "kshare never downloads weights: drop weights_backbone (the backbone starts from random init, "
                f"or from the local state dict passed as {param('weights')})"
            )
        return builder(**kwargs)

    return build_offline


def _timm_is_model(name: str) -> bool:
    try:
        import timm
    except ImportError:  # pragma: no cover
        return False
    return bool(timm.is_model(name))


def catalog() -> list[str]:
    """Every model kshare can build by name (user models aside), as unambiguous refs."""
    refs = [f"kshare:{n}" for n in kshare_names()]
    tv = _torchvision_names()
    refs += [f"torchvision:{n}" for n in tv]
    try:
        import timm

        seen = set(tv)
        refs += [f"timm:{n}" for n in timm.list_models() if n not in seen]
    except ImportError:  # pragma: no cover
        pass
    return refs


def all_names() -> list[str]:
    """The bare names of `catalog()` (what a close-match hint suggests)."""
    return [ref.partition(":")[2] for ref in catalog()]


def _unknown(name: str, pool: list[str] | None = None) -> ModelNotFoundError:
    close = difflib.get_close_matches(name, pool if pool is not None else all_names(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `kshare models` lists the names"
    return ModelNotFoundError(f"unknown model {name!r}{hint}")


def resolve(name: str, kwargs: Mapping[str, Any] | None = None) -> ModelSpec:
    """Turn a user-facing name into a `ModelSpec` (without building it)."""
    kwargs = dict(kwargs or {})
    prefix, sep, rest = name.partition(":")
    if sep and prefix in PREFIXES:
        source, bare = prefix, rest
        known = {
            "kshare": lambda: _kshare_factory(bare) is not None,
            "torchvision": lambda: bare in _torchvision_names(),
            "timm": lambda: _timm_is_model(bare),
        }[source]()
        if not known:
            pool = {"kshare": kshare_names, "torchvision": _torchvision_names}.get(source, all_names)()
            raise _unknown(bare, pool)
        return ModelSpec(source, bare, kwargs)
    if sep:
        source = "file" if prefix.endswith(".py") else "python"
        if not rest.isidentifier() or (source == "python" and not _MODULE.fullmatch(prefix)) \
                or (source == "file" and prefix == ".py"):
            raise ModelNotFoundError(f"bad model reference {name!r}: expected module:factory (a dotted module "
                                     "path and a Python name) or file.py:factory")
        return ModelSpec(source, name, kwargs)
    if _kshare_factory(name) is not None:
        return ModelSpec("kshare", name, kwargs)
    if name in _torchvision_names():
        return ModelSpec("torchvision", name, kwargs)
    if _timm_is_model(name):
        return ModelSpec("timm", name, kwargs)
    raise _unknown(name)


def _user_factory(spec: ModelSpec) -> Callable[..., Any]:
    target, _, attr = spec.name.rpartition(":")
    if spec.source == "file":
        path = Path(target)
        if not path.is_file():
            raise ModelNotFoundError(f"model file not found: {target}")
        mod_name = f"kshare_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ModelNotFoundError(f"cannot import {target} as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise ModelBuildError(f"importing {target} failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ModelNotFoundError(f"cannot import module {target!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelNotFoundError(f"{target} has no callable {attr!r}")
    return factory


def check_spec(spec: ModelSpec) -> None:
    """A spec read from a file may name a model no registry has, or a malformed reference: say so,
    in one line, without importing or calling anything the spec names."""
    if spec.source in PREFIXES:
        resolve(spec.ref)
    elif spec.source in ("python", "file") and ":" in spec.name:
        resolve(spec.name)
    else:
        raise ModelNotFoundError(f"unknown model source {spec.source!r} for {spec.name!r}: expected kshare, "
                                 "torchvision, timm, module:factory or file.py:factory")


def _factory(spec: ModelSpec) -> Callable[..., Any]:
    check_spec(spec)
    if spec.source == "kshare":
        factory = _kshare_factory(spec.name)
        if factory is None:
            raise _unknown(spec.name, kshare_names())
        return factory
    if spec.source == "torchvision":
        return _torchvision_factory(spec.name)
    if spec.source == "timm":
        import timm

        return lambda **kw: timm.create_model(spec.name, pretrained=False, **kw)
    return _user_factory(spec)


def build(spec: ModelSpec) -> nn.Module:
    """Build the architecture with random init; refuse anything that would download."""
    kwargs = dict(spec.kwargs)
    if kwargs.get("pretrained") or kwargs.get("weights") not in (None, False):
        raise ModelBuildError(
            "kshare never downloads weights: drop pretrained/weights and pass a local state dict as "
            f"{param('weights')}"
        )
    kwargs.pop("pretrained", None)
    if loading := [k for k in LOADING_KWARGS if kwargs.get(k) not in (None, "", {})]:
        raise ModelBuildError(
            f"model argument {loading[0]!r} would load weights outside kshare: pass a local state dict as "
            f"{param('weights')} instead"
        )
    factory = _factory(spec)
    try:
        model = factory(**kwargs)
    except ModelBuildError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelBuildError(f"building {spec.ref} failed: {type(exc).__name__}: {first}") from None
    if not isinstance(model, nn.Module):
        raise ModelBuildError(f"{spec.ref} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_kwargs(items: list[str] | None) -> dict[str, Any]:
    """`["num_classes=10", "in_chans=1"]` -> `{"num_classes": 10, "in_chans": 1}`."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ModelBuildError(f"bad model argument {item!r}: expected KEY=VALUE, e.g. num_classes=10")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def default_input_size(model: nn.Module, spec: ModelSpec | None = None) -> tuple[int, ...]:
    """A sensible example input (C,H,W) for the model: what it was trained on (its recipe), its
    own config, else its first conv."""
    recipe = recipe_of(model)
    if recipe is not None:
        return recipe.input_size
    first = next((m for m in model.modules() if is_conv(m)), None)
    chans = int(first.in_channels) if first is not None else 3
    declared = getattr(model, "default_input_size", None)
    if declared is not None:
        return tuple(int(d) for d in declared)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        size = tuple(int(d) for d in cfg["input_size"])
        kwargs = spec.kwargs if spec else {}
        chans = int(kwargs.get("in_chans", size[0]))
        img = kwargs.get("img_size")
        if isinstance(img, int):
            size = (size[0], img, img)
        elif isinstance(img, (tuple, list)) and len(img) == 2:
            size = (size[0], int(img[0]), int(img[1]))
        return (chans, *size[1:])
    if spec is not None and spec.source == "kshare":
        return (chans, 32, 32)
    if spec is not None and spec.name == "inception_v3":
        return (chans, 299, 299)
    ndim = len(first.kernel_size) if first is not None else 2
    return (chans, *{1: (224,), 2: (224, 224), 3: (16, 112, 112)}.get(ndim, (224, 224)))


def load_model(
    name: str, kwargs: Mapping[str, Any] | None = None, weights: str | Path | None = None
) -> tuple[nn.Module, ModelSpec]:
    """Resolve, build and optionally load weights: the one call the CLI needs."""
    spec = resolve(name, kwargs)
    model = attach_spec(build(spec), spec)
    if weights is not None:
        load_weights(model, weights)
    return model, spec
