"""Training methods as plug-ins: one module per method under `sap_dist/methods/`, found here.

A method module declares `METHOD = Method(...)`: its config section, its state, its step over
the `Backend` interface, what the bench charges it, what `sap-dist plan` adds to memory and its
labels in the experiment. An add-on term (a loss added to another method's task steps, such as
the safety anchor) declares `TERM = Term(...)` the same way. The trainer, the bench,
check-equivalence, the experiment and the planner read this registry, so adding a method is one
new module here.

The top-level config key `method` names one method, optionally followed by terms:
`sap`, `lisa+anchor`, `sap+anchor`; a term alone (`anchor`) is plain fine-tuning plus it.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from sap_dist.errors import ConfigError


def _no_state(section: Any, setup: "RunSetup") -> None:
    return None


def _same_steps(section: Any, task_steps: int) -> int:
    return task_steps


def _no_check(section: Any, total_steps: int) -> None:
    return None


@dataclass
class RunSetup:
    """What a method or term may use to build its state before the first step."""

    backend: Any
    """The training backend (`sap_dist.backends.base.Backend`)."""
    probe: Any = None
    """The SAP probe, for a method that declares `uses_probe`."""
    safety_pairs: list[dict] | None = None
    """The encoded safety pairs (`data.encode_safety`), for a method or term that needs them."""
    pad_id: int = 0
    """The tokenizer's padding id."""
    seed: int = 0
    """`train.seed`."""


@dataclass
class RunState:
    """What a run carries from step to step: its method's state and each term's, checkpointed
    part by part through their fields' metadata (`sap_dist.run_control.checkpoint`)."""

    method: Any = None
    """The method's state (`new_state`), or None for a method without one."""
    terms: dict[str, Any] = field(default_factory=dict)
    """Each add-on term's state, by term name."""

    def parts(self) -> dict[str, Any]:
        """The states to checkpoint, by name: `method`, then the terms."""
        return ({"method": self.method} if self.method is not None else {}) | dict(self.terms)


@dataclass(frozen=True)
class Method:
    """A training method: what one task step does."""

    name: str
    """The value of the `method` key that selects it."""
    summary: str
    """One line for `--help` and the docs."""
    step: Callable[..., dict]
    """step(inputs: StepInputs, section, state) -> metrics: one task step (with whatever extra
    optimizer steps the method takes before it), ending with the optimizer step."""
    section: str | None = None
    """The config section the method reads (None: it has no settings)."""
    config: type | None = None
    """That section's dataclass (typed fields, a docstring each); `check(section)` on it, if
    defined, validates values that need more than their type."""
    new_state: Callable[[Any, RunSetup], Any] = _no_state
    """new_state(section, setup): what the method carries from step to step (a dataclass whose
    fields are checkpointed, see `sap_dist.run_control.checkpoint._fields`), or None."""
    uses_probe: bool = False
    """The trainer attaches the SAP probe (`sap_dist.probe.Probe`) and gives it to the step."""
    safety_pairs: Callable[[Any], tuple[str, int]] | None = None
    """safety_pairs(config) -> (the key that sets them, global pairs per step) for a method that
    draws safety pairs every step; None for one that does not."""
    probe_fraction: Callable[[Any], float] | None = None
    """probe_fraction(config): the share of the task batch the probe passes use."""
    optimizer_steps: Callable[[Any, int], int] = _same_steps
    """optimizer_steps(section, task_steps): optimizer steps taken through that many task
    steps (Lisa's alignment steps share the optimizer and LR schedule)."""
    check_run: Callable[[Any, int], None] = _no_check
    """check_run(section, total_steps): refuse settings that make no sense for the run's length."""
    label: Callable[[Any], str] | None = None
    """label(section): the method as the progress bar and summary.json name it (default: name)."""
    variant: Callable[[Any], str | None] | None = None
    """variant(section): summary.json's `variant` (None for a method without variants)."""
    bench_cycle: Callable[[Any], int] = lambda section: 1
    """Steps after which the method's cost repeats (its refresh intervals): the bench measures
    whole cycles, so a refresh every k steps is charged."""
    bench_amortized_pass: str | None = None
    """A pass that runs once per `bench_cycle` steps (its metrics key `time_<pass>`), which the
    bench charges every step 1/cycle of instead of measuring whole cycles (Lisa's alignment)."""
    plan_memory: str = "none"
    """What `sap-dist plan` adds to memory: `none`, `probe` (the probe passes and safety batch),
    `master_copy` (one fp32 copy of each rank's shard of the trained weights)."""
    experiment: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    """Experiment method names this module provides: name -> (label, trainer overrides)."""


@dataclass(frozen=True)
class Term:
    """A loss added to a method's task steps (`method=sap+anchor`)."""

    name: str
    """The term's name in the `method` key."""
    summary: str
    """One line for `--help` and the docs."""
    section: str
    """Its config section."""
    config: type
    """That section's dataclass."""
    build: Callable[[Any, RunSetup], tuple[Any, Callable[[Any, dict], None]]]
    """build(section, setup) -> (state, apply): its checkpointed state and
    apply(backend, metrics), which backpropagates the term's loss into the gradient of the
    task step under way (called after the task backward, before the optimizer step)."""
    needs_safety_pairs: bool = False
    """The term reads the safety pairs (the trainer loads `data.safety`)."""
    experiment: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    """Experiment method names this term provides: name -> (label, trainer overrides)."""


@dataclass(frozen=True)
class Selection:
    """What a `method` key selects: one method and the terms added to its task steps."""

    method: Method
    terms: tuple[Term, ...] = ()

    @property
    def name(self) -> str:
        return "+".join([self.method.name] + [t.name for t in self.terms])

    @property
    def reads_safety_data(self) -> bool:
        """The run loads `data.safety` (the method draws pairs each step, or a term reads them)."""
        return self.method.safety_pairs is not None or any(t.needs_safety_pairs for t in self.terms)

    def section(self, config: Any) -> Any:
        """The method's own config section (None for a method without settings)."""
        return getattr(config, self.method.section) if self.method.section else None

    def label(self, config: Any) -> str:
        """How the progress bar and summary.json name what runs, e.g. `sap/paper+anchor`."""
        own = self.method.label(self.section(config)) if self.method.label else self.method.name
        return "+".join([own] + [t.name for t in self.terms])


def start(selection: Selection, config: Any, setup: RunSetup) -> tuple[RunState, list[Callable[[Any, dict], None]]]:
    """A run's state before its first step (the method's and each term's: a term's targets come
    from the weights as they are now) and the terms' apply functions, in order."""
    state = RunState(selection.method.new_state(selection.section(config), setup))
    applies = []
    for term in selection.terms:
        state.terms[term.name], apply = term.build(getattr(config, term.section), setup)
        applies.append(apply)
    return state, applies


@functools.lru_cache(maxsize=1)
def _registry() -> tuple[dict[str, Method], dict[str, Term]]:
    methods: dict[str, Method] = {}
    terms: dict[str, Term] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "common":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "METHOD", None), Method):
            methods[module.METHOD.name] = module.METHOD
        if isinstance(getattr(module, "TERM", None), Term):
            terms[module.TERM.name] = module.TERM
    return methods, terms


def methods() -> dict[str, Method]:
    """Every registered method, by name."""
    return dict(_registry()[0])


def terms() -> dict[str, Term]:
    """Every registered add-on term, by name."""
    return dict(_registry()[1])


def sections() -> list[tuple[str, type, str]]:
    """(section name, dataclass, one-line summary) of every method and term with settings."""
    out = [(m.section, m.config, m.summary) for m in methods().values() if m.section]
    return out + [(t.section, t.config, t.summary) for t in terms().values()]


def names() -> list[str]:
    """Every distinct thing the `method` key selects: each method and term alone, and each other
    method with each term (`sft+anchor` is `anchor`, which `select` also accepts)."""
    base = list(methods())
    return base + list(terms()) + [f"{m}+{t}" for m in base if m != "sft" for t in terms()]


def select(key: str) -> Selection:
    """The method and terms a `method` value names; a ConfigError naming the valid ones."""
    parts = [p.strip() for p in str(key).split("+")]
    known_methods, known_terms = methods(), terms()
    first, rest = parts[0], parts[1:]
    if first in known_terms:  # a term alone: plain fine-tuning plus the term
        first, rest = "sft", parts
    if first not in known_methods or any(t not in known_terms for t in rest) or len(set(rest)) != len(rest):
        raise ConfigError(f"method={key!r}: choose a method ({', '.join(known_methods)}), optionally followed by "
                          f"+term ({', '.join(known_terms)}), e.g. sap+anchor")
    return Selection(known_methods[first], tuple(known_terms[t] for t in rest))


def experiment_methods() -> dict[str, tuple[str, dict[str, Any]]]:
    """Every experiment method the registry provides: name -> (label, trainer overrides)."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for entry in list(methods().values()) + list(terms().values()):
        out.update(entry.experiment)
    return out
