"""Fit: everything that makes shared kernels from data and says how good they are. Input
statistics (`statistics`), the closed form (`solve`), the one-shot and sequential orders
(`order`), block reconstruction (`blocks`, with the block taps of `features`), BatchNorm
recalibration (`batchnorm`) and the fidelity of a fitted model against the original
(`fidelity`). `kshare.retrofit` runs these steps in order. Uses data, surgery, planning,
kernels and core; reports through `logging` and `kshare.progress`, never by printing."""

from kshare.fit.batchnorm import batch_norms, recalibrate_bn, recalibrate_on
from kshare.fit.blocks import UnitReconstruction, reconstruct
from kshare.fit.config import FIT_MODES, WEIGHTINGS, FitConfig
from kshare.fit.fidelity import Fidelity, logits_of, measure_fidelity
from kshare.fit.order import FitReport, fit_kernels, output_metric, reconstruct_fitted
from kshare.fit.solve import GroupFit
from kshare.fit.statistics import fit_batches, supports

__all__ = ["FIT_MODES", "WEIGHTINGS", "Fidelity", "FitConfig", "FitReport", "GroupFit", "UnitReconstruction",
           "batch_norms", "fit_batches", "fit_kernels", "logits_of", "measure_fidelity", "output_metric",
           "recalibrate_bn", "recalibrate_on", "reconstruct", "reconstruct_fitted", "supports"]
