"""Settings sweep on the DEV split (disjoint from the reported test subset): which DeePEn / SpecFuse
settings help the packaged trio on the labeling tasks?

    python bench/sweep.py [--n-dev 10] [--out bench/results/sweep]

1. Each member alone on the dev items (``bench/evaluate.py --split dev``): dev accuracy per member,
   averaged over tasks, gives DeePEn-Adapt weights (``bench/compat.adapt_weights``).
2. The trio under DeePEn with the defaults, each member as the main model, the adapt weights, a
   larger search lr, and the whole top-k (64) instead of the mass cut, and mean instead of summed
   log-probabilities of a choice's tokens (``--choice-norm``: token is the mean, sum the sum); SpecFuse with uniform and adapt weights.

Everything runs through the job (``bench/evaluate.py`` with ``--extra`` systems) and is written to
``<out>.json`` / ``<out>.md`` / ``<out>.png``; the adapt weights are printed as a job flag.
Generation settings (SpecFuse segment length) are not swept here: on GSM8K at this model size a dev
split small enough for a CPU run cannot separate them from noise.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import compat  # noqa: E402
import evaluate  # noqa: E402

log = logging.getLogger("bench.sweep")

TRIO = " ".join(evaluate.TRIO)


def variants(weights: list[float]) -> dict[str, str]:
    w = " ".join(f"{x:.6f}" for x in weights)
    deepen = f"--method deepen --members {TRIO}"
    return {  # in order of expected effect: a partial run still answers the first questions
        "deepen trio (main smollm2, defaults)": deepen,
        "deepen trio, main qwen": f"{deepen} --main 1",
        "deepen trio, main gemma": f"{deepen} --main 2",
        "deepen trio, choice-norm token": f"{deepen} --choice-norm token",
        "deepen trio, adapt weights": f"{deepen} --weights {w}",
        "specfuse trio": f"--method specfuse --members {TRIO}",
        "specfuse trio, adapt weights": f"--method specfuse --members {TRIO} --weights {w}",
        "deepen trio, lr 0.5": f"{deepen} --deepen-lr 0.5",
        "deepen trio, top-mass none": f"{deepen} --deepen-top-mass none",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-dev", type=int, default=10, help="dev items per labeling task")
    ap.add_argument("--tasks", nargs="+", default=["arc_challenge", "piqa", "boolq"])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sweep")
    ap.add_argument("--variants", nargs="*", default=None, help="names of the variants to run (default: all)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    common = ["--split", "dev", "--tasks", *args.tasks, "--n-label", str(args.n_dev), "--n-gen", "0"]
    singles_out = args.out.with_name(args.out.name + "_singles")
    evaluate.main(common + ["--systems", *evaluate.SINGLES, "--out", str(singles_out)])
    singles = json.loads(singles_out.with_suffix(".json").read_text())["results"]
    dev_acc = [statistics.fmean(v["accuracy"] for v in singles[s].values()) for s in evaluate.SINGLES]
    weights = compat.adapt_weights(dev_acc)
    log.info("dev accuracy %s -> adapt weights %s", dict(zip(evaluate.SINGLES, dev_acc)), weights)
    chosen = variants(weights)
    unknown = sorted(set(args.variants or ()) - set(chosen))
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(chosen)}")
    extra = [f"{k}={v}" for k, v in chosen.items() if args.variants is None or k in args.variants]
    evaluate.main(common + ["--systems", *evaluate.SINGLES, "--extra", *extra, "--out", str(args.out)])
    res = json.loads(args.out.with_suffix(".json").read_text())
    res["adapt_weights"] = dict(zip(evaluate.SINGLES, weights))
    res["dev_mean_accuracy"] = dict(zip(evaluate.SINGLES, dev_acc))
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    flag = "--weights " + " ".join(f"{x:.6f}" for x in weights)
    with args.out.with_suffix(".md").open("a") as f:
        f.write(f"\nDeePEn-Adapt weights from dev accuracy ({', '.join(evaluate.SINGLES)}): `{flag}`\n")
    sys.stdout.write(f"\nadapt weights: {flag}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
