"""What code computed a result: a digest of sap-dist's own source and the libraries' versions.

Caches keyed by settings alone (the experiment's runs, the aligned start point) also carry it,
so a result is reused only by the code that made it. Without it a change to the step (same
settings, other numbers) reused results the new code would not give, and the experiment's
table mixed runs of two versions (seed 0 of three methods, found by a fresh run in
docs/experiment.md)."""

from __future__ import annotations

import functools
import hashlib
import os


@functools.lru_cache(maxsize=4)
def code_fingerprint(root: str | None = None) -> str:
    """12 hex digits over every `.py` file under `root` (default: the installed sap_dist package),
    path and bytes, and the versions of torch, transformers and peft. A judge's fitted weights
    are not in it: they are in the judge's description (`Judge.describe`), and results judged by
    other weights are judged again from their saved answers, without training again."""
    import peft
    import torch
    import transformers

    root = root or os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__} "
                            f"peft {peft.__version__}".encode())
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as fh:
                digest.update(fh.read())
    return digest.hexdigest()[:12]
