"""Third-party messages a user cannot act on, kept off the console unless asked for
(`sap-dist train --verbose` or SAP_DIST_VERBOSE=1): they made every run look broken."""

from __future__ import annotations

import logging
import os
import warnings

QUIET_LOGGERS = (
    # bitsandbytes (imported by peft) on a CPU without the optional `kernels` package: "Failed to
    # load CPU gemm_4bit_forward from kernels-community" (a slower fallback is used; QLoRA only)
    "bitsandbytes.backends.cpu.ops",
)
QUIET_LOG_MESSAGES = {
    # DeepSpeed, on stdout at import: "Setting accelerator to CPU. If you have GPU or other
    # accelerator, we were unable to detect it." / "Setting ds_accelerator to cpu (auto detect)"
    "DeepSpeed": ("Setting accelerator to", "Setting ds_accelerator to"),
}
QUIET_WARNINGS = (
    # transformers' own deprecations, raised inside transformers (nothing sap-dist's user can change)
    (r"", FutureWarning, r"transformers(\.|$)"),
)


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("SAP_DIST_VERBOSE", "") not in ("", "0")


def quiet_third_party(verbose: bool = False) -> None:
    """Filter the known third-party warnings of this process (a no-op when verbose)."""
    if verbose_requested(verbose):
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, starts in QUIET_LOG_MESSAGES.items():  # a filter set before the import survives it
        logging.getLogger(name).addFilter(lambda record, starts=starts: not record.getMessage().startswith(starts))
    for message, category, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
