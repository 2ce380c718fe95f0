"""What running u_harm and u_here as one pass over doubled rows could save (issue "SAP at 1.5x").

u_harm and u_here are the same probe rows at two weight settings. With LoRA the settings differ
only in the adapters, so both could be one forward/backward over the rows twice, each copy with
its own adapter values. Before building that (per-row adapter values inside every LoRA layer),
this measures its best case: the probe pass over the rows twice (plain duplicated rows, no per-row
adapters, so no extra work at all) against two probe passes over the rows, on the same model,
batches and threads as `sap-dist bench --preset quick`, interleaved, medians.

    .venv/bin/python scripts/probe_rows_bench.py [--repeats 12] [--threads 2] [--config quick]

A ratio `doubled / two passes` near 1 means the fused pass cannot be faster here.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--config", default="quick", help="training config (preset or YAML) whose model and batches are used")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sap_dist.tools.bench import bench_setup
    from sap_dist.config import load_config
    from sap_dist.methods.common import select_rows
    from sap_dist.methods.sap import _probe_pass
    from sap_dist.train import Batches, _collate_task, _probe_rows, _response_tokens

    cfg = load_config(args.config, [])
    tokenizer, task, _, _, backend, probe, _ = bench_setup(cfg)
    batches = Batches(task, cfg.train.batch_size, cfg.train.seed, 0, 1)

    for fraction in (0.25, 0.5):
        times: dict[str, list[float]] = {"two passes": [], "doubled rows": []}
        for r in range(args.repeats + 1):  # the first round warms up
            rows = batches.global_batch(r)
            batch = _collate_task(rows, tokenizer.pad_token_id, backend.device)
            probe_rows, local = _probe_rows(rows, fraction, 1)  # the rows SAP's probe passes use
            tokens = float(_response_tokens(probe_rows))
            single = select_rows(batch, local)
            doubled = select_rows(batch, torch.cat([local, local]))
            order = ["two passes", "doubled rows"] if r % 2 == 0 else ["doubled rows", "two passes"]
            for name in order:
                t0 = time.perf_counter()
                if name == "two passes":
                    _probe_pass(backend, probe, single, tokens)
                    _probe_pass(backend, probe, single, tokens)
                else:
                    _probe_pass(backend, probe, doubled, tokens)
                if r:
                    times[name].append(time.perf_counter() - t0)
        two, one = statistics.median(times["two passes"]), statistics.median(times["doubled rows"])
        print(f"probe_batch_fraction={fraction} ({len(local)} rows): two passes {two:.4f} s, "
              f"one pass over doubled rows {one:.4f} s, ratio {one / two:.2f} "
              f"(median of {args.repeats}, {torch.get_num_threads()} threads)", flush=True)


if __name__ == "__main__":
    main()
