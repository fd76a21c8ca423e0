"""Evaluate the input guard on tests/data/guard_eval.jsonl and time it.

Prints recall on attacks and false-positive rate on benign messages, per split (tune / holdout),
language and source, then p50/p99 latency of ``InputGuard.check``. A message counts as detected when the
guard does anything but allow it.

    python bench/guard_eval.py [--data FILE] [--errors tune|holdout|all] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from core.guards import InputGuard

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "guard_eval.jsonl"


def load_rows(path: Path) -> list[dict[str, str]]:
    """The evaluation rows of ``path``."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def rates(rows: Iterable[dict[str, str]], detected: dict[int, bool]) -> tuple[int, int, int, int]:
    """(attacks, attacks detected, benign, benign flagged) over ``rows``."""
    attacks = caught = benign = false_pos = 0
    for row in rows:
        hit = detected[id(row)]
        if row["label"] == "attack":
            attacks += 1
            caught += hit
        else:
            benign += 1
            false_pos += hit
    return attacks, caught, benign, false_pos


def fmt(attacks: int, caught: int, benign: int, false_pos: int) -> str:
    recall = f"{caught / attacks:6.1%} ({caught}/{attacks})" if attacks else "     -"
    fpr = f"{false_pos / benign:6.1%} ({false_pos}/{benign})" if benign else "     -"
    return f"recall {recall:<18} FPR {fpr}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--errors", choices=["tune", "holdout", "all"], help="list misclassified rows")
    parser.add_argument("--repeat", type=int, default=5, help="timing passes over the data")
    args = parser.parse_args()

    started = time.perf_counter()
    guard = InputGuard.load()
    print(f"loaded guard in {(time.perf_counter() - started) * 1000:.0f} ms")
    rows = load_rows(args.data)
    detected: dict[int, bool] = {}
    for row in rows:
        decision = guard.check(row["text"])
        detected[id(row)] = decision.action != "allow"
        if args.errors and args.errors in (row.get("split"), "all"):
            wrong = detected[id(row)] != (row["label"] == "attack")
            if wrong:
                print(f"  MISS {row['label']:6} {row['language']} {decision.rule or '-':40} {row['text'][:110]!r}")

    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        split = row.get("split", "all")
        groups[f"{split:8} all"].append(row)
        groups[f"{split:8} {row['language']}"].append(row)
        groups[f"{split:8} {row['language']} {row['source']}"].append(row)
        groups[f"{'overall':8} {row['language']}"].append(row)
    print(f"\n{'group':<58} {'':18}")
    for name in sorted(groups):
        print(f"{name:<58} {fmt(*rates(groups[name], detected))}")

    timings: list[float] = []
    for _ in range(args.repeat):
        for row in rows:
            t0 = time.perf_counter_ns()
            guard.check(row["text"])
            timings.append((time.perf_counter_ns() - t0) / 1000)
    timings.sort()
    p50 = statistics.median(timings)
    p99 = timings[int(len(timings) * 0.99) - 1]
    short = sorted(t for t, row in zip(timings, rows * args.repeat, strict=True) if len(row["text"]) <= 80)
    print(
        f"\nlatency over {len(timings)} checks: p50 {p50:.0f} us, p99 {p99:.0f} us, max {timings[-1]:.0f} us;"
        f" messages <= 80 chars: p50 {statistics.median(short):.0f} us"
    )


if __name__ == "__main__":
    main()
