"""The `kshare` command: parse, call the Python API, render. Errors are one line, exit 2.

The only layer that prints: rich tables (`report`), progress bars (`progress`), plots
(`plots`); the commands live in `plan_commands` and `train_commands`.
"""

from kshare.cli import plan_commands, train_commands  # noqa: F401  (registers the commands)
from kshare.cli.app import app, main

__all__ = ["app", "main"]
