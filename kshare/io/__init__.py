"""Files: checkpoints (save, safe load, re-tie), safetensors and ONNX exports. Reads plans and
applies them through the surgery layer; knows nothing of training."""

from kshare.io.checkpoint import load, read, restore, save, summarize
from kshare.io.onnx_export import export_onnx
from kshare.io.payload import CHECKPOINT_FORMAT, checkpoint_payload, dedup_state, state_bytes
from kshare.io.safetensors_io import export_safetensors, read_safetensors

__all__ = ["CHECKPOINT_FORMAT", "checkpoint_payload", "dedup_state", "export_onnx", "export_safetensors", "load",
           "read", "read_safetensors", "restore", "save", "state_bytes", "summarize"]
