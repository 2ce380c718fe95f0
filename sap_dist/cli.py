"""`sap-dist COMMAND ...`: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys

from sap_dist.help_format import DefaultsHelpFormatter

USAGE = """usage: sap-dist COMMAND [ARGS...]

commands:
  train               fine-tune with plain SFT or SAP (same program as python -m sap_dist.train)
  check-equivalence   run every backend for real and compare with one process
  bench               measure SAP's step time and memory against plain fine-tuning
  plan                per-GPU memory of a run from the model's config, and a config that fits
  config              every config key with its default and meaning; --config FILE [overrides]: the resolved config
  fetch-model         download a run's model and hub data sets once into the shared cache (then ranks run offline)
  eval                generate answers and judge them: harmful score, over-refusal, task accuracy
  judge               judge saved answers again (a .jsonl of prompt/answer lines, or an eval.json)
  align               make a model refuse harmful requests (LoRA, merged into a model directory)
  experiment          align, fine-tune with sft / SAP / baselines over seeds, judge, table and plots

`sap-dist COMMAND --help` shows a command's own options; `sap-dist --version` the version."""


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `sap-dist config | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("--version", "-V"):
        from sap_dist import __version__

        print(f"sap-dist {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command != "train":  # train has its own --verbose; the others follow SAP_DIST_VERBOSE
        from sap_dist.noise import quiet_third_party

        quiet_third_party()
    if command == "train":
        from sap_dist.train import main as train_main

        return train_main(rest)
    if command in ("eval", "align", "experiment"):
        import importlib

        module = {"eval": "sap_dist.evaluation.evaluate", "align": "sap_dist.align", "experiment": "sap_dist.experiment"}
        return importlib.import_module(module[command]).main(rest)
    if command == "judge":
        from sap_dist.evaluation.rejudge import main as judge_main

        return judge_main(rest)
    if command == "plan":
        from sap_dist.tools.plan import main as plan_main

        return plan_main(rest)
    if command == "check-equivalence":
        from sap_dist.tools.equivalence import main as equivalence_main

        return equivalence_main(rest)
    if command == "bench":
        from sap_dist.tools.bench import main as bench_main

        return bench_main(rest)
    if command == "fetch-model":
        from sap_dist.tools.fetch import main as fetch_main

        return fetch_main(rest)
    if command == "config":
        return config_main(rest)
    print(f"sap-dist: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def config_main(argv: list[str]) -> int:
    """`sap-dist config`: every key with its default and meaning; with --config and/or overrides,
    a dry run that prints the fully resolved config (failing on the errors a run would); with
    --world-size N also every check the trainer makes at N ranks (sap_dist/run_control/preflight.py)."""
    from sap_dist.config import ConfigError, describe, load_config, parse_overrides, to_dict

    p = argparse.ArgumentParser(
        prog="sap-dist config", formatter_class=DefaultsHelpFormatter,
        description="Without arguments: every config key with its type, default and meaning. With --config "
                    "and/or overrides: print the fully resolved config as YAML (a dry run: it fails on the same "
                    "errors a run would), loadable again with --config.",
        epilog="Examples: sap-dist config --config tiny train.max_steps=10 --sap.rho 0.1; "
               "sap-dist config --config configs/sap_70b.yaml --world-size 32")
    p.add_argument("--config", help="YAML config file or preset name (quick, tiny)")
    p.add_argument("--world-size", type=int,
                   help="also apply every check the trainer makes at this many ranks (nodes x GPUs per node): "
                        "batch sizes, probe rows, safety pairs, backend and its options; no GPU needed")
    args, rest = p.parse_known_args(argv)
    if args.config is None and not rest and args.world_size is None:
        print(describe())
        return 0
    import yaml

    from sap_dist.run_control import preflight

    try:
        cfg = load_config(args.config, parse_overrides(rest))
        checked = preflight.check(cfg, args.world_size) if args.world_size is not None else None
    except ConfigError as exc:
        print(f"sap-dist config: error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    if checked:
        print("\n".join(preflight.comment_lines(checked)))
        for warning in checked.warnings:
            print(f"sap-dist config: warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
