"""What a tied model costs once deployed: ONNX Runtime session memory and latency, tied against
untied, measured side by side in one run.

    python benchmarks/onnx_memory.py [--models resnet50:all,resnet50:stage,mobilenet_v3_large:stage]
                                     [--runs 20] [--size 224]

Each model gets BatchNorm statistics like a trained network's (random init has none to fold,
and hid this), is exported with `kshare.export_onnx` untied and tied in each of its forms
(`affine`, `inputs`, `plain`), and each file is opened in a fresh process
(`kshare.io.deployed.measure_session`, what `kshare export` prints): a *default* session
(ORT_ENABLE_ALL, one intra-op thread), one warm-up run, then the median latency of `--runs` runs
of one image; `--repeats` fresh processes per file, the median of each figure kept.
Memory: resident memory the process gained from creating the session and running it once.
Two more rows per model: the untied and the `affine` file as ONNX Runtime saves them after its
own optimisations (`optimized_model_filepath`, offline optimisation; the saved layout is this
CPU's), to show what a default session holds twice.
The ratio that matters: tied session memory against the untied session's scaled by the
tied/untied unique-byte ratio (1.00: the saving survives the session), and tied latency
against untied. And the int8 files (`kshare.quantize.export_int8`, calibrated on 32 random
pictures: sizes and sessions only, no fidelity) of both, against the untied fp32 file, with
their session memory and latency. Prints Markdown tables
(docs/benchmarks.md keeps the last ones).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import torch

import kshare
from kshare.io.deployed import measure_session
from kshare.io.payload import state_bytes
from kshare.models.zoo import load_model
from kshare.quantize import export_int8


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics and affine terms as a trained network has them (seeded)."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


def probe(path: Path, size: int, runs: int, repeats: int = 1) -> dict[str, float]:
    """Session memory and median latency of the ONNX file at `path`, each the median over
    `repeats` fresh processes (one process's memory varies by about 10 MiB)."""
    costs = [measure_session(path, (1, 3, size, size), runs=runs) for _ in range(repeats)]
    return {"memory": statistics.median(c.memory_bytes for c in costs),
            "latency": statistics.median(c.latency_s for c in costs)}


def optimised_offline(path: Path) -> Path:
    """The file ONNX Runtime writes after its default optimisations of `path`."""
    import onnxruntime as ort

    target = path.with_suffix(".ort-optimised.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50:all,resnet50:stage,mobilenet_v3_large:stage")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows, sizes = [], []
    shape = (3, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.models.split(","):
            name, policy = item.split(":")
            torch.manual_seed(0)
            untied = trained_like(load_model(name, {}, None)[0])
            tied = kshare.tie(copy.deepcopy(untied), policy, init="mean")
            unique = state_bytes(tied.state_dict()) / state_bytes(untied.state_dict())
            files = {"untied": kshare.export_onnx(untied, Path(tmp) / f"{name}.onnx", input_size=shape,
                                                   deduplicate=False)}
            for form in kshare.io.onnx_export.FORMS:
                files[f"tied, `{form}`"] = kshare.export_onnx(tied, Path(tmp) / f"{name}.{policy}.{form}.onnx",
                                                              input_size=shape, form=form)
            offline = {"untied, ORT-optimised offline": optimised_offline(files["untied"]),
                       "tied, `affine`, ORT-optimised offline": optimised_offline(files["tied, `affine`"])}
            pictures = (torch.rand(48, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
                        * 255).to(torch.uint8)  # calibration for file sizes only: no fidelity is claimed
            for kind, model in (("untied", untied), ("tied", tied)):
                found8 = export_int8(model, Path(tmp) / f"{name}.{policy}.{kind}.int8.onnx", pictures, calib_images=32,
                                     held_out=0)
                session8 = probe(found8.path, args.size, args.runs, args.repeats)
                sizes.append((f"{name} `{policy}`" if kind == "tied" else name, kind, found8.file_bytes,
                              found8.file_bytes / files["untied"].stat().st_size, found8.shared_int8,
                              session8["memory"], session8["latency"]))
            files |= offline
            found = {k: probe(p, args.size, args.runs, args.repeats) for k, p in files.items()}
            for kind, path in files.items():
                f = found[kind]
                base = found["untied, ORT-optimised offline" if "offline" in kind else "untied"]
                rows.append((f"{name} `{policy}`" if not kind.startswith("untied") else name, kind,
                             path.stat().st_size, f["memory"],
                             f["memory"] / (base["memory"] * (unique if kind.startswith("tied") else 1.0)),
                             f["latency"], f["latency"] / base["latency"]))
                print(f"{name} {policy} {kind}: file {path.stat().st_size / 2**20:.1f} MiB, session "
                      f"+{f['memory'] / 2**20:.1f} MiB, {f['latency'] * 1e3:.1f} ms", flush=True)
    print("\n| model | file | file MiB | session MiB | session / (untied x unique ratio) | ms per image | "
          "latency / untied |\n| --- | --- | --- | --- | --- | --- | --- |")
    for model, kind, size, memory, ratio, latency, slower in rows:
        print(f"| {model} | {kind} | {size / 2**20:.1f} | {memory / 2**20:.1f} | {ratio:.2f} | {latency * 1e3:.1f} | "
              f"{slower:.2f} |")
    print("\n| model | int8 file of | MiB | / untied fp32 file | shared kernels, one int8 tensor each | "
          "session MiB | ms per image |\n| --- | --- | --- | --- | --- | --- | --- |")
    for model, kind, size, ratio, shared, memory, latency in sizes:
        print(f"| {model} | {kind} | {size / 2**20:.1f} | {ratio:.3f} | {shared} | {memory / 2**20:.1f} | "
              f"{latency * 1e3:.1f} |")


if __name__ == "__main__":
    main()
