"""kshare: retrofit inter-layer kernel sharing onto existing PyTorch CNNs.

The layers, bottom up (each imports only those below it): `kshare.kernels` (shared-kernel
arithmetic), `kshare.analysis` (signatures, inspection), `kshare.models` (building models by
name), `kshare.planning` (configs, planners, the plan data), `kshare.surgery` (apply a plan,
relaxed members, fold), `kshare.io` (checkpoints, exports), `kshare.data` (where images come
from, how a model is fed), `kshare.fit` (shared kernels from data, BatchNorm recalibration,
block reconstruction, fidelity), `kshare.training` (fine-tuning), then `kshare.retrofit` (the
one pipeline), `kshare.search` (the plan for a fidelity target), `kshare.api` and `kshare.sweep`,
and the CLI (`kshare.cli`) on top. This module re-exports what users call.
"""

from kshare._version import __version__
from kshare.analysis import ConvSite, Inspection, Signature, inspect_model
from kshare.api import Analysis, analyze, plan, tie
from kshare.data import ImageData, as_image_data, load_data
from kshare.errors import (
    CheckpointError,
    DataError,
    ExportError,
    InputSizeError,
    InspectError,
    KShareError,
    ModelBuildError,
    ModelNotFoundError,
    PlanError,
    PolicyError,
    SearchError,
    TrainingError,
    WeightsError,
)
from kshare.fit import Fidelity, FitConfig, FitReport, measure_fidelity, recalibrate_bn
from kshare.io import export_onnx, export_safetensors, load, save
from kshare.models.zoo import ModelSpec, load_model
from kshare.planning import (
    BudgetConfig,
    Group,
    Policy,
    PositionalConfig,
    Relaxation,
    SharingConfig,
    SharingPlan,
    Totals,
    Unshared,
    build_plan,
    parse_config,
)
from kshare.retrofit import RecalibrateConfig, RetrofitReport, Step, fit_and_tie, retrofit
from kshare.search import SearchReport, Target, Trial, search_plan
from kshare.surgery import apply_plan, fold, plan_of, untie
from kshare.training import TrainConfig, evaluate, finetune
from kshare.training.distill import DistillConfig, DistillEpoch

__all__ = [
    "Analysis",
    "BudgetConfig",
    "CheckpointError",
    "ConvSite",
    "DataError",
    "DistillConfig",
    "DistillEpoch",
    "ExportError",
    "Fidelity",
    "FitConfig",
    "FitReport",
    "Group",
    "ImageData",
    "InputSizeError",
    "InspectError",
    "Inspection",
    "KShareError",
    "ModelBuildError",
    "ModelNotFoundError",
    "ModelSpec",
    "PlanError",
    "Policy",
    "PolicyError",
    "PositionalConfig",
    "RecalibrateConfig",
    "Relaxation",
    "RetrofitReport",
    "SearchError",
    "SearchReport",
    "SharingConfig",
    "SharingPlan",
    "Signature",
    "Step",
    "Target",
    "Totals",
    "TrainConfig",
    "TrainingError",
    "Trial",
    "Unshared",
    "WeightsError",
    "__version__",
    "analyze",
    "apply_plan",
    "as_image_data",
    "build_plan",
    "evaluate",
    "export_onnx",
    "export_safetensors",
    "finetune",
    "fit_and_tie",
    "fold",
    "inspect_model",
    "load",
    "load_data",
    "load_model",
    "measure_fidelity",
    "parse_config",
    "plan",
    "plan_of",
    "recalibrate_bn",
    "retrofit",
    "save",
    "search_plan",
    "tie",
    "untie",
]
