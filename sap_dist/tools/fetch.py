"""`sap-dist fetch-model`: put a run's model and hub data sets where every rank will find them offline, once.

    sap-dist fetch-model --config configs/sap_70b.yaml [overrides]

On a cluster the ranks of every node would otherwise each ask the hub for the model and the
data (and fail where compute nodes have no internet). This command is run once before the ranks
start (by slurm/common.sh on the batch host, or by hand on a login node with internet): a hub
id is downloaded into the Hugging Face cache (`HF_HOME`, which must be on a filesystem every
node sees; `model.cache_dir` if set), a local directory or .gguf file is checked, the embedded
model is fetched and converted. So are the run's hub data sets: `data.task`, and `data.safety`
for the methods that use safety pairs (sap, lisa), when they name a hub dataset; each is loaded
once with `datasets.load_dataset` (split `data.task_split` / `data.safety_split`) into the
datasets cache under `HF_HOME`. A local file, a local directory or a `builtin:` source needs
nothing. The ranks then run with HF_HUB_OFFLINE=1 against that cache. With HF_HUB_OFFLINE=1
already set, it only checks that the model and data are in the cache.
A missing model or data set is one line naming its config key (exit 2), before any GPU time is
spent.
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
            "(for a gated model, `hf auth login` first, with that HF_HOME set), or point model.name_or_path at a local copy"
        ) from None


def hub_datasets(cfg) -> list[tuple[str, str, str]]:
    """(config key, name, split) of each hub dataset a run of `cfg` loads: the names that
    sap_dist.data hands to `datasets.load_dataset`, not the builtin:, file or directory sources."""
    from sap_dist.data import FILE_EXTENSIONS

    wanted = [("data.task", cfg.data.task, cfg.data.task_split)]
    from sap_dist import methods

    if methods.select(cfg.method).reads_safety_data:  # plain sft never reads the safety pairs
        wanted.append(("data.safety", cfg.data.safety, cfg.data.safety_split))
    return [(key, name, split) for key, name, split in wanted
            if not name.startswith("builtin:") and os.path.splitext(name)[1].lower() not in FILE_EXTENSIONS
            and not os.path.exists(name)]


def fetch_dataset(key: str, name: str, split: str) -> None:
    """Load hub dataset `name` once, as the ranks will (same call, so the same cache entry);
    offline it only finds it in the cache. Raises DataError with one line naming `key`."""
    import datasets
    from datasets.config import HF_DATASETS_CACHE, HF_HUB_OFFLINE

    from sap_dist.data import DataError

    try:
        datasets.load_dataset(name, split=split)
    except Exception as exc:  # hub, network, missing split, script errors: all mean "the ranks cannot load it"
        first = str(exc).splitlines()[0] if str(exc).strip() else ""
        how = ("it is not in the cache and HF_HUB_OFFLINE=1" if HF_HUB_OFFLINE
               else f"loading it failed ({type(exc).__name__}: {first})")
        raise DataError(
            f"{key} {name!r} (split {split!r}) is a hub dataset and {how}; cache: {HF_DATASETS_CACHE}. "
            "Run `sap-dist fetch-model --config CONFIG` on a machine with internet and the same HF_HOME, "
            f"or point {key} at a local file"
        ) from None


def main(argv: list[str] | None = None) -> int:
    from sap_dist.config import ConfigError, load_config, parse_overrides
    from sap_dist.data import DataError
    from sap_dist.embedded import EmbeddedModelError
    from sap_dist.models import ModelLoadError

    parser = argparse.ArgumentParser(
        prog="sap-dist fetch-model", description=__doc__.split("\n\n")[0],
        epilog="Also the run's hub data sets (data.task, and data.safety for sap and lisa) into the datasets "
               "cache under HF_HOME; a local file or a builtin: source needs nothing. Run it where there is "
               "internet, with the HF_HOME the ranks will use.")
    parser.add_argument("--config", help="YAML config file, or a preset name")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, parse_overrides(rest))
        where = fetch_model(cfg.model)
        print(f"model {cfg.model.name_or_path}: {where}", flush=True)
        for key, name, split in hub_datasets(cfg):
            fetch_dataset(key, name, split)
            print(f"{key} {name} [{split}]: in the datasets cache", flush=True)
    except (ConfigError, ModelLoadError, EmbeddedModelError, DataError) as exc:
        print(f"sap-dist fetch-model: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
