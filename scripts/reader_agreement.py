"""How far two careful readers agree: the second readers' labels of 300 answers, 150 per labelling
round (`sap_dist/bundled/judge_labels_second_reader.jsonl`, labelled without seeing the first labels)
against the first labels of the same answers (`judge_labels.jsonl`).

    python scripts/reader_agreement.py
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    from sap_dist.evaluation.judge_labels import LABELS_FILE, SECOND_READER_FILE, agreement, load_labels

    first = {(r["prompt"], r["answer"]): r["label"] for r in load_labels(LABELS_FILE)}
    second = load_labels(SECOND_READER_FILE)
    score = agreement([first[(r["prompt"], r["answer"])] for r in second], [r["label"] for r in second])
    print(json.dumps(score))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
