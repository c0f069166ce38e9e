"""kshare: retrofit inter-layer kernel sharing onto existing PyTorch CNNs."""

from kshare.api import Analysis, analyze, plan
from kshare.errors import (
    InputSizeError,
    InspectError,
    KShareError,
    ModelBuildError,
    ModelNotFoundError,
    PlanError,
    PolicyError,
    WeightsError,
)
from kshare.graph import ConvSite, Inspection, inspect_model
from kshare.plan import Group, SharingPlan, Totals, Unshared
from kshare.policy import Policy, build_plan
from kshare.signature import Signature
from kshare.zoo import ModelSpec, load_model

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "ConvSite",
    "Group",
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
    "SharingPlan",
    "Signature",
    "Totals",
    "Unshared",
    "WeightsError",
    "analyze",
    "build_plan",
    "inspect_model",
    "load_model",
    "plan",
]
