"""The one rule for a run's global batch sizes over N ranks, shared by the trainer, `sap-dist
config --world-size N`, `sap-dist plan` and the docs (docs/distributed.md):

- `train.batch_size` B must divide evenly over the N ranks (each takes B/N rows). It is the
  optimisation's batch, so it is never changed behind the user's back.
- The probe rows P are the multiple of N nearest to `sap.probe_batch_fraction` x B, at least N
  (one row per rank) and at most B. The probe passes use the strided rows floor(i*B/P), i < P,
  which then fall P/N into every rank's slice. When fraction x B already rounds to a multiple
  of N, P is exactly that, so such a run probes the rows one process probes.
- The safety pairs per step (`sap.safety_batch_size`, or Lisa's `lisa.batch_size`) are rounded
  up to a multiple of N: every rank takes the same number of pairs.

Anything else (a train batch that does not divide) is a ConfigError naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sap_dist.config import Config, ConfigError


def check_task_batch(batch_size: int, world_size: int) -> None:
    """`train.batch_size` divides evenly over the ranks; ConfigError naming the nearest that do."""
    if batch_size >= world_size and batch_size % world_size == 0:
        return
    below = batch_size // world_size * world_size
    nearest = f"{below} or {below + world_size}" if below else f"{world_size}"
    raise ConfigError(f"train.batch_size={batch_size} is a global batch size and must divide evenly over the "
                      f"{world_size} ranks; the nearest that do: {nearest}")


def probe_row_count(batch_size: int, fraction: float, world_size: int) -> int:
    """Rows of a global batch the probe passes use: the multiple of `world_size` nearest to
    `fraction` x `batch_size` (ties as Python's round), at least one row per rank and at most
    the batch. One process gets round(fraction x batch_size), at least 1."""
    check_task_batch(batch_size, world_size)
    per_rank = round(fraction * batch_size / world_size)
    return world_size * min(batch_size // world_size, max(1, per_rank))


def safety_pair_count(pairs: int, world_size: int) -> int:
    """Safety pairs per step: `pairs` rounded up to a multiple of the ranks."""
    return -(-pairs // world_size) * world_size


def safety_key(cfg: Config) -> tuple[str, int] | None:
    """The config key and value of the global number of safety pairs per step, as the method
    declares them (SAP's safety batch, Lisa's alignment batch); None for a method without."""
    from sap_dist import methods

    declared = methods.select(cfg.method).method.safety_pairs
    return declared(cfg) if declared else None


@dataclass(frozen=True)
class EffectiveBatches:
    """The batch sizes a run uses at a world size, after the rounding of the module docstring."""

    world_size: int
    """Ranks the global batches are split over."""
    task_rows: int
    """Task rows per step, global (`train.batch_size`, never rounded)."""
    fraction: Optional[float] = None
    """`sap.probe_batch_fraction` (None: the method has no probe passes)."""
    probe_rows: Optional[int] = None
    """Rows the probe passes use per step, global (None: no probe passes)."""
    safety_key: Optional[str] = None
    """The key that sets the safety pairs: `sap.safety_batch_size` or `lisa.batch_size` (None: sft)."""
    safety_asked: Optional[int] = None
    """The safety pairs per step the config asks for."""
    safety_pairs: Optional[int] = None
    """The safety pairs per step the run uses, global (None: the method has no safety data)."""

    @property
    def probe_asked(self) -> Optional[int]:
        """fraction x train.batch_size rounded to whole rows, before the rounding to the ranks."""
        return None if self.fraction is None else round(self.fraction * self.task_rows)

    def rounded(self) -> list[str]:
        """What the rounding changed, one phrase each (empty when the numbers already divide)."""
        n = self.world_size
        out = []
        if self.probe_rows is not None and self.probe_rows != self.probe_asked:
            out.append(f"probe rows {self.probe_rows} ({self.probe_rows // n} per rank): sap.probe_batch_fraction="
                       f"{self.fraction:g} of train.batch_size={self.task_rows} gives {self.probe_asked}, rounded to "
                       f"the nearest multiple of the {n} rank{'s' if n > 1 else ''} (at least one row per rank)")
        if self.safety_pairs is not None and self.safety_pairs != self.safety_asked:
            out.append(f"safety pairs {self.safety_pairs} ({self.safety_pairs // n} per rank): {self.safety_key}="
                       f"{self.safety_asked} rounded up to a multiple of the {n} ranks")
        return out

    def describe(self) -> str:
        """One line: every global batch and its share per rank."""
        n = self.world_size
        parts = [f"train.batch_size {self.task_rows} ({self.task_rows // n} per rank)"]
        if self.probe_rows is not None:
            parts.append(f"probe rows {self.probe_rows} ({self.probe_rows // n} per rank)")
        if self.safety_pairs is not None:
            parts.append(f"safety pairs {self.safety_pairs} ({self.safety_pairs // n} per rank)")
        return f"at {n} rank{'s' if n > 1 else ''}: " + ", ".join(parts)

    def record(self) -> dict:
        """What summary.json records of the batches the run used."""
        return {"world_size": self.world_size, "train_batch_size": self.task_rows, "probe_rows": self.probe_rows,
                "safety_pairs": self.safety_pairs}


def effective_batches(cfg: Config, world_size: int) -> EffectiveBatches:
    """The batches `cfg` runs with at `world_size` ranks; ConfigError if the train batch does not divide."""
    if world_size < 1:
        raise ConfigError(f"the world size must be at least 1, got {world_size}")
    check_task_batch(cfg.train.batch_size, world_size)
    from sap_dist import methods

    method = methods.select(cfg.method).method
    probe: dict = {}
    if method.probe_fraction is not None:
        fraction = method.probe_fraction(cfg)
        probe = {"fraction": fraction, "probe_rows": probe_row_count(cfg.train.batch_size, fraction, world_size)}
    safety: dict = {}
    declared = safety_key(cfg)
    if declared is not None:
        key, asked = declared
        safety = {"safety_key": key, "safety_asked": asked, "safety_pairs": safety_pair_count(asked, world_size)}
    return EffectiveBatches(world_size, cfg.train.batch_size, **probe, **safety)


def pinned_overrides(batches: EffectiveBatches) -> list[str]:
    """Overrides under which any world size dividing these batches (one process included) uses
    exactly these probe rows and safety pairs: for comparing runs across world sizes."""
    out = []
    if batches.probe_rows is not None and batches.probe_rows != batches.probe_asked:
        out.append(f"sap.probe_batch_fraction={batches.probe_rows / batches.task_rows!r}")
    if batches.safety_pairs is not None and batches.safety_pairs != batches.safety_asked:
        out.append(f"{batches.safety_key}={batches.safety_pairs}")
    return out
