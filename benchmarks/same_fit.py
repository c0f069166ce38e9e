"""Do two revisions of kshare fit the same kernels? A check for changes that should not move a
figure (a refactor, a faster statistics pass).

    python benchmarks/same_fit.py REV            # e.g. the commit before a layout change

Builds each case with a fixed seed, fits it with `kshare.fit_and_tie` on digits (one-shot and
sequential; sequential with 5 steps of block reconstruction), once with this checkout and once
with REV (a `git worktree` in a temporary folder, run in its own process), and prints the
largest absolute difference of every state tensor, case by case. The cases are random-init
models: the same arithmetic either way, whatever the weights learned.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

FIT_CASES = '''
import sys, torch, kshare
sys.path.insert(0, "tests")
from conftest import make_residual_bn
train = kshare.load_data("digits", "train")
cases = [("residual", lambda: make_residual_bn(in_chans=1), "all", None),
         ("convmixer", lambda: kshare.load_model("kshare:convmixer_16_3",
                                                 {"in_chans": 1, "kernel_size": 3, "patch_size": 1})[0], "all", None),
         ("resnet18", lambda: kshare.load_model("resnet18", {"num_classes": 10})[0], "stage", 32)]
out = {}
for name, build, policy, size in cases:
    for mode, steps in (("oneshot", 0), ("sequential", 0), ("sequential", 5)):
        torch.manual_seed(0)
        net = build()
        plan = kshare.plan(net, policy, input_size=(3, size, size) if size else None)
        kshare.fit_and_tie(net, plan, train, kshare.FitConfig(mode=mode, images=128, reconstruct=steps),
                           image_size=size)
        out[f"{name} {mode} reconstruct={steps}"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
torch.save(out, sys.argv[1])
'''


def fitted(root: Path, target: Path) -> dict[str, dict[str, torch.Tensor]]:
    subprocess.run([sys.executable, "-c", FIT_CASES, str(target)], cwd=root, check=True,
                   env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, stderr=subprocess.DEVNULL)
    return torch.load(target, weights_only=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the git revision to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), args.rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            before = fitted(other, Path(tmp) / "before.pt")
            after = fitted(ROOT, Path(tmp) / "after.pt")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=False)
    worst_of_all = 0.0
    for case, state in before.items():
        worst = max((float((state[k].double() - after[case][k].double()).abs().max()) for k in state
                     if state[k].numel()), default=0.0)
        worst_of_all = max(worst_of_all, worst)
        print(f"{case:<40} largest difference {worst:.3g}")
    print(f"largest difference over every case: {worst_of_all:.3g} (the bar: 1e-6)")
    return 0 if worst_of_all <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
