"""Serving early exit: a stream of single requests, batched per stage (:class:`ExitServer`),
and its schedule on a virtual clock (:func:`simulate`). Over HTTP: :mod:`.http` (FastAPI,
extra ``[serve]``) and ``branchynet serve``; Ray Serve replicas: :mod:`.ray` (extra
``[ray]``); both imported on use, not here."""

from .server import ExitAnswer, ExitServer, Overloaded
from .simulate import (SimResult, poisson_arrivals, simulate, stage_time_from_profile,
                       stage_time_from_record, stage_time_from_table)

__all__ = ["ExitServer", "ExitAnswer", "Overloaded", "simulate", "SimResult",
           "stage_time_from_profile", "stage_time_from_table", "stage_time_from_record", "poisson_arrivals"]
