"""Analysis: what a model's convolutions are and how the forward pass uses them. Never
changes the model; imports nothing of kshare but errors and kernel arithmetic."""

from kshare.analysis.inspect import ConvSite, Inspection, ModelStats, inspect_model, model_stats, parse_input_size
from kshare.analysis.signature import MATCH_MODES, Signature, is_conv

__all__ = ["MATCH_MODES", "ConvSite", "Inspection", "ModelStats", "Signature", "inspect_model", "is_conv",
           "model_stats", "parse_input_size"]
