"""`sap-dist fetch-model`: put a run's model where every rank will find it offline, once.

    sap-dist fetch-model --config configs/sap_70b.yaml [overrides]

On a cluster the ranks of every node would otherwise each ask the hub for the model (and fail
where compute nodes have no internet). This command is run once before the ranks start (by
slurm/common.sh on the batch host, or by hand on a login node with internet): a hub id is
downloaded into the Hugging Face cache (`HF_HOME`, which must be on a filesystem every node
sees; `model.cache_dir` if set), a local directory or .gguf file is checked, the embedded model
is fetched and converted. The ranks then run with HF_HUB_OFFLINE=1 against that cache. With
HF_HUB_OFFLINE=1 already set, it only checks that the model is complete in the cache.
A missing model is one line (exit 2), before any GPU time is spent.
"""

from __future__ import annotations

import argparse
import os
import sys

WEIGHT_AND_TOKENIZER_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
"""What `from_pretrained` reads of a hub repo (not the .bin/.pth duplicates many repos carry)."""


def fetch_model(cfg) -> str:
    """The local directory (or .gguf file) the ranks will load `cfg` (a ModelConfig) from;
    downloads a hub id unless offline. Raises ModelLoadError with one line."""
    from sap_dist.models import ModelLoadError, resolve_model

    path, gguf_file = resolve_model(cfg)  # the embedded model is fetched and converted here
    if gguf_file is not None:
        return os.path.join(path, gguf_file)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ModelLoadError(f"model.name_or_path {cfg.name_or_path!r}: {path} holds no config.json")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    cache = cfg.cache_dir or HF_HUB_CACHE
    try:
        return snapshot_download(path, revision=cfg.revision, cache_dir=cfg.cache_dir,
                                 allow_patterns=WEIGHT_AND_TOKENIZER_FILES, local_files_only=HF_HUB_OFFLINE)
    except Exception as exc:  # hub errors are many classes (HTTP, offline, gated, validation)
        how = ("it is not in the cache and HF_HUB_OFFLINE=1" if HF_HUB_OFFLINE
               else f"the download failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        raise ModelLoadError(
            f"model.name_or_path {cfg.name_or_path!r} is not a local path and {how}; cache: {cache}. "
            "Run `sap-dist fetch-model --config CONFIG` on a machine with internet and the same HF_HOME "
            "(`huggingface-cli login` first for gated models), or point model.name_or_path at a local copy"
        ) from None


def main(argv: list[str] | None = None) -> int:
    from sap_dist.config import ConfigError, load_config, parse_overrides
    from sap_dist.embedded import EmbeddedModelError
    from sap_dist.models import ModelLoadError

    parser = argparse.ArgumentParser(prog="sap-dist fetch-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config file, or a preset name")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, parse_overrides(rest))
        where = fetch_model(cfg.model)
    except (ConfigError, ModelLoadError, EmbeddedModelError) as exc:
        print(f"sap-dist fetch-model: error: {exc}", file=sys.stderr)
        return 2
    print(f"model {cfg.model.name_or_path}: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
