"""How well a part of the batch estimates SAP's probe, and how fast the safety direction turns
(issue "SAP at 1.5x": the levers `sap.probe_batch_fraction` and `sap.safety_every`).

Along a SAP training run of the quick preset (default settings, so the weights move as SAP moves
them), each measured step computes, before the step is taken and at the same weights:
- the probe direction u_harm - u_here per probed layer from the whole batch, again from the
  whole batch with other dropout masks (the noise floor: what two exact estimates agree on),
  and from the strided half and quarter of the rows the probe passes use;
- the safety direction g/|g| from this step's safety pairs and from the pairs of the steps
  1, 2 and 4 later, all at these weights (how much of the turn is the pairs drawn, not the
  weights moving), and its cosine with the direction computed k steps earlier (what
  `safety_every=k` applies).
V_safe is each layer's direction rescaled to a fixed norm, so per-layer cosines are what matter.

    .venv/bin/python scripts/probe_variance.py [--steps 12] [--threads 2] [--config quick] [section.key=value ...]

The figures in docs/performance.md and docs/experiment.md were measured with the quick trainer config
(LoRA dropout 0.1) and SAP's steps at a fresh safety direction every step: `sap.safety_every=1`.
"""
from __future__ import annotations

import argparse
import statistics

import torch


def _cosines(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0)) for x, y in zip(a, b)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="SAP steps measured")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--config", default="quick", help="training config (preset or YAML)")
    parser.add_argument("overrides", nargs="*", help="config overrides (section.key=value)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sap_dist.tools.bench import bench_setup
    from sap_dist.config import load_config
    from sap_dist.methods.common import rng_state as _rng_state, set_rng_state as _set_rng_state
    from sap_dist.methods.common import select_rows
    from sap_dist.methods.sap import _probe_pass, harmful_direction, sap_state, sap_step
    from sap_dist.train import Batches, _collate_safety, _collate_task, _probe_rows, _response_tokens

    cfg = load_config(args.config, args.overrides)
    sap = cfg.sap
    tokenizer, task, safety, _, backend, probe, layers = bench_setup(cfg)
    pad, dev = tokenizer.pad_token_id, backend.device
    batches = Batches(task, cfg.train.batch_size, cfg.train.seed, 0, 1)
    pairs = Batches(safety, sap.safety_batch_size, cfg.train.seed + 1, 0, 1)
    state = sap_state(probe, sap)

    def direction(index: int) -> list[torch.Tensor]:
        """g/|g| from the safety pairs of step `index`, at the current weights (a copy)."""
        sb = _collate_safety(pairs.local(pairs.global_batch(index)), pad, dev)
        harmful_direction(backend, sb, sap, {})
        return backend.save_direction()

    def probe_delta(batch, rows, tokens, g_hat, rng) -> list[torch.Tensor]:
        """u_harm - u_here over `rows` of `batch` (the step's own passes, same dropout masks),
        the perturbation rho*|W|*g_hat as the step applies it."""
        part = select_rows(batch, rows)
        radius = sap.rho * float(torch.sqrt(backend.weight_sq_norm()))
        saved = backend.save_weights()
        backend.add_scaled_direction_to_weights(g_hat, radius)
        _set_rng_state(dev, rng)
        try:
            u_harm, _ = _probe_pass(backend, probe, part, tokens)
        finally:
            backend.restore_weights(saved)
        _set_rng_state(dev, rng)
        u_here, _ = _probe_pass(backend, probe, part, tokens)
        return [a - b for a, b in zip(u_harm, u_here)]

    found: dict[str, list[float]] = {}
    previous: dict[int, object] = {}
    for step in range(args.steps):
        rows = batches.global_batch(step)
        batch = _collate_task(rows, pad, dev)
        every = torch.arange(len(rows))
        sb = _collate_safety(pairs.local(pairs.global_batch(step)), pad, dev)
        harmful_direction(backend, sb, sap, {})
        here = backend.save_direction()
        backend.zero_grad()
        rng = _rng_state(dev)
        full = probe_delta(batch, every, float(_response_tokens(rows)), here, rng)
        torch.manual_seed(10_000 + step)  # other dropout masks, same rows and weights
        found.setdefault("probe: whole batch, other dropout masks", []).extend(
            _cosines(probe_delta(batch, every, float(_response_tokens(rows)), here, _rng_state(dev)), full))
        for fraction in (0.5, 0.25):
            chosen, local = _probe_rows(rows, fraction, 1)
            part = probe_delta(batch, local, float(_response_tokens(chosen)), here, rng)
            found.setdefault(f"probe: {fraction:g} of the rows", []).extend(_cosines(part, full))
        backend.zero_grad()
        for later in (1, 2, 4):
            other = direction(step + later)
            found.setdefault(f"safety: pairs of step +{later}, same weights", []).append(backend.direction_dot(here, other))
        backend.zero_grad()
        for k in (1, 2, 4):
            if step - k in previous:
                found.setdefault(f"safety: direction {k} steps earlier (safety_every={k})", []).append(
                    backend.direction_dot(here, previous[step - k]))
        previous[step] = here
        _set_rng_state(dev, rng)
        probe_local = _probe_rows(rows, sap.probe_batch_fraction, 1)
        sap_step(backend, probe, batch, sb, float(_response_tokens(rows)), sap, state, probe_local[1],
                 float(_response_tokens(probe_local[0])))
        print(f"step {step + 1}/{args.steps} done", flush=True)

    print(f"cosines over {args.steps} steps of SAP ({args.config}, probe layers {layers}; per layer for the probe):")
    for name, values in found.items():
        print(f"{name}: median {statistics.median(values):.3f}, min {min(values):.3f}, max {max(values):.3f}, "
              f"n {len(values)}")


if __name__ == "__main__":
    main()
