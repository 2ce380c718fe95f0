"""Training backends behind one interface (`base.Backend`). Only this package names them."""

from __future__ import annotations

from sap_dist.backends.base import Backend
from sap_dist.backends.common import OptimizerSpec

BACKENDS = ("single",)
"""Backend names accepted by `create_backend` (and by the `train.backend` config key)."""


def create_backend(name: str, model, optim: OptimizerSpec) -> Backend:
    """Wrap `model` (trained weights already marked with requires_grad) for backend `name`."""
    if name == "single":
        from sap_dist.backends.single import SingleBackend

        return SingleBackend(model, optim)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
