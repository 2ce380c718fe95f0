"""sap-dist: safety-aware probing (SAP) fine-tuning, on one process or many.

The folders are the architecture: `methods/` (one module per training method, found by a
registry), `backends/` (single, DDP, ZeRO-2/3, FSDP2 behind one interface), `evaluation/`
(generation, judges, prompt sets), `experiment/` (the side-by-side experiment), `run_control/`
(checkpoints, stop requests, preflight checks) and `tools/` (plan, bench, check-equivalence,
fetch-model). The trainer (`train.py`), the alignment stage (`align.py`), the config, data and
model loading stay at the top.
"""

import os

__version__ = "0.1.0"

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
"""Where the package's data lives (`bundled/`, `configs/`, `archs/`), for modules in sub-packages."""
