"""Training: fine-tuning only (the loop, distillation, resume, precision, the runtime) and
evaluation. Uses data (batches), fit (the block taps of feature matching), io (checkpoints each
epoch) and surgery (the aliasing is verified); reports through `logging` and `kshare.progress`
callbacks, never by printing."""

from kshare.training.config import TrainConfig
from kshare.training.evaluate import check_classes, evaluate
from kshare.training.loop import finetune
from kshare.training.precision import Setup
from kshare.training.resume import resume_state
from kshare.training.runtime import Runtime, resolve_device, runtime, shutdown

__all__ = ["Runtime", "Setup", "TrainConfig", "check_classes", "evaluate", "finetune", "resolve_device",
           "resume_state", "runtime", "shutdown"]
