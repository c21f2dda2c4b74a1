"""Calibrate an ensemble on a labeled dev set and write the profile the job applies (docs/jobs.md,
"Calibration").

    python -m jobs.calibrate --dev dev.jsonl --members smollm2-135m-instruct qwen2.5-coder-0.5b-instruct \\
        gemma3-270m --method deepen --output profiles/arc.json
    python -m jobs.fuse --input batch.jsonl --output out/arc --profile profiles/arc.json

(also ``ensemble-fuse calibrate ...``). DEV is JSON lines or Parquet with ``id``, ``prompt``,
``choices`` and ``answer`` (the correct choice's text), optionally ``system`` (jobs/devset.py: a bad
row refuses the file, naming the row and the field).

Each member scores the dev set once (jobs/dev_scores.py: in process, or through the job on Spark
for large dev sets; cached as Parquet in ``<output>.cache/``). Everything else is decided offline from
those scores by the rules of jobs/calibration.py: each member's accuracy under every normalisation
with a 95% Wilson interval, the members' pairwise agreement, the normalisation, the main member,
the dropped members, the DeePEn-Adapt weights, SpecFuse's pool and the gate. Only DeePEn's gate needs
the ensemble itself on dev: DeePEn labels the first ``--deepen-dev-limit`` dev rows once (cached too).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ensemble.config import DeePEnConfig, SpecFuseConfig
from ensemble.labeling import LabelParams, best
from jobs.calibration import (DROP_GAP, adapt_weights, choose_gate, choose_norm, choose_pool, member_report,
                              pairwise_agreement, pooled, posteriors, select_members)
from jobs.dev_scores import RUNNERS, SPARK_ROWS, Runtime, ensemble_labels, member_scores
from jobs.devset import DevSetError, read_dev
from jobs.profile import Profile

log = logging.getLogger("jobs.calibrate")
ENSEMBLES = ("deepen", "specfuse")
DEEPEN_DEV_LIMIT = 200
"""Default of --deepen-dev-limit: dev rows DeePEn labels to choose its gate (each costs a fused pass)."""


def calibrate(dev_path: str, members: list[str], method: str, output: str, *, rt: Runtime = Runtime(),
              label: LabelParams = LabelParams(), gap: float | None = DROP_GAP,
              deepen_dev_limit: int | None = DEEPEN_DEV_LIMIT) -> Profile:
    """Score, decide, write ``output`` (the profile) and return it. ``gap`` None keeps every member."""
    if method not in ENSEMBLES:
        raise ValueError(f"method must be one of {ENSEMBLES}, got {method!r}")
    if len(members) < 2 or len(set(members)) != len(members):
        raise ValueError(f"members must be two or more distinct member specs, got {members!r}")
    dev = read_dev(dev_path)
    cache_dir = Path(output).with_suffix(".cache")
    raw = {m: member_scores(dev, m, label, rt, cache_dir) for m in members}
    rows = [r for r in dev.rows if all(r.id in raw[m] for m in members)]
    if not rows:
        raise ValueError(f"no dev row of {dev_path!r} could be scored by every member (see the warnings)")
    if len(rows) < len(dev.rows):
        log.warning("%d of %d dev rows could not be scored by every member and are left out",
                    len(dev.rows) - len(rows), len(dev.rows))
    golds = [r.gold for r in rows]
    chance = sum(1 / len(r.choices) for r in rows) / len(rows)
    scores = {m: [raw[m][r.id] for r in rows] for m in members}
    reports = {m: member_report(scores[m], golds) for m in members}
    norm = choose_norm(reports)
    main, kept, dropped = select_members(members, reports, norm, chance, gap if gap is not None else float("inf"))
    if gap is None:
        kept, dropped = list(members), {}
    if reports[main][norm]["low"] <= chance:
        log.warning("the best member, %s, is at chance on dev (accuracy %.3f, interval lower bound %.3f <= %.3f): "
                    "no configuration is expected to label better than a random pick", main,
                    reports[main][norm]["accuracy"], reports[main][norm]["low"], chance)
    posts = {m: posteriors(scores[m], norm) for m in members}
    agreement = pairwise_agreement({m: [best(p) for p in posts[m]] for m in members})
    params = label.with_(norm=norm, gate=None)
    chosen: dict = {"norm": {n: sum(r[n]["accuracy"] for r in reports.values()) / len(reports) for n in reports[main]},
                    "main_accuracy": reports[main][norm]["accuracy"]}
    pool_kind = None
    if len(kept) < 2:
        log.warning("only %s survives the drop rule: the profile is method single (an ensemble is not expected "
                    "to beat it on this dev set)", main)
        final, order, weights, main_idx, gate = "single", [main], None, 0, None
    else:
        final = method
        order = [main] + [m for m in kept if m != main] if method == "specfuse" else kept
        main_idx = order.index(main)
        weights = adapt_weights([reports[m][norm]["accuracy"] for m in order])
        if method == "specfuse":
            member_posts = [posts[m] for m in order]
            pool_kind, chosen["pool"] = choose_pool(member_posts, weights, golds)
            ens = [best(p) for p in pooled(member_posts, weights, pool_kind)]
            gate_rows, main_posts = golds, posts[main]
        else:
            fuser = DeePEnConfig(main=main_idx, weights=tuple(weights))
            probs = ensemble_labels(dev, "deepen", order, fuser, params, rt, cache_dir, deepen_dev_limit)
            idx = [i for i, r in enumerate(rows) if r.id in probs]
            if not idx:
                raise ValueError("DeePEn labeled no dev row that every member scored (see the warnings)")
            ens = [best(probs[rows[i].id]) for i in idx]
            gate_rows, main_posts = [golds[i] for i in idx], [posts[main][i] for i in idx]
        gate, chosen["gate"] = choose_gate(main_posts, ens, gate_rows)
        chosen["gate_rows"] = len(gate_rows)
        chosen["ensemble_accuracy"] = chosen["gate"]["None"]
        chosen["gated_accuracy"] = chosen["gate"][str(gate)]
    if method == "specfuse" and final == "specfuse":
        SpecFuseConfig(weights=tuple(weights), label_pool=pool_kind)  # the job's own checks, before writing
    profile = Profile(method=final, members=tuple(order), main=main_idx,
                      weights=None if weights is None else tuple(weights), choice_norm=norm,
                      neutral_context=label.neutral_context, target_delimiter=label.target_delimiter, gate=gate,
                      label_pool=pool_kind, requested_method=method, dropped=dropped,
                      dev={"path": dev.path, "sha256": dev.sha256, "rows": len(dev.rows), "scored": len(rows),
                           "chance": chance},
                      member_accuracy=reports, agreement=agreement, chosen_on=chosen)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    profile.save(output)
    log.info("%s", summary(profile))
    return profile


def summary(p: Profile) -> str:
    """A readable account of a profile: what was chosen, on which dev accuracies."""
    lines = [f"calibration profile: method {p.method} (asked: {p.requested_method}) over {list(p.members)}",
             f"dev: {p.dev['scored']} rows scored of {p.dev['rows']} (sha256 {p.dev['sha256'][:12]}), "
             f"chance {p.dev['chance']:.3f}; intervals are 95% Wilson",
             f"choice norm: {p.choice_norm} (mean member accuracy per norm: "
             + ", ".join(f"{n} {a:.3f}" for n, a in p.chosen_on["norm"].items()) + ")"]
    for m, rep in p.member_accuracy.items():
        r = rep[p.choice_norm]
        role = ("main" if p.members[p.main] == m else "member") if m in p.members else "dropped"
        lines.append(f"  {m}: {r['accuracy']:.3f} [{r['low']:.3f}, {r['high']:.3f}] {role}"
                     + (f" (weight {p.weights[p.members.index(m)]:.3f})" if p.weights and m in p.members else ""))
    lines += [f"  dropped {m}: {why}" for m, why in p.dropped.items()]
    lines += [f"  agreement {pair}: {a:.3f}" for pair, a in p.agreement.items()]
    if "pool" in p.chosen_on:
        lines.append(f"pool: {p.label_pool} (" + ", ".join(f"{k} {a:.3f}" for k, a in p.chosen_on["pool"].items()) + ")")
    if "gate" in p.chosen_on:
        lines.append(f"gate: {p.gate} on {p.chosen_on['gate_rows']} dev rows (ensemble alone "
                     f"{p.chosen_on['ensemble_accuracy']:.3f}, gated {p.chosen_on['gated_accuracy']:.3f}, main member "
                     f"alone {p.chosen_on['gate']['0.0']:.3f}; per gate: "
                     + ", ".join(f"{g} {a:.3f}" for g, a in p.chosen_on["gate"].items()) + ")")
    return "\n".join(lines)


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dev", required=True, help="dev set: JSON lines or Parquet with id, prompt, choices, answer")
    ap.add_argument("--members", nargs="+", required=True, help="member specs (two or more), in order")
    ap.add_argument("--method", required=True, choices=ENSEMBLES)
    ap.add_argument("--output", required=True, help="the profile (JSON); member scores are cached in <output>.cache/")
    ap.add_argument("--deepen-dev-limit", type=int, default=DEEPEN_DEV_LIMIT, metavar="N",
                    help=f"dev rows DeePEn labels to choose its gate (default: {DEEPEN_DEV_LIMIT}; 0: all)")
    ap.add_argument("--drop-gap", type=float, default=DROP_GAP,
                    help=f"drop a member more than this far below the best member's dev accuracy (default: {DROP_GAP})")
    ap.add_argument("--no-drop", action="store_true", help="keep every member (no drop rule)")
    ap.add_argument("--neutral-context", default=LabelParams.neutral_context, help="pmi's neutral prompt")
    ap.add_argument("--target-delimiter", default=LabelParams.target_delimiter,
                    help="put before a choice for completion-style members")
    ap.add_argument("--runner", choices=RUNNERS, default="auto",
                    help=f"auto: the Spark job above {SPARK_ROWS} dev rows, in process below")
    ap.add_argument("--master", help="Spark master for the spark runner (default: local[*])")
    ap.add_argument("--dtype", help="torch dtype name (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="in-process device (default: the library's)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per model call")
    ap.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer dev prompts are left out")
    return ap


def main(argv: list[str] | None = None, prog: str = "python -m jobs.calibrate") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser(prog).parse_args(argv)
    try:
        if args.deepen_dev_limit < 0:
            raise ValueError(f"--deepen-dev-limit must be >= 0, got {args.deepen_dev_limit}")
        rt = Runtime(runner=args.runner, dtype=args.dtype, device=args.device, master=args.master,
                     batch_size=args.batch_size, max_prompt_tokens=args.max_prompt_tokens)
        label = LabelParams(neutral_context=args.neutral_context, target_delimiter=args.target_delimiter)
        calibrate(args.dev, args.members, args.method, args.output, rt=rt, label=label,
                  gap=None if args.no_drop else args.drop_gap, deepen_dev_limit=args.deepen_dev_limit or None)
    except (DevSetError, ValueError) as exc:
        log.error("calibration refused: %s", exc)
        return 2
    sys.stdout.write(f"\nWrote {args.output}\nApply it: python -m jobs.fuse --input ... --output ... "
                     f"--profile {args.output}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
