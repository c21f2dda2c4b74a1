"""Compare the outputs of two runs of the job, row by row, keyed by (id, sample).

    python scripts/compare_outputs.py BEFORE_DIR AFTER_DIR

BEFORE_DIR/AFTER_DIR are job output directories (their ``data/`` folder is read). Compared per row:
status, error, text, label, label_probs (exactly), finish_reason, token_count, seed, and the
per-member statistics that do not depend on timing. Run ids, config hashes and latencies are not
compared (a refactor changes the hash; latency is wall time). Exit 0 when every row matches, 1 with
a list of differences otherwise, 2 when a directory holds no rows.
"""
from __future__ import annotations

import argparse
import logging
import sys

import pyarrow.parquet as pq

FIELDS = ("status", "error", "text", "label", "label_probs", "finish_reason", "token_count", "seed")
STATS = ("name", "role", "weight", "calls", "tokens_in", "tokens_out", "agreement", "mean_kl", "proposed",
         "accepted", "mean_score", "rounds_active", "exit_round")
log = logging.getLogger("compare_outputs")


def load_rows(output_dir: str) -> dict[tuple[str | None, int], list[dict]]:
    """(id, sample) -> the rows with that key (more than one where the input repeats an id: the
    duplicates' error rows), in a canonical order."""
    table = pq.read_table(f"{output_dir.rstrip('/')}/data")
    rows: dict[tuple[str | None, int], list[dict]] = {}
    for r in table.to_pylist():
        row = {f: r[f] for f in FIELDS}
        row["member_stats"] = [{k: m.get(k) for k in STATS} for m in (r["member_stats"] or [])]
        rows.setdefault((r["id"], r["sample"]), []).append(row)
    return {k: sorted(v, key=repr) for k, v in rows.items()}


def compare(before: dict, after: dict) -> list[str]:
    diffs = []
    for key in sorted(set(before) | set(after), key=str):
        if key not in after:
            diffs.append(f"{key}: missing after")
        elif key not in before:
            diffs.append(f"{key}: new after")
        else:
            old_rows, new_rows = before[key], after[key]
            if len(old_rows) != len(new_rows):
                diffs.append(f"{key}: {len(old_rows)} rows before, {len(new_rows)} after")
                continue
            for old, new in zip(old_rows, new_rows):
                diffs += [f"{key}.{f}: {old[f]!r:.200} -> {new[f]!r:.200}" for f in old if new[f] != old[f]]
    return diffs


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    args = p.parse_args(argv)
    before, after = load_rows(args.before), load_rows(args.after)
    if not before or not after:
        log.error("no rows: %d before, %d after", len(before), len(after))
        return 2
    diffs = compare(before, after)
    for d in diffs:
        log.info("%s", d)
    ok = sum(1 for k in before if k in after and before[k] == after[k])
    log.info("%d of %d rows identical (%d before, %d after, %d differences)", ok, len(before), len(before),
             len(after), len(diffs))
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main())
