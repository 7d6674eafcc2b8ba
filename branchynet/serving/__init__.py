"""Serving early exit: a stream of single requests, batched per stage (:class:`ExitServer`)."""

from .server import ExitAnswer, ExitServer, Overloaded

__all__ = ["ExitServer", "ExitAnswer", "Overloaded"]
