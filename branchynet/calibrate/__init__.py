"""Threshold calibration: pick per-exit thresholds for a target on held-out data.

Every exit's logits are computed once (one full forward pass over the validation
split); each threshold combination is then scored from those cached scores, so a sweep
costs one pass over the data, not one per combination.

The pieces, each a module:

- :mod:`.exit_table`: the score table (:class:`ExitTable`), gathered in one pass and
  scored for any threshold combination as the engine decides; the candidate thresholds.
- :mod:`.temperature`: temperature scaling, fitted per exit and folded into the model.
- :mod:`.search`: the threshold search (exhaustive, or a beam then coordinate descent)
  for a goal (accuracy floor, FLOP and time budgets) under a cost (FLOPs or time).
- :mod:`.result`: :class:`CalibrationResult` and its reports (summary, CSV, plot).
- :mod:`.pipeline`: :func:`calibrate`, the steps from the targets to the result.

Time is predicted by :mod:`branchynet.latency`, the one time model.
"""

from ..latency import measure_path_times
from .exit_table import ExitTable, candidate_thresholds, collect_exit_outputs, score_thresholds
from .pipeline import calibrate
from .result import CalibrationResult, pareto_front
from .search import TargetUnreachable
from .temperature import collect_logits, expected_calibration_error, fit_temperature, fold_temperature

__all__ = [
    "TargetUnreachable",
    "ExitTable",
    "CalibrationResult",
    "collect_exit_outputs",
    "score_thresholds",
    "candidate_thresholds",
    "measure_path_times",
    "calibrate",
    "pareto_front",
    "collect_logits",
    "fit_temperature",
    "expected_calibration_error",
    "fold_temperature",
]
