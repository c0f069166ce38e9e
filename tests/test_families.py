"""torchvision's detection, segmentation, video and optical-flow models by name; models called
with more than one image batch (`example_inputs`); fidelity on dict and list outputs (per pixel,
matched boxes, feature maps); the fit when a conv runs several times per forward; ONNX of a
tied segmentation model."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import kshare
from kshare.analysis.calls import family_of
from kshare.cli import app
from kshare.errors import DataError, InputSizeError, InspectError, ModelBuildError
from kshare.fit.outputs import BoxTally, take_apart
from kshare.models.zoo import catalog, load_model, resolve

DETECTOR = "ssdlite320_mobilenet_v3_large"
SEGMENTER = "lraspp_mobilenet_v3_large"


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore")


def cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.output


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 unlabelled pictures (JPEG, several sizes) with shapes in them, as a user's folder."""
    folder = tmp_path_factory.mktemp("photos")
    gen = torch.Generator().manual_seed(0)
    for i in range(24):
        h, w = 64 + 8 * (i % 3), 80 - 8 * (i % 2)
        pixels = torch.rand(3, 1, 1, generator=gen) * 150 + torch.rand(3, h, w, generator=gen) * 60
        y, x = int(torch.randint(0, h // 2, (1,), generator=gen)), int(torch.randint(0, w // 2, (1,), generator=gen))
        pixels[:, y : y + h // 3, x : x + w // 3] += 60
        Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()).save(folder / f"{i}.jpg")
    return folder


def test_every_family_is_known_by_name_and_builds_offline() -> None:
    refs = set(catalog())
    for name in ("retinanet_resnet50_fpn", "deeplabv3_resnet50", "fasterrcnn_mobilenet_v3_large_fpn",
                 "r3d_18", "raft_small", DETECTOR, SEGMENTER):
        assert f"torchvision:{name}" in refs and resolve(name).source == "torchvision"
    model, _ = load_model(SEGMENTER)  # would fetch ImageNet backbone weights without weights_backbone=None
    assert family_of(model) == "segmentation"
    assert family_of(load_model(DETECTOR)[0]) == "detection"
    with pytest.raises(ModelBuildError, match="never downloads"):
        load_model(SEGMENTER, {"weights_backbone": "IMAGENET1K_V1"})


def test_the_cli_analyses_detection_and_segmentation_models_by_name() -> None:
    for name in (DETECTOR, SEGMENTER):
        code, out, _ = cli("analyze", name, "-g", "stage", "--json")
        assert code == 0, out
        plan = json.loads(out)
        assert plan["groups"] and plan["totals"]["params_after"] < plan["totals"]["params_before"]
    code, _, output = cli("analyze", SEGMENTER, "-k", "weights_backbone='IMAGENET1K_V1'")
    assert code == 2 and output.count("error:") == 1 and "never downloads" in output


class TwoInputs(nn.Module):
    """A user's model called with two image batches (a stereo pair)."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(3, 8, 3, padding=1)
        self.right = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.cat([self.left(a), self.right(b)], 1))


def test_example_inputs_say_how_a_model_is_called() -> None:
    model = TwoInputs()
    a = torch.randn(1, 3, 20, 24)
    analysis = kshare.analyze(model, "all", example_inputs=(a, a))
    assert analysis.inspection.input_size == (3, 20, 24)
    assert [s.input_shape for s in analysis.inspection.sites][:2] == [(1, 3, 20, 24)] * 2
    assert [g.members for g in analysis.plan.groups] == [("left", "right")]
    with pytest.raises(InspectError, match="example_inputs"):
        kshare.analyze(model, "all", input_size=(3, 20, 24))  # called with one batch: it fails, and says why
    tied = kshare.tie(copy.deepcopy(model), "all", example_inputs=(a, a))
    assert tied.left.weight is tied.right.weight
    # a detection model takes a list of images; optical flow two batches: both picked by default
    detector, _ = load_model(DETECTOR)
    by_default = kshare.analyze(detector, "stage")
    listed = kshare.analyze(detector, "stage", example_inputs=[torch.randn(3, 224, 224)])
    assert by_default.inspection.sites == listed.inspection.sites and by_default.plan.groups == listed.plan.groups
    flow, _ = load_model("raft_small")
    assert kshare.analyze(flow, "stage", input_size=(3, 128, 128)).plan.groups
    for empty in ((), ([],), {"images": None}):  # nothing to call the model with: said, not a crash
        with pytest.raises(InputSizeError, match=r"example_inputs.*holds no tensor"):
            kshare.analyze(model, "all", example_inputs=empty)


def test_an_optical_flow_fit_is_refused_with_a_reason() -> None:
    flow, _ = load_model("raft_small")
    with pytest.raises(DataError, match="two image batches"):
        kshare.retrofit(flow, "stage", torch.rand(4, 3, 64, 64))
    assert kshare.plan_of(flow) is None  # refused before anything changed


def test_matched_boxes_count_labels_overlap_and_scores() -> None:
    theirs = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([1, 2]),
              "scores": torch.tensor([0.9, 0.8])}
    same = BoxTally()
    same.add(theirs, theirs)
    assert same.agreement == 1.0 and same.iou == pytest.approx(2.0) and same.score_gap == 0.0
    moved = {"boxes": torch.tensor([[0.0, 0, 10, 8], [20, 20, 30, 30]]), "labels": torch.tensor([1, 3]),
             "scores": torch.tensor([0.7, 0.8])}
    tally = BoxTally()
    tally.add(moved, theirs)
    assert tally.matched == 1 and tally.located == 2  # the second box has another label
    assert tally.agreement == pytest.approx(0.5) and tally.location_agreement == 1.0
    assert tally.iou == pytest.approx(0.8) and tally.score_gap == pytest.approx(0.2)
    nothing = BoxTally()
    nothing.add({k: v[:0] for k, v in theirs.items()}, theirs)
    assert nothing.agreement == 0.0 and nothing.matched == 0


def test_segmentation_outputs_are_compared_per_pixel() -> None:
    out = {"out": torch.randn(2, 5, 6, 7)}
    reading = take_apart(out, 2)
    assert reading.kind == "pixels" and reading.scores is not None and reading.scores.shape == (2 * 6 * 7, 5)
    model, _ = load_model(SEGMENTER, {"num_classes": 5})
    model.eval()
    batches = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))]
    itself = kshare.measure_fidelity(model, model, batches)
    assert itself.kind == "pixels" and itself.top1 == 1.0 and itself.kl == pytest.approx(0.0, abs=1e-9)
    assert itself.feature_error == 0.0 and itself.images == 2
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier.low_classifier.weight.mul_(-1)  # the head's decisions change, the backbone does not
    moved = kshare.measure_fidelity(other, model, batches)
    assert moved.kl > 0 and moved.output_error > 0 and moved.feature_error == 0.0
    assert "pixel agreement" in moved.line()


class TwoLevelHead(nn.Module):
    """A head conv applied to two feature levels in one forward (a detector's), plus a conv
    isomorphic to it that a policy groups with it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 8, 3, padding=1)
        self.late = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = torch.relu(self.stem(x))
        small = torch.relu(self.down(big))
        a, b = self.head(big), self.head(small)
        return self.late(torch.relu(a)).mean((2, 3)) + b.mean((2, 3))


@pytest.mark.parametrize("mode", ["sequential", "oneshot"])
def test_a_conv_run_several_times_per_forward_is_fitted(mode: str) -> None:
    """Each call of the head pairs with the same call in the original (they see maps of different
    sizes): with `late` a copy of `head`, the fitted shared kernel is that kernel."""
    torch.manual_seed(0)
    model = TwoLevelHead().eval()
    with torch.no_grad():
        model.late.weight.copy_(model.head.weight)
        model.late.bias.copy_(model.head.bias)
    expected = model.head.weight.detach().clone()
    images = [torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(2))]
    report = kshare.retrofit(model, "all", images, include=("head", "late"),
                             fit=kshare.FitConfig(mode=mode, recalibrate=False), held_out=0)
    assert model.head.weight is model.late.weight
    assert torch.allclose(model.head.weight, expected, atol=1e-4, rtol=1e-4), report


def test_detection_and_segmentation_retrofit_from_a_folder(photos: Path, tmp_path: Path) -> None:
    """`apply -g stage --fit data` on unlabelled pictures: tied, saved, and the fidelity report
    that fits these outputs (per pixel; matched boxes and feature maps)."""
    for name, words in ((SEGMENTER, "pixel agreement"), (DETECTOR, "box agreement")):
        out = tmp_path / f"{name}.pt"
        code, _, output = cli("apply", name, "-g", "stage", "--fit", "data", "--data", f"images:{photos}",
                              "--image-size", 64, "--held-out", 6, "--out", out)
        assert code == 0, output
        assert f"fitted (sequential): {words}" in output and "feature error" in output
        model = kshare.load(out)
        plan = kshare.plan_of(model)
        assert plan is not None and plan.totals.params_after < plan.totals.params_before
        code, info, _ = cli("info", out, "--json")
        assert code == 0
        steps = json.loads(info)["retrofit"]["steps"]
        measured = [s["fidelity"] for s in steps if s.get("fidelity")]
        assert measured and all(f["kind"] == ("pixels" if name == SEGMENTER else "boxes") for f in measured)
        assert all(f["feature_error"] >= 0 for f in measured)


def test_a_tied_segmentation_model_exports_with_shared_kernels_once(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from kshare.io.payload import state_bytes

    model, _ = load_model(SEGMENTER, {"num_classes": 4})
    kshare.tie(model, "stage")
    path = kshare.export_onnx(model, tmp_path / "seg.onnx", input_size=(3, 64, 64))
    assert path.stat().st_size / state_bytes(model.state_dict()) <= 1.05
    x = torch.randn(1, 3, 64, 64)
    got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(x)["out"]
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


def test_a_tied_detector_exports_and_runs_in_onnx_runtime(tmp_path: Path) -> None:
    """torchvision's own detector export (one image in, its boxes out) on a tied Faster R-CNN
    with trained-like BatchNorm statistics and every box kept (random weights score all boxes
    alike otherwise): shared kernels stored once, and ONNX Runtime finds the boxes PyTorch does."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from kshare.fit.batchnorm import recalibrate_on
    from kshare.io.payload import state_bytes

    torch.manual_seed(0)
    model, _ = load_model("fasterrcnn_mobilenet_v3_large_320_fpn",
                          {"min_size": 160, "max_size": 160, "box_score_thresh": 0.0, "num_classes": 5})
    kshare.tie(model, "stage")
    recalibrate_on(model, [torch.rand(4, 3, 160, 160, generator=torch.Generator().manual_seed(1))])
    path = kshare.export_onnx(model, tmp_path / "det.onnx", input_size=(3, 160, 160))
    assert path.stat().st_size / state_bytes(model.state_dict()) <= 1.05
    session = ort.InferenceSession(str(path))
    assert [o.name for o in session.get_outputs()] == ["boxes", "labels", "scores"]
    tally = BoxTally()
    for seed in range(2):  # the image size varies (dynamic height and width)
        x = torch.rand(3, 160, 128 + 32 * seed, generator=torch.Generator().manual_seed(seed))
        got = dict(zip(("boxes", "labels", "scores"), session.run(None, {"input": x.numpy()}), strict=True))
        with torch.no_grad():
            want = model.eval()([x])[0]
        assert len(want["boxes"]) > 10
        tally.add({k: torch.from_numpy(v) for k, v in got.items()}, want)
        assert torch.allclose(torch.from_numpy(got["scores"]).sort().values, want["scores"].sort().values, atol=1e-4)
    assert tally.agreement >= 0.95 and tally.iou / tally.matched >= 0.99  # near-tied scores may swap a box


def test_a_timm_features_only_backbone_is_analysed_fitted_and_measured() -> None:
    """timm's `features_only` backbones (a list of feature maps out): analysed by name, fitted from
    images alone, and measured by the relative error of the maps, group by group."""
    code, out, _ = cli("analyze", "timm:resnet18", "-k", "features_only=true", "-k", "out_indices=[2,3,4]",
                       "-g", "stage", "--input-size", "3,32,32", "--json")
    assert code == 0, out
    totals = json.loads(out)["totals"]
    assert totals["params_after"] < totals["params_before"]
    from kshare.fit.batchnorm import recalibrate_on
    from kshare.fit.fidelity import measure_fidelity

    torch.manual_seed(0)
    model, _ = load_model("timm:resnet18", {"features_only": True, "out_indices": (2, 3, 4), "zero_init_last": False})
    images = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    recalibrate_on(model, [images])  # trained-like statistics: random ones make every block an identity
    original = copy.deepcopy(model).eval()
    assert measure_fidelity(original, original, [images[:4]]).output_error == 0.0
    report = kshare.retrofit(model, "stage", images, held_out=8, fit=kshare.FitConfig(recalibrate=False))
    fidelity = report.steps[-1].fidelity
    assert fidelity is not None and fidelity.kind == "features" and fidelity.kl == fidelity.output_error > 0.0
    assert "output error" in fidelity.line() and "top-1" not in fidelity.line()
    assert [c.kind for c in report.costs] == ["features"] * len(report.plan.groups)
    assert all(c.kl > 0.0 and c.top1 == 0.0 for c in report.costs)  # no decisions, so no agreement taken


def test_the_costs_table_names_what_was_measured() -> None:
    from kshare.cli.report import costs_table

    def header(kind: str) -> list[str]:
        cost = {"group": "g0", "params_saved": 1000, "kl": 0.5, "top1": 0.25, "kind": kind}
        return [str(c.header) for c in costs_table([cost]).columns]

    assert header("classes")[2:4] == ["KL added", "top-1 agreement taken"]
    assert header("pixels")[2:4] == ["KL added", "pixel agreement taken"]
    assert header("boxes")[2:] == ["feature error added", "box agreement taken", "feature error per M saved"]
    assert header("features")[2:] == ["output error added", "output error per M saved"]
