"""The compute dtype `auto` picks (sap_dist/hardware.py): bf16 only where the CPU has bf16
instructions (or on a GPU), and the trainer's warning where bf16 is set on a CPU without them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sap_dist.hardware import cpu_has_fast_bf16, resolve_dtype

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flags, fast", [("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 amx_bf16 amx_tile", True),
                                         ("fpu avx2 avx512f avx512bw", False), ("fpu sse2 avx avx2 fma", False)])
def test_cpu_flags_decide_fast_bf16(flags, fast, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\n")
    assert cpu_has_fast_bf16(str(info)) is fast
    assert cpu_has_fast_bf16(str(tmp_path / "missing")) is None


def test_resolve_dtype_keeps_an_explicit_one_and_refuses_others():
    assert resolve_dtype("bf16") == ("bf16", "as set") and resolve_dtype("fp32") == ("fp32", "as set")
    with pytest.raises(ValueError, match="dtype must be one of auto, bf16, fp32, got 'fp16'"):
        resolve_dtype("fp16")
    import torch

    dtype, why = resolve_dtype("auto")
    if not torch.cuda.is_available() and cpu_has_fast_bf16() is not None:
        assert dtype == ("bf16" if cpu_has_fast_bf16() else "fp32") and why.startswith("auto: this CPU")


def test_experiment_and_align_default_to_auto():
    from sap_dist.align import build_parser
    from sap_dist.experiment.settings import settings_from

    assert settings_from("quick").dtype == "auto" and settings_from("tiny").dtype == "fp32"
    assert build_parser().parse_args(["--out", "x"]).dtype == "auto"
    with pytest.raises(ValueError, match="dtype must be one of auto, bf16, fp32, got 'half'"):
        settings_from("quick", dtype="half")


def test_trainer_warns_of_bf16_on_a_cpu_without_bf16_instructions(tmp_path):
    cmd = [sys.executable, "-m", "sap_dist.train", "--config", "tiny", "model.dtype=bf16", "method=sft",
           "train.max_steps=1", "train.progress_bar=false", "train.tensorboard=false", f"train.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warned = "model.dtype=bf16 on a CPU without bf16 instructions" in proc.stderr
    assert warned == (cpu_has_fast_bf16() is False)
