"""Training: data in memory, the fine-tune loop, evaluation and BatchNorm recalibration. Uses
io (checkpoints each epoch) and surgery (the aliasing is verified); reports through `logging`
and `kshare.progress` callbacks, never by printing."""

from kshare.training.calibrate import batch_norms, recalibrate_bn
from kshare.training.data import Adapter, ImageData, input_channels, load_data
from kshare.training.loop import TrainConfig, check_classes, evaluate, finetune, resume_state
from kshare.training.runtime import Runtime, runtime, shutdown

__all__ = ["Adapter", "ImageData", "Runtime", "TrainConfig", "batch_norms", "check_classes", "evaluate", "finetune",
           "input_channels", "load_data", "recalibrate_bn", "resume_state", "runtime", "shutdown"]
