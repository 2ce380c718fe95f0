"""The safety anchor (after Safety Bottleneck Regularization, arXiv 2605.05995): a term added to
any method's task steps, `method: sft+anchor` (or `anchor`), `sap+anchor`, `lisa+anchor`.

The loss (`anchor.loss: mse`) is weight * mean (h(x_k; W) - h(x_k; W_start))^2 over K anchor
prompts x_k, the last `positions` prompt tokens of each, and the hidden size: h is the model's final
hidden state (after its last norm, what the LM head reads), W_start the weights the run starts
from. `anchor.loss: kl` holds the next-token distribution there instead: weight * mean over anchors
and positions of KL(p(.|x_k; W_start) || p(.|x_k; W)). The anchors are
harmful prompts of the safety pairs (training data, never evaluation prompts). Their targets are
computed once, before the first step, from the model as loaded: no second copy of the model is
kept, and a LoRA run's fresh adapters are exactly zero there. Every rank runs all K anchors (a few
short prompts), so the term's gradient is the same on every rank and at every world size, and
nothing is gathered under ZeRO-3 or FSDP2.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sap_dist.errors import ConfigError
from sap_dist.methods import RunSetup, Term


@dataclass
class AnchorConfig:
    """The safety anchor (`method: anchor`, `sap+anchor`, `lisa+anchor`)."""

    weight: float = 3.0
    """lambda: the anchor loss's weight against the task loss (the loss is a mean over anchors,
    positions and hidden units, so it does not grow with the hidden size)."""
    prompts: int = 8
    """K: anchor prompts, the harmful prompts of this many safety pairs drawn with `train.seed`."""
    positions: int = 1
    """Anchored token positions per prompt, counted back from its last token (the end of the
    chat template's assistant header, where the model decides whether to refuse)."""
    loss: Literal["mse", "kl"] = "mse"
    """What is held at the anchored tokens: `mse`, the final hidden states (the SBR bottleneck);
    `kl`, the next-token distribution, KL(start || now). The kl targets are [K, positions,
    vocabulary] fp32 log-probabilities (1.5 MB at K=8, one position, a 49k vocabulary; 4 MB at
    128k), and the LM head runs on the anchored tokens of the longest prompt's tail."""

    def check(self) -> None:
        """Values that need more than their type."""
        if not self.weight >= 0:
            raise ConfigError(f"anchor.weight must be 0 or positive, got {self.weight}")
        for key in ("prompts", "positions"):
            if getattr(self, key) < 1:
                raise ConfigError(f"anchor.{key} must be at least 1, got {getattr(self, key)}")


@dataclass
class AnchorState:
    """What the anchor term keeps through the run (checkpointed, the same on every rank)."""

    targets: torch.Tensor | None = None
    """Under the start weights, at the anchored tokens: [K, positions, hidden] fp32 final hidden
    states (`mse`), or [K, positions, vocabulary] fp32 next-token log-probabilities (`kl`)."""


def anchor_prompts(pairs: list[dict], count: int, seed: int) -> list[list[int]]:
    """The token ids of `count` distinct harmful prompts of the encoded safety `pairs` (the
    harmful sequence up to its first answer token), in an order drawn with `seed`."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed * 1_000_003 + 7)).tolist()
    prompts, seen = [], set()
    for i in order:
        row = pairs[i]["harmful"]
        start = next(j for j, label in enumerate(row["labels"]) if label != -100)
        prompt = tuple(row["input_ids"][:start])
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(list(prompt))
        if len(prompts) == count:
            return prompts
    raise ConfigError(f"anchor.prompts={count}: the safety data has only {len(prompts)} distinct prompts")


def anchor_batch(prompts: list[list[int]], positions: int, pad_id: int, device) -> tuple[dict, torch.Tensor]:
    """The anchors right-padded into one batch, and the [K, positions] index of the anchored
    tokens (the last `positions` of each prompt)."""
    shortest = min(len(p) for p in prompts)
    if positions > shortest:
        raise ConfigError(f"anchor.positions={positions}: the shortest anchor prompt has {shortest} tokens")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        mask[i, :len(p)] = 1
    index = torch.stack([torch.arange(len(p) - positions, len(p)) for p in prompts])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, index.to(device)


def anchor_outputs(model: torch.nn.Module, batch: dict, index: torch.Tensor,
                   with_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """([K, positions, hidden] final hidden states at `index`, logits): with `with_logits` the
    [K, positions, vocabulary] logits at `index`, else the logits of one position (the LM head
    computes no more; they serve only to give every trained weight a gradient)."""
    width = batch["input_ids"].size(1)
    # the anchored tokens lie in the last `keep` positions of the right-padded batch
    keep = width - int(index[:, 0].min()) if with_logits else 1
    try:
        out = model(**batch, output_hidden_states=True, logits_to_keep=keep)
    except TypeError as err:
        if "logits_to_keep" not in str(err):
            raise
        out = model(**batch, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    at_index = torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
    if not with_logits:
        return at_index, out.logits
    logits = out.logits[:, -keep:]
    return at_index, torch.gather(logits, 1, (index - (width - keep)).unsqueeze(-1).expand(-1, -1, logits.size(-1)))


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def build(cfg: AnchorConfig, setup: RunSetup):
    """The term's state (its targets, from the model as it is now: the start weights) and its
    apply(backend, metrics)."""
    if setup.safety_pairs is None:
        raise ConfigError("the anchor term needs safety pairs: set data.safety")
    backend = setup.backend
    prompts = anchor_prompts(setup.safety_pairs, cfg.prompts, setup.seed)
    batch, index = anchor_batch(prompts, cfg.positions, setup.pad_id, backend.device)
    kl = cfg.loss == "kl"
    state = AnchorState()
    with torch.no_grad(), _eval_mode(backend.model):
        hidden, logits = anchor_outputs(backend.model, batch, index, kl)
        state.targets = (F.log_softmax(logits.float(), dim=-1) if kl else hidden.float()).cpu()

    def apply(backend, metrics: dict) -> None:
        # without dropout, as the targets were taken: the term compares the function, not a
        # dropout sample of it
        with _eval_mode(backend.model):
            hidden, logits = anchor_outputs(backend.model, batch, index, kl)
        targets = state.targets.to(hidden.device)
        if kl:
            now = F.log_softmax(logits.float(), dim=-1)
            loss = F.kl_div(now, targets, reduction="none", log_target=True).sum(-1).mean()
            backend.backward(cfg.weight * loss)
        else:
            loss = F.mse_loss(hidden.float(), targets)
            # every rank computes the same loss over all K anchors: the data-parallel mean of its
            # gradient is that gradient, at any world size. The zero-weighted logits give every
            # trained weight a gradient (an untied LM head gets none from the hidden states),
            # which DDP's and ZeRO-2's reduction of whole buckets needs.
            backend.backward(cfg.weight * loss + 0.0 * logits.float().sum())
        metrics[f"anchor_{cfg.loss}"] = float(backend.all_reduce_mean_(loss.detach().clone()))

    return state, apply


TERM = Term(
    name="anchor",
    summary="safety anchor: hold the final hidden states of K harmful prompts at the start model's",
    section="anchor",
    config=AnchorConfig,
    build=build,
    needs_safety_pairs=True,
    experiment={
        "anchor": ("safety anchor", {"method": "anchor"}),
        # lambda = 10: chosen over 5 seeds on DoNotAnswer's validation half (docs/experiment.md)
        "anchor_kl": ("safety anchor (KL)", {"method": "anchor", "anchor.loss": "kl", "anchor.weight": 10.0}),
        "sap_anchor": ("SAP + safety anchor", {"method": "sap+anchor", "sap.variant": "paper"}),
        "lisa_anchor": ("Lisa + safety anchor", {"method": "lisa+anchor"}),
    },
)
