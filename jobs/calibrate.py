"""Calibrate an ensemble on a labeled dev set and write the profile the job applies (docs/jobs.md,
"Calibration").

    python -m jobs.calibrate --dev dev.jsonl --members smollm2-135m-instruct qwen2.5-coder-0.5b-instruct \\
        gemma3-270m --method deepen --output profiles/arc.json
    python -m jobs.fuse --input batch.jsonl --output out/arc --profile profiles/arc.json

(also ``ensemble-fuse calibrate ...``). DEV is JSON lines or Parquet with ``id``, ``prompt``,
``choices`` and ``answer`` (the correct choice's text), optionally ``system`` (jobs/devset.py: a bad
row refuses the file, naming the row and the field).

Each member scores the dev set once (jobs/dev_scores.py: in process, or through the job on Spark for
large dev sets; cached as Parquet in ``<output>.cache/``). Everything else is decided offline from
those scores by the rules of jobs/calibration.py: each member's accuracy under every normalisation
with a 95% Wilson interval, the members' pairwise agreement, the normalisation, the main member, the
dropped members, the DeePEn-Adapt weights, SpecFuse's pool, the posterior temperature and the gate.
The main member, the drop rule and the weights read each member's accuracy as the prior correction
would leave it (unless ``--priors off``): its 2-fold cross-fitted accuracy with the correction where
that beats its accuracy without (``selection_reports``), so a member whose labels are right once its
bias is divided out is not dropped for the bias. Only DeePEn needs the ensemble itself on dev: DeePEn
labels the first ``--deepen-dev-limit`` dev rows once (cached too, with its fused probabilities), and
its temperature and gate are fitted on those rows. The temperature is fitted on the label
probabilities of the system the profile applies (the pooled ones for SpecFuse, the fused ones for
DeePEn, the member's for a single member), before the gate, which is then chosen on the tempered
posteriors (SpecFuse's gates between 0 and 1 save no model call, so they must pass a sign test on
dev, ``jobs.calibration.choose_gate``; a gate of 0 keeps the main member's answer on every row: the
temperature is then refitted on its posteriors, which changes no label, and the profile is reduced
to method single over the main member, so the job makes no call whose output no label uses; the
ensemble it replaces is recorded in ``chosen_on["reduced"]``). SpecFuse's members may each get their own temperature, fitted on their own
posteriors (after the prior correction when on), with the shared temperature then fitted on their
pool as a factor on top (``LabelParams.temperature_of``): kept when its 2-fold cross-fitted dev
accuracy beats one shared temperature's (``chosen_on["member_temperatures_decision"]``;
``--no-member-temperatures``: never tried);
the summary reports the dev NLL and expected calibration error at
temperature 1 and at the fitted one (``--no-temperature``: keep 1). The per-member prior correction
(ensemble/priors.py) is estimated on dev and kept only when its 2-fold cross-fitted dev accuracy beats
off (jobs/calibration.py; before the temperature and the gate, which are then chosen on the corrected
posteriors; DeePEn's fused prior comes from its own cached dev labels; ``--priors on|off`` forces it).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path

from ensemble.config import DeePEnConfig, SpecFuseConfig
from ensemble.labeling import LabelParams, best, gate as gate_keeps, log_scores
from jobs.calibration import (DROP_GAP, ECE_BINS, GATE_ALPHA, TEMPERATURE_GRID, adapt_weights, choose_gate,
                              choose_norm, choose_pool, corrected_logs, cross_fit_member_temperatures,
                              decide_priors, fit_priors, label_ece, member_report,
                              member_temperatures, pairwise_agreement, pooled, posteriors, scaled, select_members,
                              temperature_record, tempered, wilson)
from jobs.dev_scores import RUNNERS, SPARK_ROWS, Runtime, ensemble_labels, member_scores
from jobs.devset import read_dev
from jobs.profiles import Profile

log = logging.getLogger("jobs.calibrate")
ENSEMBLES = ("deepen", "specfuse")
DEEPEN_DEV_LIMIT = 200
"""Default of --deepen-dev-limit: dev rows DeePEn labels to choose its gate (each costs a fused pass)."""
PRIOR_MODES = ("auto", "on", "off")
"""--priors: chosen by 2-fold cross-fitted dev accuracy (jobs/calibration.py), always on, or off."""


def calibrate(dev_path: str, members: list[str], method: str, output: str, *, rt: Runtime = Runtime(),
              label: LabelParams = LabelParams(), gap: float | None = DROP_GAP,
              deepen_dev_limit: int | None = DEEPEN_DEV_LIMIT, fit_temperature: bool = True,
              priors: str = "auto", fit_member_temperatures: bool = True) -> Profile:
    """Score, decide, write ``output`` (the profile) and return it. ``gap`` None keeps every member;
    ``fit_temperature`` False keeps the posterior temperature at 1 (and every member's);
    ``fit_member_temperatures`` False gives SpecFuse's members one shared temperature; ``priors`` (:data:`PRIOR_MODES`):
    the prior correction chosen on dev ('auto'), always on, or off without trying it."""
    if priors not in PRIOR_MODES:
        raise ValueError(f"priors must be one of {PRIOR_MODES}, got {priors!r}")
    if method not in ENSEMBLES:
        raise ValueError(f"method must be one of {ENSEMBLES}, got {method!r}")
    if not members or len(set(members)) != len(members):
        raise ValueError(f"members must be one or more distinct member specs, got {members!r}")
    dev = read_dev(dev_path)
    cache_dir = Path(output).with_suffix(".cache")
    raw = {m: member_scores(dev, m, label.with_(temperature=1.0), rt, cache_dir) for m in members}  # raw scores
    rows = [r for r in dev.rows if all(r.id in raw[m] for m in members)]
    if not rows:
        raise ValueError(f"no dev row of {dev_path!r} could be scored by every member (see the warnings)")
    if len(rows) < len(dev.rows):
        log.warning("%d of %d dev rows could not be scored by every member and are left out",
                    len(dev.rows) - len(rows), len(dev.rows))
    golds = [r.gold for r in rows]
    sets = [r.choices for r in rows]
    chance = sum(1 / len(r.choices) for r in rows) / len(rows)
    scores = {m: [raw[m][r.id] for r in rows] for m in members}
    reports = {m: member_report(scores[m], golds) for m in members}
    norm = choose_norm(reports)
    logs = {m: [log_scores(s, norm) for s in scores[m]] for m in members}
    sel, selection = selection_reports(reports, norm, logs, sets, golds, priors if len(members) > 1 else "off")
    main, kept, dropped = select_members(members, sel, norm, chance, gap if gap is not None else float("inf"))
    if gap is None:
        kept, dropped = list(members), {}
    if sel[main][norm]["low"] <= chance:
        log.warning("the best member, %s, is at chance on dev (accuracy %.3f, interval lower bound %.3f <= %.3f): "
                    "no configuration is expected to label better than a random pick", main,
                    sel[main][norm]["accuracy"], sel[main][norm]["low"], chance)
    posts = {m: posteriors(scores[m], norm) for m in members}
    agreement = pairwise_agreement({m: [best(p) for p in posts[m]] for m in members})
    params = label.with_(norm=norm, gate=None, temperature=1.0)
    grid = TEMPERATURE_GRID if fit_temperature else (1.0,)
    chosen: dict = {"norm": {n: sum(r[n]["accuracy"] for r in reports.values()) / len(reports) for n in reports[main]},
                    "main_accuracy": sel[main][norm]["accuracy"]}
    if selection:
        chosen["selection"] = selection
    pool_kind, fitted, fused, member_t = None, None, None, None

    def correct_members(order: list[str]) -> None:  # the priors on: every dev row's scores corrected
        nonlocal fitted
        fitted = fit_priors([logs[m] for m in order], sets, norm, order, fused)
        logs.update({m: corrected_logs(logs[m], sets, fitted.tables[i], fitted.keys) for i, m in enumerate(order)})

    if len(kept) < 2:
        if len(members) > 1:
            log.warning("only %s survives the drop rule: the profile is method single (an ensemble is not "
                        "expected to beat it on this dev set)", main)
        final, order, weights, main_idx, gate = "single", [main], None, 0, None
        if _decide(priors, chosen, [logs[main]], sets, golds, lambda x: [best(p) for p in x[0]]):
            correct_members(order)
        temperature, chosen["temperature"] = temperature_record(lambda t: tempered(logs[main], t), golds, grid,
                                                                f"{main}'s posteriors")
    else:
        final = method
        order = [main] + [m for m in kept if m != main] if method == "specfuse" else kept
        main_idx = order.index(main)
        weights = adapt_weights([sel[m][norm]["accuracy"] for m in order])
        if method == "specfuse":
            member_logs = [logs[m] for m in order]
            pool_kind, chosen["pool"], records = choose_pool(member_logs, weights, golds, grid)
            t0, k0 = records[pool_kind]["temperature"], pool_kind
            if _decide(priors, chosen, member_logs, sets, golds,
                                  lambda x: [best(p) for p in pooled([tempered(m, t0) for m in x], weights, k0)]):
                correct_members(order)
                member_logs = [logs[m] for m in order]
                pool_kind, chosen["pool"], records = choose_pool(member_logs, weights, golds, grid)
            if fit_temperature and fit_member_temperatures and len(golds) >= 2:  # each member's own scale?
                rec = cross_fit_member_temperatures(member_logs, order, weights, golds, grid)
                rec["applied"] = rec["on"] > rec["off"]
                chosen["member_temperatures_decision"] = rec
                if rec["applied"]:
                    member_t, chosen["member_temperatures"] = member_temperatures(member_logs, order, golds, grid)
                    member_logs = [scaled(x, t) for x, t in zip(member_logs, member_t)]
                    chosen["pool_shared_temperature"] = chosen["pool"]
                    pool_kind, chosen["pool"], records = choose_pool(member_logs, weights, golds, grid)
            temperature, chosen["temperature"] = records[pool_kind]["temperature"], records[pool_kind]
            ens_probs = pooled([tempered(x, temperature) for x in member_logs], weights, pool_kind)
            gate_rows, main_posts = golds, tempered(member_logs[0], temperature)  # order[0] is main
        else:
            fuser = DeePEnConfig(main=main_idx, weights=tuple(weights))
            probs = ensemble_labels(dev, "deepen", order, fuser, params, rt, cache_dir, deepen_dev_limit)
            idx = [i for i, r in enumerate(rows) if r.id in probs]
            if not idx:
                raise ValueError("DeePEn labeled no dev row that every member scored (see the warnings)")
            # the cached fused probabilities (temperature 1): their logs temper exactly as the fused scores
            fused_logs = [[math.log(q) if q > 0 else -math.inf for q in probs[rows[i].id]] for i in idx]
            gate_rows = [golds[i] for i in idx]
            if _decide(priors, chosen, [fused_logs], [sets[i] for i in idx], gate_rows,
                                  lambda x: [best(p) for p in x[0]]):
                fused = (fused_logs, [sets[i] for i in idx])
                correct_members(order)
                fused_logs = corrected_logs(fused_logs, fused[1], fitted.fused, fitted.keys)
            temperature, chosen["temperature"] = temperature_record(lambda t: tempered(fused_logs, t), gate_rows,
                                                                    grid, "DeePEn's fused probabilities")
            ens_probs = tempered(fused_logs, temperature)
            main_posts = tempered([logs[main][i] for i in idx], temperature)
        ens_picks = [best(p) for p in ens_probs]
        # SpecFuse scores every member on every row anyway: only its gate 0 (the main member alone) saves calls
        saves = (lambda g: g == 0.0) if method == "specfuse" else (lambda g: True)
        gate, chosen["gate"], chosen["gate_changes"] = choose_gate(main_posts, ens_picks, gate_rows, saves=saves)
        chosen["gate_rows"] = len(gate_rows)
        chosen["ensemble_accuracy"] = chosen["gate"]["None"]
        chosen["gated_accuracy"] = chosen["gate"][str(gate)]
        if gate == 0.0:  # every row keeps the main member's answer: its posteriors are the output
            ensemble_fit = chosen["temperature"]
            temperature, chosen["temperature"] = temperature_record(
                lambda t: tempered(logs[main], t), golds, grid,
                f"{main}'s posteriors (the gate keeps them on every row)")
            chosen["temperature"]["ensemble"] = ensemble_fit  # the first fit, on the ensemble's probabilities
            # the other members' calls would change no label or probability: the profile is the main alone
            chosen["reduced"] = {"method": final, "members": list(order), "main": main_idx, "weights": weights,
                                 "label_pool": pool_kind, "gate": gate,
                                 "priors": None if fitted is None else fitted.to_dict(),
                                 "why": "gate 0 keeps the main member's answer on every row"}
            log.info("the gate keeps %s's answer on every dev row: the profile is method single (the other "
                     "members' calls would change no label)", main)
            if fitted is not None:
                fitted = dataclasses.replace(fitted, members=(main,), tables=(fitted.tables[main_idx],), fused=None)
            dropped = {**dropped, **{m: f"the gate (0) keeps {main}'s answer on every dev row: its calls would change "
                                        f"no label" for m in order if m != main}}
            if member_t is not None:
                chosen["reduced"]["member_temperatures"] = member_t
            final, order, weights, main_idx, gate, pool_kind, member_t = "single", [main], None, 0, None, None, None
        else:
            chosen["temperature"]["ece_gated"] = label_ece(
                [m if gate_keeps(m, gate) else e for m, e in zip(main_posts, ens_probs)], gate_rows)
    if final == "specfuse":  # final is "single" or the method asked for
        SpecFuseConfig(weights=tuple(weights), label_pool=pool_kind)  # the job's own checks, before writing
    profile = Profile(method=final, members=tuple(order), main=main_idx,
                      weights=None if weights is None else tuple(weights), choice_norm=norm,
                      neutral_context=label.neutral_context, target_delimiter=label.target_delimiter, gate=gate,
                      label_pool=pool_kind, temperature=temperature,
                      member_temperatures=None if member_t is None else tuple(member_t), priors=fitted,
                      requested_method=method,
                      dropped=dropped,
                      dev={"path": dev.path, "sha256": dev.sha256, "rows": len(dev.rows), "scored": len(rows),
                           "chance": chance},
                      member_accuracy=reports, agreement=agreement, chosen_on=chosen)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    profile.save(output)
    log.info("%s", summary(profile))
    return profile


def selection_reports(reports: dict, norm: str, logs: dict, sets, golds, mode: str) -> tuple[dict, dict]:
    """(the accuracies the main member, the drop rule and the weights are chosen on, their record).
    Under ``mode`` off, each member's dev accuracy under ``norm``; otherwise each member's accuracy as
    the prior correction would leave it: its 2-fold cross-fitted accuracy with the correction (the
    member alone, ``jobs.calibration.decide_priors``) where that beats its accuracy without (auto) or
    always (on), with a Wilson interval on the dev rows. The record: {member: {uncorrected,
    corrected, used}} (empty under off)."""
    if mode == "off":
        return reports, {}
    sel, record = {}, {}
    for m, rep in reports.items():
        on, rec = decide_priors([logs[m]], sets, golds, lambda x: [best(p) for p in x[0]])
        use = "on" in rec and (mode == "on" or on)  # no cross-fit below 2 dev rows: as scored
        acc = rec["on"] if use else rep[norm]["accuracy"]
        lo, hi = wilson(round(acc * len(golds)), len(golds))
        sel[m] = {**rep, norm: {"accuracy": acc, "low": lo, "high": hi}}
        record[m] = {"uncorrected": rep[norm]["accuracy"], "corrected": rec.get("on"),
                     "used": "corrected" if use else "uncorrected"}
    return sel, record


def _decide(mode: str, chosen: dict, sources, sets, golds, picks_of) -> bool:
    """Whether the prior correction goes on under ``mode`` (auto: ``jobs.calibration.decide_priors``),
    recorded in ``chosen``."""
    if mode == "off":
        chosen["priors"] = {"applied": False, "why": "left off (--priors off)"}
        return False
    on, chosen["priors"] = decide_priors(sources, sets, golds, picks_of)
    if mode == "on":
        chosen["priors"].update(applied=True, forced=True)
    return chosen["priors"]["applied"]


def summary(p: Profile) -> str:
    """A readable account of a profile: what was chosen, on which dev accuracies."""
    lines = [f"calibration profile: method {p.method} (asked: {p.requested_method}) over {list(p.members)}",
             f"dev: {p.dev['scored']} rows scored of {p.dev['rows']} (sha256 {p.dev['sha256'][:12]}), "
             f"chance {p.dev['chance']:.3f}; intervals are 95% Wilson",
             f"choice norm: {p.choice_norm} (mean member accuracy per norm: "
             + ", ".join(f"{n} {a:.3f}" for n, a in p.chosen_on["norm"].items()) + ")"]
    selection = p.chosen_on.get("selection", {})
    for m, rep in p.member_accuracy.items():
        r = rep[p.choice_norm]
        role = ("main" if p.members[p.main] == m else "member") if m in p.members else "dropped"
        used = selection.get(m, {})
        lines.append(f"  {m}: {r['accuracy']:.3f} [{r['low']:.3f}, {r['high']:.3f}] {role}"
                     + (f" (weight {p.weights[p.members.index(m)]:.3f})" if p.weights and m in p.members else "")
                     + (f"; chosen on {used['corrected']:.3f}, its cross-fitted accuracy with the prior correction"
                        if used.get("used") == "corrected" else ""))
    lines += [f"  dropped {m}: {why}" for m, why in p.dropped.items()]
    lines += [f"  agreement {pair}: {a:.3f}" for pair, a in p.agreement.items()]
    if "temperature" in p.chosen_on:
        r = p.chosen_on["temperature"]
        how = "fitted" if len(r["nll"]) > 1 else "kept at 1 (not fitted), measured"
        lines.append(f"temperature: {p.temperature:g}, {how} on {r['fitted_on']} ({r['rows']} dev rows, lowest "
                     f"NLL of the gold choice): NLL {r['nll_before']:.3f} -> {r['nll_after']:.3f}, ECE "
                     f"{100 * r['ece_before']:.1f}% -> {100 * r['ece_after']:.1f}% ({ECE_BINS} bins of the top "
                     f"probability)" + (f"; ECE of the gated labels {100 * r['ece_gated']:.1f}%"
                                         if "ece_gated" in r else ""))
    if "member_temperatures_decision" in p.chosen_on:
        r = p.chosen_on["member_temperatures_decision"]
        lines.append(f"member temperatures: {'on' if r['applied'] else 'off'}: 2-fold cross-fitted dev accuracy "
                     f"{r['on']:.3f} with, {r['off']:.3f} with one shared temperature")
    if p.member_temperatures is not None:
        recs = p.chosen_on["member_temperatures"]
        lines.append("member temperatures (each fitted on its own dev posteriors; the shared one multiplies them): "
                     + ", ".join(f"{m} {t:g} (NLL {recs[m]['nll_before']:.3f} -> {recs[m]['nll_after']:.3f})"
                                 for m, t in zip(p.members, p.member_temperatures)))
    if "priors" in p.chosen_on:
        r = p.chosen_on["priors"]
        if "on" not in r:
            lines.append(f"priors: {'on (forced)' if r['applied'] else 'off'} ({r['why']})")
        else:
            keyed = f"{r['keys']} choice texts" if r["keyed_by"] == "text" else "choice position"
            lines.append(f"priors: {'on' if r['applied'] else 'off'}{' (forced)' if r.get('forced') else ''}, keyed by {keyed}: 2-fold cross-fitted dev "
                         f"accuracy {r['on']:.3f} with, {r['off']:.3f} without ("
                         + ", ".join(f"fit on the {f['fit']} rows: {f['on']:.3f} vs {f['off']:.3f}" for f in r["folds"])
                         + (f"; {r['uncovered']} held-out rows uncovered" if r["uncovered"] else "") + ")")
    if "pool" in p.chosen_on:
        lines.append(f"pool: {p.label_pool} (" + ", ".join(f"{k} {a:.3f}" for k, a in p.chosen_on["pool"].items()) + ")")
    if "gate" in p.chosen_on:
        gate = p.gate if "reduced" not in p.chosen_on else p.chosen_on["reduced"]["gate"]
        lines.append(f"gate: {gate} on {p.chosen_on['gate_rows']} dev rows (ensemble alone "
                     f"{p.chosen_on['ensemble_accuracy']:.3f}, gated {p.chosen_on['gated_accuracy']:.3f}, main member "
                     f"alone {p.chosen_on['gate']['0.0']:.3f}; per gate: "
                     + ", ".join(f"{g} {a:.3f}" for g, a in p.chosen_on["gate"].items()) + ")")
        accs, changes = p.chosen_on["gate"], p.chosen_on.get("gate_changes", {})
        top = max(accs, key=accs.get)
        if accs[top] > p.chosen_on["gated_accuracy"] and top in changes:  # a better dev gate the rule passed over
            c = changes[top]
            lines.append(f"  gate {top} scored higher on dev but saves no model call: it makes {c['better']} dev rows "
                         f"right and {c['worse']} wrong against never (sign test p = {c['p']:.3f}, needs < {GATE_ALPHA})")
    if "reduced" in p.chosen_on:
        r = p.chosen_on["reduced"]
        lines.append(f"reduced to method single over {p.members[0]}: {r['why']} ({r['method']} over "
                     f"{r['members']} would cost {len(r['members'])} member calls a row for the same labels)")
    return "\n".join(lines)


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dev", required=True, help="dev set: JSON lines or Parquet with id, prompt, choices, answer")
    ap.add_argument("--members", nargs="+", required=True, help="member specs, in order (one member: its own normalisation and temperature, a single profile)")
    ap.add_argument("--method", required=True, choices=ENSEMBLES)
    ap.add_argument("--output", required=True, help="the profile (JSON); member scores are cached in <output>.cache/")
    ap.add_argument("--deepen-dev-limit", type=int, default=DEEPEN_DEV_LIMIT, metavar="N",
                    help=f"dev rows DeePEn labels to choose its gate (default: {DEEPEN_DEV_LIMIT}; 0: all)")
    ap.add_argument("--drop-gap", type=float, default=DROP_GAP,
                    help=f"drop a member more than this far below the best member's dev accuracy (default: {DROP_GAP})")
    ap.add_argument("--no-drop", action="store_true", help="keep every member (no drop rule)")
    ap.add_argument("--no-temperature", action="store_true",
                    help="keep the posterior temperature at 1 (default: fitted on dev, see jobs/calibration.py)")
    ap.add_argument("--no-member-temperatures", action="store_true",
                    help="SpecFuse: one temperature shared by the members, without trying each member's own "
                         "(default: tried, kept when its 2-fold cross-fitted dev accuracy beats the shared one's)")
    ap.add_argument("--priors", choices=PRIOR_MODES, default="auto",
                    help="per-member prior correction: auto (default) keeps it when its 2-fold cross-fitted dev "
                         "accuracy beats off (jobs/calibration.py); on: always; off: never")
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
                  gap=None if args.no_drop else args.drop_gap, deepen_dev_limit=args.deepen_dev_limit or None,
                  fit_temperature=not args.no_temperature, priors=args.priors,
                  fit_member_temperatures=not args.no_member_temperatures)
    except ValueError as exc:  # DevSetError included
        log.error("calibration refused: %s", exc)
        return 2
    sys.stdout.write(f"\nWrote {args.output}\nApply it: python -m jobs.fuse --input ... --output ... "
                     f"--profile {args.output}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
