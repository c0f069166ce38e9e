"""kshare: retrofit inter-layer kernel sharing onto existing PyTorch CNNs."""

from kshare._version import __version__
from kshare.api import Analysis, analyze, plan
from kshare.calibrate import recalibrate_bn
from kshare.checkpoint import load, save
from kshare.data import ImageData, load_data
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
    TrainingError,
    WeightsError,
)
from kshare.export import export_onnx, export_safetensors
from kshare.graph import ConvSite, Inspection, inspect_model
from kshare.plan import Group, SharingPlan, Totals, Unshared
from kshare.policy import Policy, build_plan
from kshare.relax import Relaxation, fold
from kshare.signature import Signature
from kshare.surgery import plan_of, tie, untie
from kshare.train import TrainConfig, evaluate, finetune
from kshare.zoo import ModelSpec, load_model

__all__ = [
    "Analysis",
    "CheckpointError",
    "ConvSite",
    "DataError",
    "ExportError",
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
    "Relaxation",
    "SharingPlan",
    "Signature",
    "Totals",
    "TrainConfig",
    "TrainingError",
    "Unshared",
    "WeightsError",
    "__version__",
    "analyze",
    "build_plan",
    "evaluate",
    "export_onnx",
    "export_safetensors",
    "finetune",
    "fold",
    "inspect_model",
    "load",
    "load_data",
    "load_model",
    "plan",
    "plan_of",
    "recalibrate_bn",
    "save",
    "tie",
    "untie",
]
