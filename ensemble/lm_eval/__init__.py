"""Evaluate an ensemble with lm-evaluation-harness: the ``ensemble-fuse`` lm-eval model (docs/lm_eval.md).

Importing this package registers the model with lm-eval (``lm_eval.api.registry``), so that, once
imported, ``lm_eval.simple_evaluate(model="ensemble-fuse", model_args=...)`` builds it; lm-eval's
command line does not discover outside models, so ``python -m ensemble.lm_eval ...`` runs lm-eval's
own CLI with the model registered, every flag passed through::

    python -m ensemble.lm_eval --model ensemble-fuse \\
        --model_args 'method=deepen,members=smollm2-135m-instruct|qwen2.5-coder-0.5b-instruct|gemma3-270m,main=0' \\
        --tasks ef_arc_challenge --include_path bench/lm_eval_tasks --limit 50

Needs the ``eval`` extra (``pip install ensemble-fuse[eval]``: lm-eval 0.4.13 or later 0.4). The
pieces:

- ``args``: ``model_args`` -> a validated ``ModelSpec`` (method, members, ``profile=PROFILE.json``,
  the method's fuser settings from ``ensemble.config``, ``device``, ``batch_size``...); an unknown key
  is refused, naming it;
- ``chat``: ``apply_chat_template`` does not render one member's template: it encodes the chat in
  the context, and each member applies its own template to it; a context without it is raw text;
- ``scores``: ``loglikelihood``'s values through the project's one choice scorer (``ensemble.scoring``)
  with normalisation ``sum``: ``Single`` the member's log-probability, DeePEn the fused teacher-forced
  one, SpecFuse the members' pooled one;
- ``model``: the ``LM`` (``loglikelihood``, ``generate_until`` through the fusers' own batched
  generation and stop strings; ``loglikelihood_rolling`` raises NotImplementedError).
"""
from __future__ import annotations

try:
    import lm_eval  # noqa: F401
except ImportError as exc:  # the optional extra is missing: say how to get it
    raise ImportError("ensemble.lm_eval needs lm-evaluation-harness: pip install 'ensemble-fuse[eval]' "
                      "(lm-eval>=0.4.13,<0.5)") from exc

from ensemble.lm_eval.model import EnsembleLM  # registers "ensemble-fuse"  # noqa: E402

MODEL_NAME = "ensemble-fuse"

__all__ = ["EnsembleLM", "MODEL_NAME"]
