"""`sap-dist COMMAND ...`: one console script, one subcommand per job."""

from __future__ import annotations

import sys

USAGE = """usage: sap-dist COMMAND [ARGS...]

commands:
  train               fine-tune with plain SFT or SAP (same program as python -m sap_dist.train)
  check-equivalence   run every backend for real and compare with one process
  bench               measure SAP's step time and memory against plain fine-tuning
  plan                per-GPU memory of a run from the model's config, and a config that fits
  config              print every config key with its default and meaning
  fetch-model         download a run's model once into the shared cache (then ranks run offline)
  eval                generate answers and judge them: harmful score, over-refusal, task accuracy
  align               make a model refuse harmful requests (LoRA, merged into a model directory)
  experiment          align, fine-tune with sft / SAP / baselines over seeds, judge, table and plots

`sap-dist COMMAND --help` shows a command's own options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        from sap_dist.train import main as train_main

        return train_main(rest)
    if command in ("eval", "align", "experiment"):
        import importlib

        return importlib.import_module(f"sap_dist.{command}").main(rest)
    if command == "plan":
        from sap_dist.plan import main as plan_main

        return plan_main(rest)
    if command == "check-equivalence":
        from sap_dist.equivalence import main as equivalence_main

        return equivalence_main(rest)
    if command == "bench":
        from sap_dist.bench import main as bench_main

        return bench_main(rest)
    if command == "fetch-model":
        from sap_dist.fetch import main as fetch_main

        return fetch_main(rest)
    if command == "config":
        from sap_dist.config import describe

        print(describe())
        return 0
    print(f"sap-dist: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
