"""Evaluate the input guard on tests/data/guard_eval.jsonl and time it.

Prints recall on attacks and false-positive rate on benign messages, per split (tune / holdout),
language and source, then p50/p99 latency of ``InputGuard.check``. A message counts as detected when the
guard does anything but allow it.

    python bench/guard_eval.py [--data FILE] [--errors tune|holdout|all] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
                rule = decision.rule or "-"
                print(f"  MISS {row['label']:6} {row['language']} {rule:40} {row['text'][:100]!r}")

    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        split = row.get("split", "all")
        groups[f"{split:8} all"].append(row)
        groups[f"{split:8} {row['language']}"].append(row)
        groups[f"{split:8} {row['language']} {row['source']}"].append(row)
        groups[f"{'overall':8} {row['language']}"].append(row)
    width = max(len(name) for name in groups) + 2
    print(f"\n{'group':<{width}}")
    for name in sorted(groups):
        print(f"{name:<{width}} {fmt(*rates(groups[name], detected))}")

    # Per message: every timing (what a busy machine gives) and the best of the passes (the cost of the
    # check itself, without scheduler noise from other processes on a shared machine).
    per_message: list[list[float]] = [[] for _ in rows]
    for _ in range(args.repeat):
        for index, row in enumerate(rows):
            t0 = time.perf_counter_ns()
            guard.check(row["text"])
            per_message[index].append((time.perf_counter_ns() - t0) / 1000)
    every = sorted(t for times in per_message for t in times)
    best = sorted(min(times) for times in per_message)
    short = sorted(min(times) for times, row in zip(per_message, rows, strict=True) if len(row["text"]) <= 80)
    print(f"\nlatency of check() over {len(every)} calls ({len(rows)} messages x {args.repeat}):")
    print(f"  all calls:        p50 {percentile(every, 50):7.0f} us   p99 {percentile(every, 99):7.0f} us")
    print(f"  best per message: p50 {percentile(best, 50):7.0f} us   p99 {percentile(best, 99):7.0f} us")
    print(f"  best, <= 80 chars ({len(short)} messages): p50 {percentile(short, 50):.0f} us")


def percentile(sorted_values: list[float], pct: float) -> float:
    """The ``pct`` percentile of already sorted values (nearest rank)."""
    rank = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


if __name__ == "__main__":
    main()
