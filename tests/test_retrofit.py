"""Data-aware retrofit: statistics, the closed-form fits, the sequential mode, relaxations, and
what a fitted model does on save, load, safetensors, fold and the command line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_residual_bn_used
from torch import nn
from typer.testing import CliRunner

import kshare
from kshare import FitConfig, fit_and_tie
from kshare.cli import app
from kshare.data import adapter_for
from kshare.fit.statistics import GRAM_BLOCK, add_gram, collect, fit_batches, patches
from kshare.kernels import output_error, shared_fit


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_patches_match_unfold_for_every_conv_setting() -> None:
    """The sampled windows are exactly F.unfold's columns, for padding modes, strides, dilation,
    groups and 1-D convs; a gram from `collect` is their product."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2),
             nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.Conv2d(4, 4, 5, padding="same", padding_mode="reflect"),
             nn.Conv2d(4, 6, (1, 3), padding=(0, 1), padding_mode="circular")]
    x = torch.randn(2, 4, 9, 9)
    for conv in convs:
        padded = x
        if conv.padding_mode != "zeros" or conv.padding == "same":
            kh, kw = conv.kernel_size
            pad = (kw // 2, kw // 2, kh // 2, kh // 2)
            padded = F.pad(x, pad, mode=conv.padding_mode if conv.padding_mode != "zeros" else "constant")
            unfolded = F.unfold(padded, conv.kernel_size, conv.dilation, 0, conv.stride)
        else:
            unfolded = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        g = conv.groups
        positions = unfolded.shape[-1]
        expected = unfolded.reshape(2, g, -1, positions).permute(1, 2, 0, 3).reshape(g, -1, 2 * positions)
        got = patches(conv, x)
        torch.testing.assert_close(got, expected)
        # a channels-last map gives the same windows (picked as rows of channels), bit for bit
        last = patches(conv, x.contiguous(memory_format=torch.channels_last))
        assert torch.equal(last, got)
        # a grouped conv's windows come group by group in memory: as a view of the channels-last map, each
        # group's Gram read one float per cache line (a depthwise 5x5 conv's sums ran 15x slower)
        assert g == 1 or last.is_contiguous()
        sampled = torch.tensor([positions - 1, 0, positions // 2])
        assert torch.equal(patches(conv, x, sampled).reshape(g, -1, 2, 3), expected.reshape(g, -1, 2, positions)
                           [..., sampled])
        out = conv(x)  # and the kernel's blocks times the patches are the conv's outputs
        blocks = conv.weight.reshape(g, conv.out_channels // g, -1)
        recon = (blocks @ got).reshape(conv.out_channels, 2, -1).permute(1, 0, 2).reshape(out.shape)
        torch.testing.assert_close(recon + conv.bias.view(1, -1, 1, 1), out, rtol=1e-4, atol=1e-5)
    conv1d = nn.Conv1d(3, 5, 3, padding=1)
    x1 = torch.randn(2, 3, 7)
    blocks = conv1d.weight.reshape(1, 5, -1)
    recon = (blocks @ patches(conv1d, x1)).reshape(5, 2, 7).permute(1, 0, 2) + conv1d.bias.view(1, -1, 1)
    torch.testing.assert_close(recon, conv1d(x1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fan_in", [7, 2 * GRAM_BLOCK - 1, 2 * GRAM_BLOCK, 3 * GRAM_BLOCK + 5])
def test_blocked_gram_is_the_full_product(fan_in: int) -> None:
    """Large Grams are summed by upper blocks and mirrored: the same sums, batch after batch."""
    torch.manual_seed(0)
    gram, expected = torch.zeros(2, fan_in, fan_in), torch.zeros(2, fan_in, fan_in, dtype=torch.float64)
    for _ in range(2):
        p = torch.randn(2, fan_in, 40)
        add_gram(gram, p)
        expected += p.double() @ p.double().transpose(1, 2)
    torch.testing.assert_close(gram.double(), expected, rtol=1e-5, atol=1e-3)


def test_closed_form_matches_brute_force_least_squares() -> None:
    torch.manual_seed(0)
    o, f, members, damp = 4, 6, 3, 0.05
    targets = [torch.randn(1, o, f, dtype=torch.float64) for _ in range(members)]
    sources = [torch.randn(f, 40, dtype=torch.float64) for _ in range(members)]  # the untied inputs
    inputs = [s + 0.3 * torch.randn_like(s) for s in sources]  # the inputs the tied network gives
    weights = [0.5, 1.0, 2.0]
    grams = [(x @ x.T)[None] for x in inputs]
    pulls = [t @ (s @ x.T)[None] for t, s, x in zip(targets, sources, inputs, strict=True)]
    prior = torch.stack(targets).mean(0)
    fitted = shared_fit(pulls, grams, weights, prior, damp)
    ridge = damp * sum(w * g for w, g in zip(weights, grams, strict=True)).diagonal(dim1=-2, dim2=-1).mean()
    # the same problem as one stacked least-squares system: Σ a_i ‖W x̃ − W_i x‖² + λ ‖W − W₀‖²
    rows = torch.cat([w ** 0.5 * x.T for w, x in zip(weights, inputs, strict=True)] + [ridge ** 0.5 * torch.eye(f)])
    goals = torch.cat([w ** 0.5 * (t[0] @ s).T for w, t, s in zip(weights, targets, sources, strict=True)]
                      + [ridge ** 0.5 * prior[0].T])
    brute = torch.linalg.lstsq(rows, goals).solution.T
    torch.testing.assert_close(fitted[0], brute, rtol=1e-8, atol=1e-10)
    # and the error formula from the sums is the error computed from the outputs
    for t, s, x, p, h in zip(targets, sources, inputs, pulls, grams, strict=True):
        direct = float((fitted[0] @ x - t[0] @ s).square().sum())
        assert output_error(fitted, p, h, float((t[0] @ s).square().sum())) == pytest.approx(direct, rel=1e-8)


def _member_errors(untied: nn.Module, tied: nn.Module, plan: kshare.SharingPlan, batches: list[torch.Tensor]
                   ) -> dict[str, float]:
    """Relative output error of each group on the calibration batches: the tied kernel against
    each member's own, on the inputs of the untied network, about the mean of each channel (every
    member here feeds a BatchNorm, which removes it)."""
    modules, tied_modules = dict(untied.named_modules()), dict(tied.named_modules())
    names = [m for g in plan.groups for m in g.members]
    moments = collect(untied, names, batches, positions=10**9)
    found = {}
    for group in plan.groups:
        err = total = 0.0
        for name in group.members:
            h = moments[name].centred()[0].double()
            own = modules[name].weight.detach().double().reshape(1, modules[name].out_channels, -1)
            shared = tied_modules[name].weight.detach().double().reshape(own.shape)
            err += float(((shared - own) @ h * (shared - own)).sum())
            total += float((own @ h * own).sum())
        found[group.name] = err / total
    return found


def test_fitted_outputs_are_never_worse_than_the_mean_kernel(trained: nn.Module, digits) -> None:
    train, _ = digits
    plan = kshare.plan(trained, "all", input_size=(1, 8, 8))
    mean = kshare.tie(copy.deepcopy(trained), plan, init="mean")
    fitted = copy.deepcopy(trained)
    report = fit_and_tie(fitted, plan, train, FitConfig(mode="oneshot", images=256, recalibrate=False,
                                                        weighting="none", compensate=False, positions=10**6))
    batches = fit_batches(train, 256, 128, adapter_for(trained, train), torch.device("cpu"))
    before, after = _member_errors(trained, mean, plan, batches), _member_errors(trained, fitted, plan, batches)
    for group in plan.groups:
        assert after[group.name] <= before[group.name] * 1.001, group.name
    assert sum(after.values()) < 0.9 * sum(before.values())  # and better by a margin on a trained model
    for fit in report.groups:  # the report says the same as the measurement
        assert fit.output_error == pytest.approx(after[fit.name], rel=0.05, abs=1e-6)
        assert fit.mean_output_error == pytest.approx(before[fit.name], rel=0.05, abs=1e-6)


class TwoStages(nn.Module):
    """Two groups in a row: what the first group's tying changes reaches the second's inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.b = nn.ModuleList(nn.Conv2d(8, 8, 1) for _ in range(3))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for conv in self.a:
            x = torch.relu(conv(x))
        for conv in self.b:
            x = torch.relu(conv(x)) + x
        return self.head(x.mean((2, 3)))


def test_sequential_fits_the_tied_networks_inputs(digits, tmp_path: Path) -> None:
    """The second group's kernel is fitted to what the partially tied network feeds it: on those
    inputs it reproduces the untied outputs better than the one-shot kernel, fitted to the untied
    network's inputs (and the two differ: a fit that read the untied inputs would not). So does
    the progressive fit's, whose members after the first also read inputs made with the kernel
    fitted so far (and it differs from the sequential one for that reason)."""
    train, _ = digits
    torch.manual_seed(0)
    model = TwoStages()
    kshare.finetune(model, train, digits[1], kshare.TrainConfig(epochs=2, lr=3e-3, batch_size=64),
                    tmp_path / "twostages.pt", device="cpu")
    model.eval()
    plan = kshare.plan(model, "all", input_size=(1, 8, 8))
    assert [len(g.members) for g in plan.groups] == [3, 3]
    fits = {}
    for mode in ("oneshot", "sequential", "progressive"):
        tied = copy.deepcopy(model)
        fit_and_tie(tied, plan, train, FitConfig(mode=mode, images=256, recalibrate=False, compensate=False,
                                                 positions=10**6))
        fits[mode] = tied
    batches = fit_batches(train, 256, 128, adapter_for(model, train), torch.device("cpu"))
    names = list(plan.groups[1].members)
    errors = {}
    for mode, tied in fits.items():
        # the second group's inputs in the tied network, the untied network's outputs as the target
        moments = collect(tied, names, batches, source=model, positions=10**6)
        t_modules = dict(tied.named_modules())
        err = 0.0
        for name in names:
            m = moments[name]
            shared = t_modules[name].weight.detach().float().reshape(1, 8, -1)
            err += output_error(shared, m.pull, m.gram, m.energy)  # the pull: the untied weights' W C
        errors[mode] = err
    assert not torch.equal(fits["oneshot"].b[0].weight, fits["sequential"].b[0].weight)
    assert not torch.equal(fits["progressive"].b[0].weight, fits["sequential"].b[0].weight)
    assert errors["sequential"] < errors["oneshot"] and errors["progressive"] < errors["oneshot"]


@pytest.mark.parametrize("relax", ["scale", "lora:2", "scale+lora:2"])
def test_relaxed_fit_is_at_least_as_good_as_the_unrelaxed_one(trained: nn.Module, digits, relax: str) -> None:
    train, _ = digits
    plain_plan = kshare.plan(trained, "all", input_size=(1, 8, 8))
    relaxed_plan = kshare.plan(trained, "all", input_size=(1, 8, 8), relax=relax)
    config = FitConfig(mode="oneshot", images=256, recalibrate=False)
    plain = fit_and_tie(copy.deepcopy(trained), plain_plan, train, config)
    relaxed = fit_and_tie(copy.deepcopy(trained), relaxed_plan, train, config)
    for a, b in zip(plain.groups, relaxed.groups, strict=True):
        assert b.output_error <= a.output_error * (1 + 1e-6) + 1e-9, (relax, a, b)
    assert sum(g.output_error for g in relaxed.groups) < sum(g.output_error for g in plain.groups)


@pytest.mark.parametrize("relax", [None, "lora:2"])
def test_fitted_models_round_trip(trained: nn.Module, digits, tmp_path: Path, relax: str | None) -> None:
    train, test = digits
    model = kshare.tie(copy.deepcopy(trained), "all", input_size=(1, 8, 8), calib=train, relax=relax,
                       fit=FitConfig(images=256))
    plan = kshare.plan_of(model)
    assert plan is not None and all(g.init == "data" and g.output_error is not None for g in plan.groups)
    x = adapter_for(model, test)(test.images[:16])
    model.eval()
    with torch.no_grad():
        expected = model(x)
    kshare.save(model, tmp_path / "m.pt")
    loaded = kshare.load(tmp_path / "m.pt", _fresh()).eval()
    kshare.export_safetensors(model, tmp_path / "m.safetensors")
    exported = kshare.load(tmp_path / "m.safetensors", _fresh()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(exported(x), expected, rtol=0, atol=0)
        assert kshare.plan_of(loaded) == plan
        folded = kshare.fold(loaded)
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(kshare.PlanError, match="fitted to data"):  # a fitted plan alone cannot be re-tied silently
        kshare.tie(_fresh(), plan)


def _fresh() -> nn.Module:
    return make_residual_bn_used(in_chans=1, width=16, depth=3)


def test_depthwise_and_grouped_convs_are_fitted(digits) -> None:
    """ConvMixer's depthwise 3x3 convs: each channel's patch is its own window."""
    train, _ = digits
    torch.manual_seed(0)
    model = kshare.load_model("kshare:convmixer_16_3", {"in_chans": 1, "kernel_size": 3, "patch_size": 1})[0].eval()
    plan = kshare.plan(model, "all", input_size=(1, 8, 8))
    assert any(g.signature.groups > 1 for g in plan.groups)
    report = fit_and_tie(model, plan, train, FitConfig(images=128))
    assert all(g.fitted and g.output_error <= g.mean_output_error * 1.001 for g in report.groups)


def test_cli_apply_fit_data_and_its_errors(trained: nn.Module, digits, tmp_path: Path) -> None:
    base = tmp_path / "base.pt"
    kshare.save(trained, base)
    factory = f"{Path(__file__).parent / 'conftest.py'}:make_residual_bn_used"
    common = ["apply", factory, "-k", "in_chans=1", "-k", "width=16", "--weights", base, "-g", "all"]
    code, out = cli(*common, "--fit", "data", "--data", "digits", "--calib-images", "256", "--out", tmp_path / "f.pt")
    assert code == 0 and "output error" in out and "fitted 1 of 1 groups to 256 images" in out, out
    assert "top-1 agreement" in out and "on 256 held-out images" in out, out  # fidelity, without labels
    info = kshare.io.checkpoint.summarize(tmp_path / "f.pt")["retrofit"]
    assert info["fit_images"] == 256 and info["steps"][-1]["fidelity"]["images"] == 256  # kept in the checkpoint
    # more images asked for than the data holds: a quarter held out, the rest fitted, and said
    code, out = cli(*common, "--fit", "data", "--data", "digits", "--fit-images", "100000", "--out", tmp_path / "g.pt")
    assert code == 0 and "digits holds 1,437 images: the fit reads 1,181 of the 100,000 asked for" in out, out
    for args, words in (
        (["--fit", "data", "--data", "no-such-data"], "unknown dataset"),
        (["--fit", "data", "--data", "imagefolder:/no/such/folder"], "not found"),
        (["--fit", "data"], "--data"),
        (["--fit", "data", "--data", "digits", "--init", "mean"], "--init"),
        (["--fit", "maybe", "--data", "digits"], "--fit"),
        (["--data", "digits"], "--fit data"),
        (["--fit", "data", "--data", "digits", "--fit-mode", "twice"], "fit mode"),
    ):
        code, out = cli(*common, *args, "--out", tmp_path / "x.pt")
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and words in errors[0], (args, out)
    code, out = cli("apply", factory, "-k", "in_chans=1", "-k", "width=16", "--weights", base, "-g", "none",
                    "--fit", "data", "--data", "digits", "--out", tmp_path / "x.pt")
    assert code == 2 and "nothing to fit" in out, out
    seven = tmp_path / "seven"  # an image folder of another number of classes
    from PIL import Image

    for c in range(7):
        (seven / str(c)).mkdir(parents=True)
        Image.new("L", (8, 8), 30 * c).save(seven / str(c) / "a.png")
    code, out = cli(*common, "--fit", "data", "--data", f"imagefolder:{seven}", "--image-size", "8",
                    "--out", tmp_path / "x.pt")
    assert code == 2 and "classes" in out, out
    code, out = cli("retrofit", "--help")
    assert code == 0 and "--fit-mode" in out and "--calib-images" in out


def test_unlabelled_images_fit_and_recalibrate(trained: nn.Module, tmp_path: Path) -> None:
    """A folder of pictures with no labels is all a fit (and a recalibration) needs."""
    from PIL import Image

    folder = tmp_path / "pictures"
    folder.mkdir()
    data = kshare.load_data("digits", "test")
    for i in range(64):
        Image.fromarray(data.images[i, 0].numpy()).save(folder / f"{i:03}.png")
    images = kshare.load_data(f"images:{folder}", "train", image_size=8)
    assert not images.labelled and images.images.shape[1:] == (1, 8, 8)
    model = kshare.tie(copy.deepcopy(trained), "all", input_size=(1, 8, 8), calib=images, fit=FitConfig(images=64))
    assert all(g.output_error is not None for g in kshare.plan_of(model).groups)
    with pytest.raises(kshare.DataError, match="no labels"):
        kshare.evaluate(model, images)


def test_budget_plans_by_output_error(trained: nn.Module, digits) -> None:
    """With output statistics, a budget plan clusters kernels in the space where squared distance
    is relative output error, and allots delta ranks by the output error each removes."""
    from kshare.fit.order import output_metric
    from kshare.planning.kernel_error import output_vectors

    train, _ = digits
    names = [s.name for s in kshare.inspect_model(trained, (1, 8, 8)).sites]
    metric = output_metric(trained, names, train, FitConfig(images=256))
    assert metric is not None and set(metric) == set(names)
    members = [m for m in names if dict(trained.named_modules())[m].weight.shape == (16, 16, 3, 3)]
    convs = [dict(trained.named_modules())[m] for m in members]
    vectors = output_vectors([c.weight for c in convs], [metric[m] for m in members], damp=0.0)
    pooled = sum(metric[m][0].double() / metric[m][1] for m in members) / len(members)
    diff = (convs[0].weight - convs[1].weight).detach().double().reshape(1, 16, -1)
    assert float((vectors[0] - vectors[1]).square().sum()) == pytest.approx(float((diff @ pooled * diff).sum()),
                                                                            rel=1e-6)
    plan = kshare.plan(trained, "budget:0.6", input_size=(1, 8, 8), relax="lora:auto", metric=metric)
    assert any("output error" in n for n in plan.notes) and plan.totals.conv_params_after <= 0.6 * \
        plan.totals.conv_params_before + 1
    tied = kshare.tie(copy.deepcopy(trained), "budget:0.6", input_size=(1, 8, 8), calib=train,
                      fit=FitConfig(images=256))
    assert any("output error" in n for n in kshare.plan_of(tied).notes)  # tie(calib=) plans by output error


def test_cli_retrofit_reports_every_step(trained: nn.Module, tmp_path: Path) -> None:
    base = tmp_path / "base.pt"
    kshare.save(trained, base)
    factory = f"{Path(__file__).parent / 'conftest.py'}:make_residual_bn_used"
    code, out = cli("retrofit", factory, "-k", "in_chans=1", "-k", "width=16", "--weights", base, "-g", "all",
                    "--data", "digits", "--calib-images", "256", "--epochs", "1", "--limit-train", "600", "--json",
                    "--warmup", "0.5", "--out", tmp_path / "r.pt")
    assert code == 0, out
    report = json.loads(out.strip().splitlines()[-1])
    steps = [s["step"] for s in report["steps"]]
    assert steps[:2] == ["untied", "fitted (sequential)"] and steps[-1].startswith("fine-tuned")
    accs = {s["step"]: s["test_acc"] for s in report["steps"]}
    # fitted for a network whose BatchNorm is then re-estimated: together they keep more than the mean kernel
    mean = kshare.tie(copy.deepcopy(trained), "all", init="mean", input_size=(1, 8, 8))
    assert accs["BatchNorm recalibrated"] > kshare.evaluate(mean, kshare.load_data("digits", "test"))["acc"]
    held = [s["fidelity"] for s in report["steps"] if s["fidelity"]]  # labelled data: fidelity on held-out images too
    assert held and all(f["images"] == 256 and 0 <= f["top1"] <= f["top5"] <= 1 for f in held)
    assert kshare.load(tmp_path / "r.pt", _fresh()) is not None and report["plan"]["groups"][0]["init"] == "data"
    tuned = torch.load(tmp_path / "r.pt", weights_only=True)["extra"]["finetune"]["config"]
    assert tuned["warmup_epochs"] == 0.5 and tuned["distill"]  # the fine-tune ran as asked


def test_cli_retrofit_refuses_a_bad_fine_tune_option_before_fitting(tmp_path: Path) -> None:
    code, out = cli("retrofit", "kshare:convmixer_16_3", "-k", "in_chans=1", "--data", "digits", "--epochs", "1",
                    "--warmup", "-1", "--out", tmp_path / "r.pt")
    assert code == 2 and out.strip().splitlines() == [out.strip().splitlines()[-1]], out
    assert out.strip().startswith("error:") and "--warmup" in out and "untied" not in out
    assert not (tmp_path / "r.pt").exists()


def test_cli_retrofit_feature_weight_needs_a_fine_tune(tmp_path: Path) -> None:
    for extra in (["--feature-weight", "1"], ["--epochs", "1", "--feature-weight", "-2"]):
        code, out = cli("retrofit", "kshare:convmixer_16_3", "-k", "in_chans=1", "--data", "digits", *extra,
                        "--out", tmp_path / "r.pt")
        assert code == 2 and out.strip().startswith("error:") and "--feature-weight" in out and "untied" not in out, out
        assert not (tmp_path / "r.pt").exists()


def test_layers_with_too_few_samples_keep_their_weights(trained: nn.Module, digits) -> None:
    """Refitting an unshared layer after a tied group needs `REFIT_ROWS_PER_INPUT` samples per input:
    the classifier (16 inputs, one sample per image) is refitted on 256 images, not on 8."""
    from kshare.fit.solve import REFIT_ROWS_PER_INPUT

    train, _ = digits
    heads = {}
    for images in (8, 256):
        config = FitConfig(images=images, mode="sequential", compensate=True)
        tied = kshare.tie(copy.deepcopy(trained), "all", input_size=(1, 8, 8), calib=train.subset(images), fit=config)
        heads[images] = tied.head.weight.detach()
    assert 8 < REFIT_ROWS_PER_INPUT * trained.head.in_features <= 256
    assert torch.equal(heads[8], trained.head.weight)  # kept as trained
    assert not torch.allclose(heads[256], trained.head.weight)  # refitted to its original outputs


@pytest.mark.parametrize("centred", [False, True])
def test_the_pull_is_the_untied_weights_times_the_cross_sums(centred: bool) -> None:
    """The statistics keep W Σ x x̃ᵀ, summed as (W x) x̃ᵀ for a conv with fewer outputs than inputs
    and as Σ x x̃ᵀ times W for the others: both equal W times the cross sums, centred too."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 32, 1), nn.ReLU(), nn.Conv2d(32, 8, 3, stride=2, groups=8)).eval()
    source = copy.deepcopy(net)
    with torch.no_grad():
        net[0].weight.mul_(0.7)  # the network being fitted sees other inputs than the untied one
    batches = [torch.randn(4, 3, 10, 10), torch.randn(4, 3, 10, 10)]
    names = ["2", "4", "6"]
    moments = collect(net, names, batches, source=source, positions=10**6)
    for name in names:
        seen: dict[str, list[torch.Tensor]] = {"x": [], "tied": []}
        for key, model in (("x", source), ("tied", net)):
            layer = dict(model.named_modules())[name]
            handle = layer.register_forward_pre_hook(lambda m, i, to=seen[key]: to.append(patches(m, i[0]).double()))
            with torch.no_grad():
                for b in batches:
                    model(b)
            handle.remove()
        x, tied = torch.cat(seen["x"], -1), torch.cat(seen["tied"], -1)
        layer = dict(source.named_modules())[name]
        weight = layer.weight.detach().double().reshape(x.shape[0], -1, x.shape[1])
        if centred:
            x, tied = x - x.mean(-1, keepdim=True), tied - tied.mean(-1, keepdim=True)
        expected = weight @ x @ tied.transpose(1, 2)
        pull = (moments[name].centred() if centred else moments[name].raw())[1].double()
        assert moments[name].cross is None
        assert torch.allclose(pull, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())), name
