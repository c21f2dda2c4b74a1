"""The lm-eval ``LM`` of an ensemble: ``ensemble-fuse`` (docs/lm_eval.md; the package docstring)."""
from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator, Sequence

import lm_eval.models  # noqa: F401  (lm-eval's own models first: get_model loads them only into an empty registry)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ensemble.config import DecodeParams
from ensemble.lm_eval.args import ModelSpec, parse_model_args
from ensemble.lm_eval.chat import Turn, decode_context, encode_chat
from ensemble.lm_eval.scores import CHAT, RAW, as_text, loglikelihoods

log = logging.getLogger(__name__)

MAX_GEN_TOKS = 256
"""generate_until's budget when a task sets no ``max_gen_toks`` (lm-eval's ``hf`` default)."""
GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")
"""The generation kwargs generate_until reads; any other is refused, naming it."""


def decode_params(gen_kwargs: dict, system: str | None, seed: int) -> DecodeParams:
    """lm-eval's generation kwargs of one request as ``DecodeParams``: ``until`` (a string or a list)
    the stop strings, ``max_gen_toks`` the budget in the main member's tokens, greedy unless
    ``do_sample`` is true and ``temperature`` > 0 (then sampled with ``top_p``/``top_k`` and ``seed``)."""
    kw = dict(gen_kwargs or {})
    bad = sorted(set(kw) - set(GEN_KEYS))
    if bad:
        raise ValueError(f"generation kwarg {bad[0]!r} (value {kw[bad[0]]!r}) is not supported by the ensemble-fuse "
                         f"model; supported: {list(GEN_KEYS)}")
    until = kw.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
    return DecodeParams(max_new_tokens=int(kw.get("max_gen_toks") or MAX_GEN_TOKS), temperature=temperature,
                        top_p=float(kw.get("top_p") or 1.0), top_k=kw.get("top_k") or None, seed=seed,
                        stop=tuple(s for s in until if s), system=system)


def member_device(device: str | None) -> str | None:
    """Where the members load: ``device`` as lm-eval passes it, except a CUDA device on a machine
    without CUDA (lm-eval's command line passes ``cuda:0`` unless told otherwise), which becomes the
    CPU with a warning, as lm-eval's ``hf`` model does; None: CUDA when available, else the CPU."""
    import torch

    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %r asked for (lm-eval's default is cuda:0) but CUDA is not available: the members "
                    "load on the CPU", device)
        return "cpu"
    return device


def _chunks(items: list, size: int | None) -> Iterator[list]:
    size = size or max(len(items), 1)
    for at in range(0, len(items), size):
        yield items[at:at + size]


@register_model("ensemble-fuse")
class EnsembleLM(LM):
    """An ensemble (or one member) behind lm-eval's ``LM`` interface; ``model_args`` are
    :func:`ensemble.lm_eval.args.parse_model_args`'s."""

    def __init__(self, **model_args: Any):
        super().__init__()
        self.spec: ModelSpec = parse_model_args(model_args)
        from ensemble.fusers.registry import make_fuser

        s = self.spec
        self.fuser = make_fuser(s.method, s.members, s.fuser, dtype=s.dtype, device=member_device(s.device),
                                max_batch_tokens=s.max_batch_tokens)
        self._device = self.fuser.members[0].device
        self._warned_greedy = False
        log.info("ensemble-fuse: %s over %s", s.method, [m.name for m in self.fuser.members])

    # ---- chat templates: each member its own (ensemble/lm_eval/chat.py) -------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return encode_chat(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return "ensemble-fuse:" + "|".join(m.name for m in self.fuser.members)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """What lm-eval records as the chat template: each member's own (or that it has none)."""
        if not chat_template:
            return None
        return "\n".join(f"{m.name}: {getattr(m.tokenizer, 'chat_template', None) or '(no template: completion)'}"
                         for m in self.fuser.members)

    # ---- requests -----------------------------------------------------------------------------
    def loglikelihood(self, requests: Iterable, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Each request's (continuation log-likelihood, is_greedy): the requests are grouped by context
        and each context's distinct continuations scored together (ensemble/lm_eval/scores.py)."""
        args = [tuple(r.args) for r in requests]
        groups: dict[str, dict[str, list[int]]] = {}
        for i, (context, continuation) in enumerate(args):
            groups.setdefault(context, {}).setdefault(continuation, []).append(i)
        turns = {c: decode_context(c) for c in groups}
        out: list[tuple[float, bool] | None] = [None] * len(args)
        for chat in (False, True):
            contexts = [c for c in groups if turns[c].chat is chat]
            for chunk in _chunks(contexts, self.spec.batch_size):
                conts = [list(groups[c]) for c in chunk]
                values = loglikelihoods(self.fuser, self.spec.method, [turns[c].prompt for c in chunk],
                                        [turns[c].system for c in chunk], conts, raw=not chat)
                greedy = self._greedy([turns[c] for c in chunk], conts)
                for c, cs, vs, gs in zip(chunk, conts, values, greedy):
                    for cont, v, g in zip(cs, vs, gs):
                        answer = (float(v), bool(g))
                        self.cache_hook.add_partial("loglikelihood", (c, cont), answer)
                        for i in groups[c][cont]:
                            out[i] = answer
                log.info("loglikelihood: %d of %d contexts scored", sum(1 for o in out if o is not None), len(args))
        return out  # type: ignore[return-value]

    def _greedy(self, turns: Sequence[Turn], conts: Sequence[Sequence[str]]) -> list[list[bool]]:
        """is_greedy of each continuation: with ``greedy_check``, whether the fuser's greedy generation
        of the continuation's length (in the main member's tokens, as the scorer encodes it) decodes
        to exactly the scored text; otherwise False (logged once)."""
        if not self.spec.greedy_check:
            if not self._warned_greedy:
                log.warning("ensemble-fuse returns is_greedy=False for every loglikelihood request "
                            "(greedy_check=false; set greedy_check=true for tasks whose metric reads it)")
                self._warned_greedy = True
            return [[False] * len(cs) for cs in conts]
        raw = not turns[0].chat if turns else True
        params = RAW if raw else CHAT
        main = self.fuser.main if self.spec.method == "deepen" else self.fuser.members[0]
        prompts, rows, texts = [], [], []
        with as_text(self.fuser, raw):
            for t, cs in zip(turns, conts):
                for cont in cs:
                    text = cont if main.has_chat_template else params.target_delimiter + cont
                    prompts.append(t.prompt)
                    texts.append(text)
                    rows.append(DecodeParams(max_new_tokens=max(1, len(main.encode_text(text))), system=t.system))
            outs = self.fuser.generate(prompts, rows) if prompts else []
        flat = [o.text == text for o, text in zip(outs, texts)]
        result, at = [], 0
        for cs in conts:
            result.append(flat[at:at + len(cs)])
            at += len(cs)
        return result

    def generate_until(self, requests: Iterable, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation: the fuser's own batched generation, cut at the first ``until``
        string (ensemble/fusers/stopping.py), stopping at a member's EOS or after ``max_gen_toks``."""
        args = [tuple(r.args) for r in requests]
        turns = [decode_context(c) for c, _ in args]
        params = [decode_params(kw, t.system, self.spec.seed) for (_, kw), t in zip(args, turns)]
        out: list[str | None] = [None] * len(args)
        for chat in (False, True):
            rows = [i for i, t in enumerate(turns) if t.chat is chat]
            for chunk in _chunks(rows, self.spec.batch_size):
                with as_text(self.fuser, not chat):
                    outs = self.fuser.generate([turns[i].prompt for i in chunk], [params[i] for i in chunk])
                for i, o in zip(chunk, outs):
                    out[i] = o.text
                    self.cache_hook.add_partial("generate_until", args[i], o.text)
                log.info("generate_until: %d of %d requests done", sum(1 for o in out if o is not None), len(args))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: Iterable, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("loglikelihood_rolling (perplexity tasks) is not implemented by the ensemble-fuse "
                                  "model: an ensemble scores continuations after a prompt (docs/lm_eval.md)")


__all__ = ["EnsembleLM", "GEN_KEYS", "MAX_GEN_TOKS", "decode_params"]
