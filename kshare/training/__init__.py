"""Training: data in memory, the fine-tune loop, evaluation and BatchNorm recalibration. Uses
io (checkpoints each epoch) and surgery (the aliasing is verified); reports through `logging`
and `kshare.progress` callbacks, never by printing."""

from kshare.training.calibrate import batch_norms, recalibrate_bn
from kshare.training.config import TrainConfig
from kshare.training.data import Adapter, ImageData, adapter_for, input_channels, load_data
from kshare.training.evaluate import check_classes, evaluate
from kshare.training.loop import finetune
from kshare.training.precision import Setup
from kshare.training.resume import resume_state
from kshare.training.runtime import Runtime, resolve_device, runtime, shutdown

__all__ = ["Adapter", "ImageData", "Runtime", "Setup", "TrainConfig", "adapter_for", "batch_norms", "check_classes",
           "evaluate", "finetune", "input_channels", "load_data", "recalibrate_bn", "resolve_device", "resume_state",
           "runtime", "shutdown"]
