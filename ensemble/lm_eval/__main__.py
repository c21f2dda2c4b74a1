"""``python -m ensemble.lm_eval ARGS``: lm-eval's own command line with the ``ensemble-fuse`` model
registered; every argument is lm-eval's (``--model ensemble-fuse --model_args ... --tasks ...``).

The project runs offline: ``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE`` default to 1 here (set them
to 0 in the environment to let lm-eval reach the Hugging Face Hub for its own tasks).
"""
from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(name, "1")
    import ensemble.lm_eval  # noqa: F401  (registers the model)
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
