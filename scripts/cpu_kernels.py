"""Do this CPU's kernels give the same bits as another CPU's, and how fast is bf16 here?

The start point of the experiment is trained on the CPU, so it can only come out the same on
another machine if the kernels it runs on give the same bits there. Other CPUs are emulated by
capping the instruction set torch and oneDNN may use:

    for isa in "" "ONEDNN_MAX_CPU_ISA=AVX512_CORE" "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"; do
        env $isa .venv/bin/python scripts/cpu_kernels.py
    done

(no cap: AMX and AVX512-BF16 where the CPU has them; AVX512_CORE: an AVX-512 CPU without bf16
instructions; AVX2: an older Intel or AMD CPU). Each line gives a digest of the result of a matmul,
an RMS norm, a softmax and a summed reduction at the shapes of the embedded model, for bf16 and
fp32 inputs, at 1 and 2 threads, and the time of the matmul: equal digests mean equal bits.
"""
from __future__ import annotations

import hashlib
import time

import torch


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.float().contiguous().numpy().tobytes()).hexdigest()[:8]


def main() -> None:
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"# torch {torch.__version__}, ATen capability {capability}, "
          f"oneDNN bf16 {'yes' if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'no'}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for dtype in (torch.bfloat16, torch.float32):
            g = torch.Generator().manual_seed(0)
            a = torch.randn(1024, 576, generator=g).to(dtype)  # 8 rows x 128 tokens, hidden 576
            w = torch.randn(576, 1536, generator=g).to(dtype)  # an MLP projection of SmolLM2-135M
            scores = torch.randn(8, 128, 128, generator=g).to(dtype)
            out = {
                "matmul": a @ w,
                "rms_norm": torch.nn.functional.rms_norm(a, (576,)),
                "softmax": torch.softmax(scores, -1),
                "sum": (a @ w).float().sum(),
            }
            for _ in range(2):
                a @ w
            t0 = time.perf_counter()
            for _ in range(10):
                a @ w
            ms = (time.perf_counter() - t0) / 10 * 1e3
            name = "bf16" if dtype == torch.bfloat16 else "fp32"
            print(f"{capability:8s} threads={threads} {name}: "
                  + " ".join(f"{k}={_digest(v)}" for k, v in out.items()) + f"  matmul {ms:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
