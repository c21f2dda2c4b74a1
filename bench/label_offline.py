"""SpecFuse labels from the members' own runs, without model calls (issue 16, point 5).

SpecFuse labels a row with one verification round over its choices: each member's posterior from the
one choice scorer, pooled with the member weights, unless the gate keeps the main (first) member's
posterior (``SpecFuse.label``, docs/algorithms.md "Labeling"). Each member's scores depend only on that
member, the row and the scorer's settings, so a member run alone through the job with ``--choice-norm
pmi`` (whose ``member_stats`` carry the summed log-probabilities, token counts and pmi's neutral
term) holds everything the pool needs. This module

- applies a :class:`PoolRule` (a calibration profile of ``python -m jobs.calibrate --method specfuse``,
  or SpecFuse's defaults) to the members' outcomes (:func:`pooled_outcomes`), with the functions the
  fuser itself uses (``ensemble.labeling``: posterior, pool, gate, best). The cost it reports per row is
  the sum of the members' calls and fuser milliseconds: the forwards a SpecFuse label run makes, run
  one member at a time. ``bench/eval_label.py --offline NAME=RULE`` reports such a system next to the
  job runs; a real ``--method specfuse --profile`` job on a prefix checks that the labels agree;
- calibrates per task from the members' dev runs (``calibrate`` subcommand): it writes the task's dev
  file (as ``--export-dev`` does), seeds ``jobs.calibrate``'s member-score cache from the dev runs'
  ``member_stats`` (``jobs.dev_scores.seed_member_scores``; refused when the runs' scorer settings are
  not calibrate's), and runs ``jobs.calibrate``, which then makes no model call: the ensemble's profile
  ``OUT/<task>/profile.json`` and, per member, ``OUT/<task>/single-<member>.json`` (the member alone
  with its own dev-chosen normalisation and temperature: the baseline a calibrated ensemble must beat);
  ``--priors auto|on|off`` is calibrate's (the prior correction, which a rule applies from its profile);
  ``--method deepen`` makes one model call per dev row: DeePEn's fused labels, which its temperature
  and gate are chosen on (a DeePEn profile is applied by a job run, ``eval_label --profile``);
- compares systems of an eval_label report pairwise (``compare``: each pair's accuracy and ECE per
  task and the paired-bootstrap difference, e.g. a calibrated system with and without priors).

    python bench/label_offline.py calibrate --tasks arc_challenge piqa --members smollm2 gemma \\
        --out output/label_eval/profiles/specfuse-pair
    python bench/eval_label.py --split test --tasks arc_challenge piqa --report-only \\
        --offline "specfuse smollm2+gemma=defaults:smollm2,gemma" \\
        "specfuse-cal smollm2+gemma=profile:output/label_eval/profiles/specfuse-pair/{task}/profile.json"
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import evaluate  # noqa: E402

from ensemble.config import POOLS, SpecFuseConfig, normalise_weights  # noqa: E402
from ensemble.labeling import ChoiceScores, LabelParams, best, gated_pool, label_posterior  # noqa: E402
from ensemble.priors import ChoicePriors, UncoveredChoice  # noqa: E402

log = logging.getLogger("bench.label_offline")

MEMBER_SPECS = {"smollm2": evaluate.SMOL, "qwen": evaluate.QWEN, "gemma": evaluate.GEMMA}
"""Eval system name -> the member spec its job runs (``--members SPEC``)."""
SPEC_NAMES = {spec: name for name, spec in MEMBER_SPECS.items()}


def choice_scores(stats: Mapping, choices: Sequence[str]) -> ChoiceScores | None:
    """A member's :class:`ChoiceScores` from its ``member_stats`` entry (None without ``choice_logprobs``)."""
    if not stats.get("choice_logprobs"):
        return None
    return ChoiceScores(logprob=tuple(stats["choice_logprobs"]), tokens=tuple(stats["choice_tokens"]),
                        chars=tuple(len(c) for c in choices),
                        neutral=tuple(stats["choice_neutral"]) if stats.get("choice_neutral") else None)


@dataclass(frozen=True)
class PoolRule:
    """How SpecFuse labels from its members' scores: members in the job's order (the first is the main
    one, the gate's), their weights, the normalisation, the posterior temperature (and each member's,
    ``LabelParams.member_temperatures``), the pool, the gate and the prior correction
    (``LabelParams.priors``, estimated on dev by ``jobs.calibrate``)."""

    members: tuple[str, ...]
    """Eval member names (``evaluate.SINGLES``)."""
    weights: tuple[float, ...]
    norm: str
    temperature: float
    pool: str
    gate: float | None
    priors: ChoicePriors | None = None
    member_temperatures: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.members if m not in MEMBER_SPECS]
        if not self.members or unknown:
            raise ValueError(f"members must be among {list(MEMBER_SPECS)}, got {list(self.members)!r}")
        normalise_weights(self.weights, len(self.members))
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        self.params().check_member_temperatures(len(self.members), "specfuse")  # the scorer's own checks
        if self.priors is not None and len(self.priors.tables) != len(self.members):
            raise ValueError(f"priors must have one table per member ({len(self.members)}), "
                             f"got {len(self.priors.tables)}")

    def params(self) -> LabelParams:
        return LabelParams(norm=self.norm, gate=self.gate, temperature=self.temperature, priors=self.priors,
                           member_temperatures=self.member_temperatures)

    @classmethod
    def defaults(cls, members: Sequence[str]) -> "PoolRule":
        """SpecFuse at the library's defaults: uniform weights, ``LabelParams()``, its default pool."""
        params, cfg = LabelParams(), SpecFuseConfig()
        return cls(tuple(members), normalise_weights(cfg.weights, len(members)), params.norm, params.temperature,
                   cfg.label_pool, params.gate)

    @classmethod
    def from_profile(cls, path: str | Path) -> "PoolRule":
        """The rule of a ``jobs.calibrate`` profile for SpecFuse (or one calibrated down to a single
        member); a DeePEn profile is refused (its label needs the fused run)."""
        from jobs.profiles import load_profile

        p = load_profile(path)
        if p.method not in ("specfuse", "single"):
            raise ValueError(f"profile {str(path)!r} is for method {p.method!r}: only specfuse and single "
                             "profiles can be applied to the members' runs")
        unknown = [m for m in p.members if m not in SPEC_NAMES]
        if unknown:
            raise ValueError(f"profile {str(path)!r} names members without an eval run: {unknown}")
        members = tuple(SPEC_NAMES[m] for m in p.members)
        weights = p.weights if p.weights is not None else normalise_weights(None, len(members))
        return cls(members, tuple(weights), p.choice_norm, p.temperature, p.label_pool or "linear",
                   p.gate if p.method == "specfuse" else None, p.priors, p.member_temperatures)

    def label(self, scores: Sequence[ChoiceScores], choices: Sequence[str]) -> tuple[int, list[float], bool]:
        """(chosen index, probabilities, gated) from the members' scores of the row's ``choices`` in
        :attr:`members` order, as ``SpecFuse.label`` computes them (``UncoveredChoice`` when the
        priors do not cover a choice)."""
        params = self.params()
        probs, gated = gated_pool([label_posterior(s, params, params.prior(choices, i), i)
                                   for i, s in enumerate(scores)],
                                  self.weights, self.pool, self.gate)
        return best(probs), probs, gated


RULE_KEYS = {"norm": str, "pool": str, "temperature": float}
"""Settings ``defaults:MEMBERS:key=value,...`` may change."""


def parse_rule(text: str) -> PoolRule | str:
    """``defaults:A,B`` -> a rule (``defaults:A,B:norm=sum,pool=loglinear`` with :data:`RULE_KEYS`
    changed); ``profile:PATH`` -> PATH (may hold ``{task}``: loaded per task)."""
    kind, sep, arg = text.partition(":")
    if not sep or kind not in ("defaults", "profile") or not arg:
        raise ValueError(f"an offline rule is defaults:MEMBER,MEMBER[:key=value,...] or profile:PATH, got {text!r}")
    if kind == "profile":
        return arg
    members, _, settings = arg.partition(":")
    rule = PoolRule.defaults(members.split(","))
    changes = {}
    for item in filter(None, settings.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in RULE_KEYS:
            raise ValueError(f"an offline rule setting is key=value with key in {sorted(RULE_KEYS)}, got {item!r}")
        changes[key] = RULE_KEYS[key](value)
    return dataclasses.replace(rule, **changes) if changes else rule


def rule_for(rule: PoolRule | str, task: str) -> PoolRule:
    return rule if isinstance(rule, PoolRule) else PoolRule.from_profile(rule.replace("{task}", task))


def pooled_outcomes(rule: PoolRule, per_row: Mapping[str, Mapping[str, dict]], rows: Sequence[dict]) -> dict[str, dict]:
    """Per row id, the outcome (``bench/eval_label.py``'s ``read_outcomes`` fields) of SpecFuse under
    ``rule`` from the members' outcomes ``per_row[member][id]``; a row a member could not score is an
    error row naming the member."""
    missing = [m for m in rule.members if m not in per_row]
    if missing:
        raise ValueError(f"offline SpecFuse needs the members' outputs on these rows; missing {missing}")
    out = {}
    for row in rows:
        outs = [per_row[m][row["id"]] for m in rule.members]
        scores = [choice_scores((o["stats"] or [{}])[0], row["choices"]) for o in outs]
        bad = [m for m, o, s in zip(rule.members, outs, scores) if o["error"] is not None or s is None]
        if bad:
            out[row["id"]] = {"label": None, "correct": False, "conf": None, "calls": None, "ms": None,
                              "error": f"members without scores for the row: {bad}", "stats": []}
            continue
        try:
            pick, probs, gated = rule.label(scores, row["choices"])
        except UncoveredChoice as exc:  # the job's error row for a choice without a prior
            out[row["id"]] = {"label": None, "correct": False, "conf": None, "calls": None, "ms": None,
                              "error": f"UncoveredChoice: {exc}", "stats": []}
            continue
        label = row["choices"][pick]
        out[row["id"]] = {"label": label, "correct": label == row["gold"], "conf": max(probs),
                          "calls": sum(o["calls"] for o in outs), "ms": sum(o["ms"] for o in outs),
                          "error": None, "stats": [s for o in outs for s in o["stats"]], "gated": gated}
    return out


# ---------------------------------------------------------------- calibration from the dev runs

def seed_rows(outcomes: Mapping[str, dict], rows: Sequence[dict]) -> list[dict]:
    """``jobs.dev_scores.SCORES_SCHEMA`` rows from a member's dev outcomes (rows it scored)."""
    out = []
    for row in rows:
        o = outcomes[row["id"]]
        s = choice_scores((o["stats"] or [{}])[0], row["choices"]) if o["error"] is None else None
        if s is not None:
            out.append({"id": row["id"], "logprob": list(s.logprob), "tokens": list(s.tokens),
                        "chars": list(s.chars), "neutral": list(s.neutral) if s.neutral is not None else None})
    return out


def check_run_settings(run_json: Path, params: LabelParams, rt) -> None:
    """Refuse a member run whose scorer settings differ from the ones calibrate scores with
    (``jobs.dev_scores.scores_params`` and the runtime's dtype and max_prompt_tokens: its cache key)."""
    from jobs.dev_scores import scores_params

    cfg = json.loads(run_json.read_text())["config"]
    p = scores_params(params)
    want = {"norm": p.norm, "neutral_context": p.neutral_context, "target_delimiter": p.target_delimiter}
    got = {k: cfg["label"].get(k) for k in want}
    if got != want or cfg.get("dtype") != rt.dtype or cfg.get("max_prompt_tokens") != rt.max_prompt_tokens:
        raise ValueError(f"{run_json}: the run scored with {got}, dtype {cfg.get('dtype')!r}, max_prompt_tokens "
                         f"{cfg.get('max_prompt_tokens')!r}; calibrate scores with {want}, dtype {rt.dtype!r}, "
                         f"max_prompt_tokens {rt.max_prompt_tokens}: its cache cannot be seeded from this run")


def calibrate_tasks(task_names: Sequence[str], members: Sequence[str], method: str, out: Path, work: Path,
                    dev_cap: int | None, priors: str = "auto", member_temperatures: bool = True) -> dict[str, Path]:
    """Per task: dev file, seeded score caches, ``jobs.calibrate`` (``priors``: its ``--priors``;
    ``member_temperatures`` False: its ``--no-member-temperatures``); returns {task: profile path}."""
    import eval_label

    from jobs.calibrate import calibrate
    from jobs.dev_scores import Runtime, seed_member_scores
    from jobs.devset import read_dev

    rt, params = Runtime(), LabelParams()
    systems = eval_label.registry(work / "dev", {})
    profiles = {}
    for t in task_names:
        rows = eval_label.build_rows([t], "dev", dev_cap)
        eval_label.export_dev(out / "dev", [t], dev_cap)
        dev = read_dev(str(out / "dev" / f"{t}.jsonl"))
        profile = out / t / "profile.json"
        singles = {m: out / t / f"single-{m}.json" for m in members}
        for m in members:
            dirs = eval_label.output_dirs(systems[m], [t], work / "dev")
            got = eval_label.read_outcomes(dirs, rows)
            if got is None:
                raise ValueError(f"{m} has no complete dev run on {t}: run bench/eval_label.py --split dev first")
            check_run_settings(dirs[t] / "_run.json", params, rt)
            scored = seed_rows(got, rows)
            for p in (profile, singles[m]):
                seed_member_scores(dev, MEMBER_SPECS[m], params, rt, p.with_suffix(".cache"), scored)
        dev_path = str(out / "dev" / f"{t}.jsonl")
        calibrate(dev_path, [MEMBER_SPECS[m] for m in members], method, str(profile), rt=rt, label=params,
                  priors=priors, fit_member_temperatures=member_temperatures)
        for m, p in singles.items():  # each member alone with its own dev-chosen norm and temperature
            calibrate(dev_path, [MEMBER_SPECS[m]], method, str(p), rt=rt, label=params, priors=priors)
        profiles[t] = profile
    return profiles


def calibrated_dev_accuracy(profile) -> float:
    """A single member's profile's dev accuracy as calibrated: its 2-fold cross-fitted accuracy with
    the prior correction when the profile applies it, else its accuracy under its normalisation."""
    priors = profile.chosen_on.get("priors", {})
    if priors.get("applied"):
        return priors["on"]
    return profile.member_accuracy[profile.members[profile.main]][profile.choice_norm]["accuracy"]


def calibrated_baseline(report: dict, profiles: Path, members: Sequence[str], system: str) -> dict[str, dict]:
    """Per task, ``system`` (from an eval_label report that ran ``--offline NAME-cal=profile:.../single-NAME.json``
    for each member) against the best calibrated member on dev: the member whose single profile has the
    highest dev accuracy (its 2-fold cross-fitted accuracy with the prior correction when the profile
    applies it; ties: the earlier in ``members``), its ``-cal`` labels on the same items, and the
    paired-bootstrap difference."""
    import eval_label
    from jobs.profiles import load_profile

    rows = eval_label.build_rows(report["tasks"], report["split"], None)
    gold = {r["id"]: r["gold"] for r in rows}
    labels, out = report["labels"], {}
    for t in report["tasks"]:
        dev = {}
        for m in members:
            dev[m] = calibrated_dev_accuracy(load_profile(profiles / t / f"single-{m}.json"))
        base_m = max(members, key=lambda m: (dev[m], -list(members).index(m)))
        ids = [r["id"] for r in rows if r["task"] == t][:report["n"][t]]
        base = [labels[f"{base_m}-cal"][i] == gold[i] for i in ids]
        ens = [labels[system][i] == gold[i] for i in ids]
        d, lo, hi = eval_label.paired_bootstrap(ens, base)
        out[t] = {"baseline": f"{base_m}-cal", "dev_accuracy": dev, "baseline_accuracy": sum(base) / len(ids),
                  "accuracy": sum(ens) / len(ids), "delta": d, "delta_lo": lo, "delta_hi": hi}
    return out


def compare_systems(report: dict, pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, dict]]:
    """Per pair ``"A vs B"`` and task: A's and B's accuracy and ECE (from an eval_label report holding
    both) and the paired-bootstrap difference A - B on the same items (e.g. a calibrated system with
    and without the prior correction)."""
    import eval_label

    rows = eval_label.build_rows(report["tasks"], report["split"], None)
    gold = {r["id"]: r["gold"] for r in rows}
    labels, out = report["labels"], {}
    for a, b in pairs:
        missing = [n for n in (a, b) if n not in labels]
        if missing:
            raise ValueError(f"the report has no labels of {missing}: run eval_label with those systems")
        out[f"{a} vs {b}"] = per_task = {}
        for t in report["tasks"]:
            ids = [r["id"] for r in rows if r["task"] == t][:report["n"][t]]
            x, y = ([labels[n][i] == gold[i] for i in ids] for n in (a, b))
            d, lo, hi = eval_label.paired_bootstrap(x, y)
            per_task[t] = {"a": a, "b": b, "accuracy_a": sum(x) / len(ids), "accuracy_b": sum(y) / len(ids),
                           "ece_a": report["results"][a][t]["ece"], "ece_b": report["results"][b][t]["ece"],
                           "errors_a": report["results"][a][t]["errors"], "delta": d, "delta_lo": lo, "delta_hi": hi}
    return out


def priors_decisions(profiles: Path, task_names: Sequence[str], files: Sequence[str]) -> dict[str, dict[str, dict]]:
    """{profile file: {task: the profile's prior decision}} (``chosen_on["priors"]``: on/off and the
    2-fold cross-fitted dev accuracies with and without) under ``profiles/<task>/<file>``."""
    from jobs.profiles import load_profile

    return {f: {t: load_profile(profiles / t / f).chosen_on.get("priors", {}) for t in task_names} for f in files}


def main(argv: list[str] | None = None) -> int:
    import tasks

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="profiles per task from the members' dev runs (no member scoring "
                                           "call; DeePEn's own dev labels for --method deepen)")
    cal.add_argument("--tasks", nargs="+", required=True, choices=tasks.LABEL_TASKS)
    cal.add_argument("--members", nargs="+", required=True, choices=list(MEMBER_SPECS))
    cal.add_argument("--method", default="specfuse", choices=("specfuse", "deepen"),
                     help="specfuse: no model call; deepen: DeePEn labels the dev split once (jobs.calibrate "
                          "--method deepen, in process; cached next to the profile), its member scores still "
                          "come from the dev runs")
    cal.add_argument("--out", type=Path, required=True, help="OUT/<task>/profile.json, OUT/dev/<task>.jsonl")
    cal.add_argument("--work", type=Path, default=REPO / "output" / "label_eval")
    cal.add_argument("--n-dev", type=int, default=None)
    cmp = sub.add_parser("baseline", help="a system of an eval_label report vs the best calibrated member on dev")
    cmp.add_argument("--report", type=Path, required=True, help="eval_label's JSON (with the -cal systems)")
    cmp.add_argument("--profiles", type=Path, required=True, help="calibrate's --out")
    cmp.add_argument("--members", nargs="+", required=True, choices=list(MEMBER_SPECS))
    cmp.add_argument("--system", required=True)
    cmp.add_argument("--out", type=Path, required=True, help="JSON written here")
    cal.add_argument("--priors", choices=("auto", "on", "off"), default="auto",
                     help="jobs.calibrate's --priors (auto: chosen on dev)")
    cal.add_argument("--no-member-temperatures", action="store_true",
                     help="jobs.calibrate's --no-member-temperatures (SpecFuse's members share one temperature)")
    pair = sub.add_parser("compare", help="systems of an eval_label report against each other (paired bootstrap)")
    pair.add_argument("--report", type=Path, required=True, help="eval_label's JSON holding both systems of each pair")
    pair.add_argument("--pairs", nargs="+", required=True, metavar="A=B", help="compare system A against system B")
    pair.add_argument("--profiles", type=Path, nargs="*", default=[],
                      help="calibrate --out directories whose prior decisions to list (every <task>/*.json)")
    pair.add_argument("--out", type=Path, required=True, help="JSON written here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "compare":
        pairs = [tuple(x.split("=", 1)) for x in args.pairs]
        if any(len(x) != 2 or not all(x) for x in pairs):
            ap.error(f"--pairs are A=B, got {args.pairs}")
        report = json.loads(args.report.read_text())
        res = {"pairs": compare_systems(report, pairs), "priors": {}}
        for d in args.profiles:
            files = sorted({f.name for t in report["tasks"] for f in (d / t).glob("*.json")})
            res["priors"][str(d)] = priors_decisions(d, report["tasks"], files)
        args.out.write_text(json.dumps(res, indent=1))
        for name, per_task in res["pairs"].items():
            sys.stdout.write(f"{name}: " + "; ".join(
                f"{t} {100 * r['accuracy_a']:.1f} vs {100 * r['accuracy_b']:.1f} ({100 * r['delta']:+.1f} "
                f"[{100 * r['delta_lo']:+.1f}, {100 * r['delta_hi']:+.1f}])" for t, r in per_task.items()) + "\n")
        return 0
    if args.command == "baseline":
        res = calibrated_baseline(json.loads(args.report.read_text()), args.profiles, args.members, args.system)
        args.out.write_text(json.dumps(res, indent=1))
        for t, r in res.items():
            sys.stdout.write(f"{t}: {args.system} {100 * r['accuracy']:.1f} vs {r['baseline']} "
                             f"{100 * r['baseline_accuracy']:.1f}: {100 * r['delta']:+.1f} "
                             f"[{100 * r['delta_lo']:+.1f}, {100 * r['delta_hi']:+.1f}]\n")
        return 0
    for t, p in calibrate_tasks(args.tasks, args.members, args.method, args.out, args.work, args.n_dev,
                                args.priors, not args.no_member_temperatures).items():
        sys.stdout.write(f"{t}: {p}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
