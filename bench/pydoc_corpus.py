"""A text no issue names, from the standard library alone: Python's documentation prose (``pydoc_data.topics``),
written as two UTF-8 files for a ``text_files`` corpus.

The topics are joined sorted by key with a blank line (``"\\n\\n"``); the contiguous tail from the last topic
boundary that leaves at least ``--heldout`` of the characters (default 15 %) is the held-out file, everything
before it the calibration file, so no topic is in both. The two files and their character counts / sha256 are
printed (they depend on the Python version's ``pydoc_data``; 3.11.7 here: 79 topics, 465 126 characters, held out
from topic ``types``: 89 301 characters, 19 %).

    python bench/pydoc_corpus.py --out $D/pydoc     # then bench/configs/pydoc_smollm2.yaml in $D
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import pydoc_data.topics


def split_topics(topics: dict[str, str], heldout: float) -> tuple[str, str]:
    """``(calibration text, held-out text)``: the sorted topics joined by ``"\\n\\n"``, cut at the last topic
    boundary at or before ``(1 − heldout)`` of the characters (the separator dropped), so at least ``heldout``
    of them are held out."""
    if not 0.0 < heldout < 1.0:
        raise ValueError(f"--heldout must be in (0, 1), got {heldout}")
    keys = sorted(topics)
    starts, pos = [], 0
    for k in keys:
        starts.append(pos)
        pos += len(topics[k]) + 2
    total = pos - 2
    cut = max((i for i, s in enumerate(starts) if s <= (1.0 - heldout) * total), default=0)
    if cut == 0:
        raise ValueError(f"no topic boundary leaves a held-out tail of {heldout:.0%}")
    head = "\n\n".join(topics[k] for k in keys[:cut])
    tail = "\n\n".join(topics[k] for k in keys[cut:])
    return head, tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for train.txt and heldout.txt")
    ap.add_argument("--heldout", type=float, default=0.15, help="fraction of the characters held out (the tail)")
    a = ap.parse_args()
    head, tail = split_topics(pydoc_data.topics.topics, a.heldout)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}: {len(pydoc_data.topics.topics)} topics")
    for name, text in (("train.txt", head), ("heldout.txt", tail)):
        (out / name).write_text(text, encoding="utf-8")
        print(f"{out / name}: {len(text)} characters, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
