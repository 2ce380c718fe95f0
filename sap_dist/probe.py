"""The SAP probe: one vector per probed decoder layer, added to that layer's output hidden
states at every token through a forward hook.

The vectors live outside the model's parameters (so no sharding wrapper partitions them, and
no optimizer of the model's sees them); the step switches them on and off. Adding `v_l` to a
decoder layer's output is the same as a bias `v_l` on that layer's `mlp.down_proj` (the
residual stream ends there), which is how the reference code implements it.
"""

from __future__ import annotations

import torch

from sap_dist.errors import ConfigError

REFERENCE_LAYERS = (3, 9)
"""The reference code's probed layers, for a 32-layer model."""
REFERENCE_DEPTH = 32


def default_probe_layers(num_layers: int) -> list[int]:
    """The reference's [3, 9] of 32 scaled to `num_layers` (SmolLM2-135M, 30 layers: [3, 8])."""
    layers = sorted({min(num_layers - 1, round(layer * num_layers / REFERENCE_DEPTH)) for layer in REFERENCE_LAYERS})
    return layers


def check_probe_layers(layer_ids: list[int], num_layers: int) -> list[int]:
    """Validate user-chosen layers against the model's depth; returns them sorted, unique."""
    bad = [layer for layer in layer_ids if not 0 <= layer < num_layers]
    if bad:
        raise ConfigError(
            f"sap.probe_layers {bad} out of range: the model has {num_layers} decoder layers (valid: 0..{num_layers - 1})"
        )
    return sorted(set(layer_ids))


class Probe:
    """Probe vectors on `layers[i]` for i in `layer_ids`, with hooks already registered.

    `vectors[k]` is an fp32 leaf tensor of the hidden size for `layer_ids[k]`. When `enabled`
    is False the hooks return the layer output untouched (the vectors take no part in the
    graph). While `row_mask` is set (`start_row_gradient`), each hook also adds
    `row_vectors[k]` (zero leaves) to the hidden states of the masked rows only, so the gradient
    with respect to `row_vectors` is the probe gradient of those rows' part of the loss, from
    the same backward as the rest. When `measure_norms` is set, each hook records the mean per-token L2 norm of its
    layer's (unprobed) output over the tokens in `token_mask` (the batch's attention mask).
    """

    def __init__(self, layers: torch.nn.ModuleList, layer_ids: list[int], hidden_size: int, device: torch.device):
        self.layer_ids = list(layer_ids)
        self.vectors = [torch.zeros(hidden_size, dtype=torch.float32, device=device, requires_grad=True) for _ in layer_ids]
        self.enabled = False
        self.measure_norms = False
        self.token_mask: torch.Tensor | None = None
        self.norm_sums = torch.zeros(len(layer_ids), dtype=torch.float64)
        self.token_count = 0.0
        self.row_vectors = [torch.zeros(hidden_size, dtype=torch.float32, device=device, requires_grad=True) for _ in layer_ids]
        self.row_mask: torch.Tensor | None = None
        self._handles = [layers[layer].register_forward_hook(self._hook(k)) for k, layer in enumerate(self.layer_ids)]

    def _hook(self, k: int):
        def add_probe(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if self.measure_norms:
                norms = hidden.detach().float().norm(dim=-1)
                mask = self.token_mask.to(norms.device, norms.dtype) if self.token_mask is not None else torch.ones_like(norms)
                self.norm_sums[k] += float((norms * mask).sum())
                if k == 0:
                    self.token_count += float(mask.sum())
            if not self.enabled:
                return output
            hidden = hidden + self.vectors[k].to(hidden.dtype)
            if self.row_mask is not None:
                mask = self.row_mask.to(hidden.device, hidden.dtype).view(-1, *([1] * (hidden.dim() - 1)))
                hidden = hidden + mask * self.row_vectors[k].to(hidden.dtype)
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        return add_probe

    @torch.no_grad()
    def set(self, values: list[torch.Tensor] | None) -> None:
        """Copy `values` into the vectors (None: zeros)."""
        for vector, value in zip(self.vectors, values or [None] * len(self.vectors)):
            vector.zero_() if value is None else vector.copy_(value)

    def start_row_gradient(self, rows: torch.Tensor, batch_rows: int) -> None:
        """Until `stop_row_gradient`, add the (zero) row vectors to rows `rows` of a batch of
        `batch_rows` rows: the forward is unchanged, their gradient is those rows' part."""
        with torch.no_grad():
            for v in self.row_vectors:
                v.zero_()
                v.grad = None
        self.row_mask = torch.zeros(batch_rows, dtype=torch.bool)
        self.row_mask[rows] = True

    def stop_row_gradient(self) -> list[torch.Tensor]:
        """The row vectors' gradients (zeros where none flowed), and stop adding them."""
        grads = [torch.zeros_like(v) if v.grad is None else v.grad.detach().clone() for v in self.row_vectors]
        for v in self.row_vectors:
            v.grad = None
        self.row_mask = None
        return grads

    def start_norm_measurement(self, token_mask: torch.Tensor) -> None:
        self.norm_sums.zero_()
        self.token_count = 0.0
        self.token_mask = token_mask
        self.measure_norms = True

    def stop_norm_measurement(self) -> tuple[torch.Tensor, float]:
        """(sum over tokens of each probed layer's output norm, number of tokens)."""
        self.measure_norms = False
        self.token_mask = None
        return self.norm_sums.clone(), self.token_count

    def norm(self) -> float:
        return float(torch.sqrt(sum(v.detach().double().pow(2).sum() for v in self.vectors)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
