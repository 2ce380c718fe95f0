"""`sap-dist check-equivalence`: do N ranks train what one process trains?

Launches the real trainer once per backend and case (each SAP variant, or another registered
method, `--methods lisa,anchor,sap+anchor`) (`torchrun --nproc_per_node N -m sap_dist.train ...`, the `single` reference as one plain process), every run on the same
model, data, seed and global batches, then compares each run's trained weights (the saved
adapter or model) and last probe (`probe.pt`) with the `single` run of the same variant. It
prints a table and exits non-zero when a run failed or a difference passes the tolerance.

On CPU (gloo) the default tiny fp32 model checks a setup in about a minute per backend; on a
GPU cluster, point `--config` at your run's config and keep `model.dtype=fp32` so the
tolerance means something.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import torch

DEFAULT_CONFIG = "tiny"
"""Trainer config preset used when `--config` is not given: the seeded 4-layer fp32 Llama."""

DEFAULT_OVERRIDES = [
    "model.dtype=fp32",
    "method=sap",
    "weights.lora_dropout=0.0",  # dropout masks differ per rank; equality needs none
    "train.tensorboard=false",
    "train.progress_bar=false",
]
"""Trainer overrides every run gets after the config file and before the user's."""


SETTINGS = {
    "exact": [],
    "sap-defaults": ["sap.probe_batch_fraction=0.5", "sap.safety_batch_size=4", "sap.safety_every=4"],
    "safety-every": ["sap.probe_batch_fraction=0.5", "sap.safety_batch_size=4", "sap.safety_every=2"],
}
"""Named SAP settings each variant is checked under (`--settings`): the config as given (the
tiny preset: probe over the whole batch, a fresh safety direction every step), SAP's defaults
(the probe passes over a strided half of the batch, which every world size must choose alike,
and the safety direction reused for 4 steps: stored shard by shard, applied at the current
||W||), and those with the direction reused every other step."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    """This environment minus anything a launcher above us left, so that each run's backend
    comes only from its `dist.backend` and its ranks only from the launcher we start."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("ACCELERATE_", "FSDP_", "SLURM_"))}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


SAP_VARIANTS = ("paper", "reference")
"""The variants of a probing method, each a case of its own."""


def case_overrides(case: str) -> tuple[list[str], str | None]:
    """(The trainer overrides of a case, its SAP variant or None for a method without a probe.)
    A case is a SAP variant (`paper`: method sap), a method with a variant (`sap+anchor/paper`),
    or a method without a probe (`lisa`, `anchor`), which is compared by its weights alone."""
    from sap_dist import methods

    method, _, variant = case.partition("/")
    if method in SAP_VARIANTS and not variant:
        method, variant = "sap", method
    if methods.select(method).method.uses_probe:
        return [f"method={method}", f"sap.variant={variant or 'paper'}"], variant or "paper"
    return [f"method={method}"], None


def cases_of(methods_asked: list[str], variants: list[str]) -> list[str]:
    """The cases of `--methods` and `--variants`: a probing method once per variant (SAP by the
    variant's name alone), any other method once."""
    from sap_dist import methods

    out = []
    for name in methods_asked:
        if methods.select(name).method.uses_probe:
            out += [v if name == "sap" else f"{name}/{v}" for v in variants]
        else:
            out.append(name)
    return out


def command(backend: str, variant: str, out: str, args, setting: str = "exact") -> list[str]:
    """The launch command for one run of case `variant` (`case_overrides`)."""
    case = case_overrides(variant)[0]
    train_args = ["--config", args.config or DEFAULT_CONFIG] + DEFAULT_OVERRIDES + case + [
        f"dist.backend={backend}",
        f"train.max_steps={args.steps}",
        f"train.output_dir={out}",
    ] + SETTINGS[setting] + list(args.overrides)
    train_args += pinned_batches(train_args, args.nproc)
    if backend == "single":
        return [sys.executable, "-m", "sap_dist.train", *train_args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
            "--master_port", str(_free_port()), "-m", "sap_dist.train", *train_args]


def pinned_batches(train_args: list[str], nproc: int) -> list[str]:
    """Overrides that give every run the probe rows and safety pairs the `nproc`-rank runs use:
    the trainer rounds those to a multiple of the ranks (sap_dist/batching.py), and the
    one-process reference must probe the same global rows and pairs to be comparable."""
    from sap_dist.batching import effective_batches, pinned_overrides
    from sap_dist.config import ConfigError, load_config, parse_overrides

    try:
        return pinned_overrides(effective_batches(load_config(train_args[1], parse_overrides(train_args[2:])), nproc))
    except ConfigError:
        return []  # each run reports the error itself, in its own log


def trained_weights(out: str) -> dict[str, torch.Tensor]:
    """Every tensor the run saved: the adapter (`adapter_model.safetensors`) or the full
    model (`model*.safetensors`, sharded or not)."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    adapters = [f for f in files if f.startswith("adapter_model")]
    tensors: dict[str, torch.Tensor] = {}
    for f in adapters or files:
        tensors.update(load_file(os.path.join(out, f)))
    if not tensors:
        raise FileNotFoundError(f"no saved weights (*.safetensors) in {out}")
    return tensors


def probe(out: str, variant: str = "paper") -> tuple[list[torch.Tensor], float | None]:
    """What is compared of the run's probe (`probe.pt`): the last probe's vectors, with no
    scale of their own; for the `reference` variant the input of its probe optimizer,
    u_harm - u_here of the last refresh, with the scale its rounding is relative to
    (max |u_harm|). Its probe is one AdamW step on that input, which divides each element by
    its own size: an element whose difference is of rounding size comes out at full step size
    with a sign set by the summation order, so the probe itself is not comparable across ranks
    element by element, while its input is."""
    saved = torch.load(os.path.join(out, "probe.pt"), map_location="cpu")
    if variant == "reference" and saved.get("signal"):
        return [torch.as_tensor(t) for t in saved["signal"]], float(saved["signal_scale"])
    return [torch.as_tensor(t) for t in saved["vectors"]], None


def probe_diff(got: tuple[list[torch.Tensor], float | None], want: tuple[list[torch.Tensor], float | None]) -> float:
    """max |got - want| over the reference run's scale (its own max |value| where it has none)."""
    if want[1] is None:
        return max_rel_diff(got[0], want[0])
    diff, _ = max_abs_diff(got[0], want[0])
    return diff / want[1] if want[1] > 0 else diff


def max_rel_diff(got, want) -> float:
    """max |got - want| over max |want|, both taken over all the tensors together (the
    trained weights, or the probe, as one vector). Per-tensor scaling is deliberately not
    used: LoRA B starts at zero and after a few Adam steps holds values of the size of the
    learning rate, where Adam's g/sqrt(v) turns a 1e-7 relative difference of a small
    gradient (summation order differs across ranks) into ~1e-5 of that tensor's scale. A real
    error (a missed all-reduce, a perturbation the forward does not see) moves the weights
    by whole optimizer steps, orders of magnitude above the tolerance."""
    diff, scale = max_abs_diff(got, want)
    return diff / scale if scale > 0 else diff


def max_abs_diff(got, want) -> tuple[float, float]:
    """(max |got - want|, max |want|) over all the tensors together: a dict of named tensors
    (the same names on both sides) or a list (the same length), each pair of one shape."""
    if isinstance(want, dict):
        if set(got) != set(want):
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            raise ValueError(f"saved tensors differ: missing {missing[:3]}, unexpected {extra[:3]}")
        pairs = [(got[k], want[k]) for k in sorted(want)]
    else:
        if len(got) != len(want):
            raise ValueError(f"probe has {len(got)} tensors, reference {len(want)}")
        pairs = list(zip(got, want))
    diff, scale = 0.0, 0.0
    for a, b in pairs:
        a, b = a.double(), b.double()
        if a.shape != b.shape:
            raise ValueError(f"shape {tuple(a.shape)} != reference {tuple(b.shape)}")
        if a.numel():
            diff = max(diff, (a - b).abs().max().item())
            scale = max(scale, b.abs().max().item())
    return diff, scale


def run_one(backend: str, variant: str, out: str, args, threads: str | None = None,
            setting: str = "exact") -> tuple[bool, str, float]:
    cmd = command(backend, variant, out, args, setting)
    env = _env()
    if threads:
        env["OMP_NUM_THREADS"] = threads
    if args.verbose:
        print("$", " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.time() - start
    log = (proc.stdout or "") + (proc.stderr or "")
    with open(out + ".log", "w") as fh:
        fh.write(" ".join(cmd) + "\n" + log)
    return proc.returncode == 0, log, seconds


def parse_args(argv: list[str] | None):
    from sap_dist.help_format import DefaultsHelpFormatter

    p = argparse.ArgumentParser(
        prog="sap-dist check-equivalence", formatter_class=DefaultsHelpFormatter,
        description="Train the same model on the same global batches with each backend and compare the trained "
        "weights and the probe with a one-process run.",
    )
    p.add_argument("--backends", default="single,ddp,zero2,zero3,fsdp2",
                   help="comma-separated backends; `single` (the reference) is always run")
    p.add_argument("--variants", default="paper,reference", help="comma-separated SAP variants")
    p.add_argument("--methods", default="sap",
                   help="comma-separated values of the `method` key (sap_dist.methods: e.g. sap, lisa, anchor, "
                   "sap+anchor): a probing method runs each of --variants, any other is compared by its trained "
                   "weights alone, under the `exact` setting only")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated SAP settings each variant runs under: {', '.join(SETTINGS)} "
                   "(shown in the table as variant@setting)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    p.add_argument("--nproc", type=int, default=2, help="processes per distributed run (torchrun --nproc_per_node)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest max relative difference accepted")
    p.add_argument("--no-noise-floor", dest="noise_floor", action="store_false",
                   help="do not rerun `single` with another thread count to measure the float noise floor; "
                   "judge by --tolerance alone")
    p.add_argument("--config", default=None, help=f"trainer config file or preset (default: {DEFAULT_CONFIG}, a seeded 4-layer fp32 Llama)")
    p.add_argument("--work-dir", default=None, help="where runs are written (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the runs' directories")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    p.add_argument("--verbose", action="store_true", help="print each launch command")
    p.add_argument("overrides", nargs="*", help="trainer overrides section.key=value, applied to every run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    from sap_dist import methods as registry

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = []
    for m in methods:
        try:
            registry.select(m)
        except ValueError:
            bad.append(m)
    if bad:
        print(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(registry.names())}", file=sys.stderr)
        return 2
    asked = [v.strip() for v in args.variants.split(",") if v.strip()]
    if [v for v in asked if v not in SAP_VARIANTS]:
        print(f"unknown variant(s) {', '.join(v for v in asked if v not in SAP_VARIANTS)}; choose from "
              f"{', '.join(SAP_VARIANTS)}", file=sys.stderr)
        return 2
    variants = cases_of(methods, asked)
    from sap_dist.backends import BACKENDS

    unknown = [b for b in backends if b not in BACKENDS or b == "auto"]
    if unknown:
        print(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(b for b in BACKENDS if b != 'auto')}",
              file=sys.stderr)
        return 2
    settings = [x.strip() for x in args.settings.split(",") if x.strip()]
    if [x for x in settings if x not in SETTINGS]:
        print(f"unknown setting(s) {', '.join(x for x in settings if x not in SETTINGS)}; choose from {', '.join(SETTINGS)}",
              file=sys.stderr)
        return 2
    backends = ["single"] + [b for b in backends if b != "single"]
    work = args.work_dir or tempfile.mkdtemp(prefix="sap-equivalence-")
    os.makedirs(work, exist_ok=True)

    rows, failed = [], False
    # the SAP settings change nothing for a method without a probe: it runs once, as given
    cases = [(v, x) for x in settings for v in variants if case_overrides(v)[1] is not None or x == settings[0]]
    for variant, setting in cases:
        shown = variant if setting == "exact" else f"{variant}@{setting}"
        ref, floor = None, (0.0, 0.0)
        runs = [(b, None) for b in backends]
        if args.noise_floor:
            # `single` again with another intra-op thread count: the same computation summed in
            # another order. How far that moves the result is the float noise floor of this
            # model and these settings (Adam turns tiny gradients into whole steps, so it can
            # exceed 1e-5 even in fp32); a backend within a small multiple of it is as equal
            # to one process as one process is to itself.
            threads = "2" if _env().get("OMP_NUM_THREADS") == "1" else "1"
            runs.insert(1, ("single", threads))
        for backend, threads in runs:
            label = backend if threads is None else f"single@{threads}thr"
            out = os.path.join(work, f"{label}-{shown}".replace("/", "-"))  # `sap+anchor/paper`: one folder
            shutil.rmtree(out, ignore_errors=True)
            print(f"running {label} / {shown} ...", flush=True)
            ok, log, seconds = run_one(backend, variant, out, args, threads, setting)
            row = {"backend": label, "variant": shown, "seconds": seconds, "weights": None, "probe": None}
            if not ok:
                row["status"] = "RUN FAILED"
                print(f"--- {label} / {shown} failed; last lines of its log ({out}.log):\n"
                      + "\n".join(log.strip().splitlines()[-25:]), file=sys.stderr)
            else:
                try:
                    weights = trained_weights(out)
                    probe_variant = case_overrides(variant)[1]
                    pr = None if probe_variant is None else probe(out, probe_variant)
                    if ref is None and backend == "single":
                        ref = (weights, pr)
                        row.update(weights=0.0, probe=0.0, status="reference")
                    elif ref is None:
                        row["status"] = "NO REFERENCE"
                    else:
                        row["weights"] = max_rel_diff(weights, ref[0])
                        row["probe"] = probe_diff(pr, ref[1]) if pr else 0.0
                        if threads is not None:
                            floor = (row["weights"], row["probe"])
                            row["status"] = "noise floor"
                        else:
                            row["status"] = judge(row["weights"], row["probe"], floor, args.tolerance)
                except (OSError, ValueError, RuntimeError) as exc:
                    row["status"] = f"BAD OUTPUT: {exc}"
            failed |= row["status"].split()[0] not in ("ok", "reference", "noise")
            rows.append(row)

    print(format_table(rows, args))
    if not args.keep and not args.work_dir and not failed:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"runs kept in {work}")
    return 1 if failed else 0


NOISE_FACTOR = 4.0
"""A difference above --tolerance still passes when within this multiple of the noise floor."""


def judge(weights: float, probe_diff: float, floor: tuple[float, float], tolerance: float) -> str:
    """`ok` within tolerance, `ok (noise)` within NOISE_FACTOR x the single-process noise
    floor, else `DIFFERS`."""
    if weights <= tolerance and probe_diff <= tolerance:
        return "ok"
    if weights <= max(tolerance, NOISE_FACTOR * floor[0]) and probe_diff <= max(tolerance, NOISE_FACTOR * floor[1]):
        return "ok (noise)"
    return "DIFFERS"


def format_table(rows: list[dict], args) -> str:
    def num(x):
        return "-" if x is None else f"{x:.2e}"

    head = ("backend", "variant", "weights max rel diff", "probe max rel diff", "time", "status")
    # the reference variant's probe column compares u_harm - u_here (the input of its probe's
    # AdamW step) relative to max |u_harm|: see `probe`
    body = [(r["backend"], r["variant"], num(r["weights"]), num(r["probe"]), f"{r['seconds']:.0f}s", r["status"])
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    rule = f"; or within {NOISE_FACTOR:g}x the noise floor" if args.noise_floor else ""
    out = [f"\nequivalence vs single: {args.steps} steps, {args.nproc} processes, tolerance {args.tolerance:g}{rule}",
           line(head), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    if any(r["variant"].split("@")[0].endswith("reference") for r in rows):
        out.append("reference: the probe column compares u_harm - u_here, the input of its probe's AdamW step, "
                   "relative to max |u_harm| (docs/distributed.md)")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
