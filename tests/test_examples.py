"""Every documented launch command passes the trainer's checks at the world size it names.

The commands are collected from README.md, docs/*.md, the headers of slurm/*.sh, of the
accelerate configs in ds_configs/ and of the example configs in examples/, and docker/ (the Dockerfiles' headers and CMD, the compose
services' commands): `sap-dist train`, `python -m sap_dist.train`, `torchrun`, `accelerate
launch` and `sbatch slurm/...`. Each gets the world size it names (torchrun's --nnodes x
--nproc-per-node, accelerate's --num_processes or its config file's num_processes, sbatch's
nodes x the script's GPUs per node; `--nproc-per-node=gpu` is the 8-GPU box the compose file
is written for) and goes through `sap_dist.run_control.preflight.check`, what every rank runs first and
`sap-dist config --world-size N` runs as a dry run. A config file the repository does not have
(`my.yaml`, `...`) is a user's config that sets nothing: the defaults.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SLURM_ENV = {"SAP_CONFIG": None, "SAP_MODEL": "model.name_or_path", "SAP_TASK_DATA": "data.task",
             "SAP_SAFETY_DATA": "data.safety", "SAP_OUTPUT_DIR": "train.output_dir", "SAP_BACKEND": "dist.backend",
             "SAP_DS_CONFIG": "dist.deepspeed_config"}
"""The recipes' environment variables and the config keys they set (slurm/common.sh)."""
GPU_BOX = 8
"""GPUs of the box `--nproc-per-node=gpu` is documented for (docker-compose's GPU service)."""
LAUNCHERS = ("sap-dist", "python", "python3", "torchrun", "accelerate", "sbatch", "srun", "docker")
"""Programs a launch command starts with (after environment assignments)."""


@dataclass
class Example:
    """One documented launch command, as the trainer will see it."""

    where: str
    """file:line of the command."""
    text: str
    """The command as written."""
    world_size: int
    """The ranks it starts."""
    config: str | None
    """--config (None: the defaults)."""
    overrides: list[str] = field(default_factory=list)
    """Its config overrides, `section.key=value`."""
    env: dict[str, str] = field(default_factory=dict)
    """What the launcher puts in the trainer's environment (accelerate's config)."""


# ------------------------------------------------------------------------------------------
# Where commands are written


def _markdown_commands(path: Path) -> list[tuple[int, str]]:
    """(line, command) of every line of a fenced code block (backslash continuations joined)
    and every inline code span."""
    out, fence, pending, start = [], False, "", 0
    text_only = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            text_only.append("")
            continue
        if not fence:
            text_only.append(line)
            continue
        text_only.append("")
        if not pending:
            start = number
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            out.append((start, pending.strip()))
            pending = ""
    prose = "\n".join(text_only)
    for m in re.finditer(r"`([^`]+)`", prose):
        out.append((prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())))
    return out


def _comment_commands(path: Path) -> list[tuple[int, str]]:
    """(line, command) of the leading comment block of a script or config (the header), with
    backslash continuations joined."""
    out, pending, start = [], "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("#!"):
            continue
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if not pending:
            start = number
        pending += body.removesuffix("\\") + " "
        if not body.endswith("\\"):
            out.append((start, pending.strip()))
            pending = ""
    return out


def _compose_commands() -> list[tuple[str, str]]:
    """(service name, command) of every compose service, with ${VAR:-default} at its default."""
    compose = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    out = []
    for name, service in compose["services"].items():
        command = [re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", part) for part in service["command"]]
        out.append((name, shlex.join(command)))
    return out


def _dockerfile_cmd(path: Path) -> list[tuple[int, str]]:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("CMD "):
            return [(number, shlex.join(json.loads(line[4:])))]
    return []


def _sources() -> list[tuple[str, str]]:
    """(file:line, command) of every place a command is written."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        found += [(f"{path.relative_to(ROOT)}:{n}", c) for n, c in _markdown_commands(path)]
    for path in [*sorted((ROOT / "slurm").glob("*.sh")), *sorted((ROOT / "ds_configs").glob("*.yaml")),
                 *sorted((ROOT / "examples").glob("*.yaml")), *sorted((ROOT / "docker").glob("Dockerfile*")),
                 ROOT / "docker" / "docker-compose.yml"]:
        found += [(f"{path.relative_to(ROOT)}:{n}", c) for n, c in _comment_commands(path)]
        if path.name.startswith("Dockerfile"):
            found += [(f"{path.relative_to(ROOT)}:{n}", c) for n, c in _dockerfile_cmd(path)]
    found += [(f"docker/docker-compose.yml:service {name}", c) for name, c in _compose_commands()]
    return found


# ------------------------------------------------------------------------------------------
# What a command asks for


def _flag(tokens: list[str], *names: str) -> str | None:
    """The value of the first of `names` in `tokens` (`--x v` or `--x=v`)."""
    for i, token in enumerate(tokens):
        for name in names:
            if token == name and i + 1 < len(tokens):
                return tokens[i + 1]
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
    return None


def _train_args(args: list[str]) -> tuple[str | None, list[str]]:
    """(--config, overrides) of the trainer's arguments; a config the repository does not hold
    is the user's own: the defaults."""
    from sap_dist.config import parse_overrides, preset_names

    config = _flag(args, "--config")
    rest, skip = [], False
    for token in args:
        if skip:
            skip = False
        elif token == "--config":
            skip = True
        elif not token.startswith("--config=") and token not in ("--verbose",):
            rest.append(token)
    if config and not (ROOT / config).exists() and config not in preset_names():
        config = None
    return (str(ROOT / config) if config and (ROOT / config).exists() else config), parse_overrides(rest)


def _accelerate(options: list[str]) -> tuple[int, dict[str, str]]:
    """(processes, environment) of `accelerate launch OPTIONS`: --num_processes, else the config
    file's num_processes, else 1; the ACCELERATE_* variables accelerate sets from its config."""
    env: dict[str, str] = {}
    file = _flag(options, "--config_file", "--config-file")
    cfg = yaml.safe_load((ROOT / file).read_text()) if file else {}
    kind = cfg.get("distributed_type")
    if kind == "DEEPSPEED":
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        ds = cfg.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = ds["deepspeed_config_file"]
        if ds.get("zero_stage"):
            env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = str(ds["zero_stage"])
    elif kind == "FSDP":
        env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION=str((cfg.get("fsdp_config") or {}).get("fsdp_version", 2)))
    if cfg.get("mixed_precision"):
        env["ACCELERATE_MIXED_PRECISION"] = str(cfg["mixed_precision"])
    processes = _flag(options, "--num_processes", "--num-processes") or cfg.get("num_processes", 1)
    return int(processes), env


def _torchrun(options: list[str]) -> int:
    per_node = _flag(options, "--nproc_per_node", "--nproc-per-node") or "1"
    nodes = _flag(options, "--nnodes") or "1"
    return int(nodes.split(":")[-1]) * (GPU_BOX if per_node == "gpu" else int(per_node))


def _sbatch(where: str, text: str, env: dict[str, str], tokens: list[str]) -> Example | None:
    script = next((t for t in tokens if t.endswith(".sh")), None)
    if not script:
        return None  # an sbatch option shown alone
    path = ROOT / "slurm" / Path(script).name
    header = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", path.read_text(), re.M))
    options, args = tokens[1:tokens.index(script)], tokens[tokens.index(script) + 1:]
    nodes = int(_flag(options, "--nodes", "-N") or header["nodes"])
    # Slurm's --gpus-per-node is [type:]count (h100:8)
    gpus = env.get("SAP_NPROC_PER_NODE") or _flag(options, "--gpus-per-node") or header["gpus-per-node"]
    per_node = int(gpus.rsplit(":", 1)[-1])
    config = env.get("SAP_CONFIG") or re.search(r"^SAP_RECIPE=(\S+)", path.read_text(), re.M).group(1)
    overrides = [f"{key}={env[var]}" for var, key in SLURM_ENV.items() if key and var in env]
    overrides += env.get("SAP_EXTRA_ARGS", "").split() + _train_args(args)[1]
    return Example(where, text, nodes * per_node, str(ROOT / config), overrides)


def _train_start(tokens: list[str]) -> int | None:
    """Index of the trainer's first argument: after `-m sap_dist.train`, `-m sap_dist train` or
    `sap-dist train` (None: no trainer is started)."""
    for i in range(len(tokens) - 1):
        if tokens[i:i + 2] == ["-m", "sap_dist.train"]:
            return i + 2
        if tokens[i:i + 3] == ["-m", "sap_dist", "train"]:
            return i + 3
        if Path(tokens[i]).name == "sap-dist" and tokens[i + 1] == "train":
            return i + 2
    return None


def parse(where: str, text: str) -> Example | None:
    """The launch `text` names, or None when it is no launch command."""
    try:
        tokens = [t for t in shlex.split(text, comments=True) if t not in ("...", "\\")]
    except ValueError:
        return None
    env = {}
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    if not tokens or not Path(tokens[0]).name.startswith(LAUNCHERS):
        return None
    if Path(tokens[0]).name == "sbatch":
        return _sbatch(where, text, env, tokens)
    start = _train_start(tokens)
    if start is None:
        return None
    launcher, args = tokens[:start], tokens[start:]
    names = [Path(t).name for t in launcher]
    if "torchrun" in names or "torch.distributed.run" in launcher:
        world, launch_env = _torchrun(launcher), {}
    elif "accelerate" in names and "launch" in launcher:
        world, launch_env = _accelerate(launcher[launcher.index("launch") + 1:])
    elif "srun" in names:
        return None  # a pattern (one task per rank), no world size named
    else:
        world, launch_env = 1, {}
    config, overrides = _train_args(args)
    return Example(where, text, world, config, overrides, launch_env)


def examples() -> list[Example]:
    found = [parse(where, text) for where, text in _sources()]
    return [e for e in found if e]


EXAMPLES = examples()


def test_the_collection_finds_every_kind_of_launch():
    worlds = {(e.where.split(":")[0], e.world_size) for e in EXAMPLES}
    assert ("slurm/sap_70b.sh", 32) in worlds and ("slurm/sap_70b.sh", 16) in worlds  # --nodes=4, the header's 2
    assert ("docker/docker-compose.yml", GPU_BOX) in worlds and ("docker/docker-compose.yml", 1) in worlds
    assert not any(e.where.startswith("slurm/node.sh") for e in EXAMPLES)  # a description, not a command
    assert ("ds_configs/accelerate_multinode_zero3.yaml", 16) in worlds
    assert {e.where.split(":")[0] for e in EXAMPLES} >= {"README.md", "docs/cluster.md", "docs/distributed.md",
                                                         "slurm/sap_7b.sh", "docker/Dockerfile"}
    assert len(EXAMPLES) >= 30


@pytest.mark.parametrize("example", [pytest.param(e, id=e.where) for e in EXAMPLES])
def test_documented_command_passes_the_trainers_checks(example, monkeypatch):
    from sap_dist.run_control import preflight
    from sap_dist.config import ConfigError, load_config

    monkeypatch.chdir(ROOT)  # paths in the commands are relative to the checkout
    try:
        preflight.check(load_config(example.config, example.overrides), example.world_size, env=example.env,
                        installed=False)
    except ConfigError as exc:
        pytest.fail(f"{example.where}: `{example.text}` at {example.world_size} ranks: {exc}")
