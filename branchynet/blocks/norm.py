"""Local response normalisation with Chainer's parameterisation."""

from __future__ import annotations

from torch import nn

__all__ = ["chainer_lrn"]


def chainer_lrn(n: int = 3, alpha: float = 5e-5, beta: float = 0.75,
                k: float = 2.0) -> nn.LocalResponseNorm:
    """Chainer's ``F.local_response_normalization(x, n, k, alpha, beta)`` as a PyTorch module.

    Chainer computes ``x / (k + alpha * sum_window x^2) ** beta``; PyTorch's
    ``LocalResponseNorm`` divides ``alpha`` by the window size ``n``, so ``alpha`` is passed
    as ``alpha * n``. Chainer's default ``k`` is 2 (PyTorch's is 1). The defaults here are
    the authors' B-AlexNet and B-ResNet values (``n=3, alpha=5e-5, beta=0.75``).

    Shapes:
        [B, C, H, W] -> [B, C, H, W].
    """
    return nn.LocalResponseNorm(n, alpha=alpha * n, beta=beta, k=k)
