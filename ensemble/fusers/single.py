"""Single: one member decoding alone. The baseline every ensemble is compared against, and the
oracle its invariants are checked against (one member, or copies of one, must reproduce it).

generate: batched, KV-cached greedy or sampled decoding with per-row generators; a row stops on
any of the member's EOS ids, a stop string, or its own max_new_tokens (``ensemble/fusers/stopping.py``);
the text is the member's decode of its tokens, cut before the first stop string.
label: length-normalised log-likelihood (mean token log-prob) of each choice after the prompt,
softmax-normalised over the choices.
"""
from __future__ import annotations

import logging
from typing import Sequence

from ensemble.config import DecodeParams, per_row
from ensemble.fusers.base import (
    FinishReason,
    FusedOutput,
    LabelOutput,
    MemberStats,
    check_choices,
    fit_prompts,
    normalise_log_scores,
)
from ensemble.fusers.stopping import StopChecker, cut_at_stop
from ensemble.members import Member
from ensemble.sampling import choose_batch, make_generator

log = logging.getLogger(__name__)


class Single:
    """One member alone, behind the fuser interface."""

    name = "single"
    fit_prompts = fit_prompts  # ensemble.fusers.base.fit_prompts as a method

    def __init__(self, member: Member):
        self.member = member

    @property
    def members(self) -> list[Member]:
        return [self.member]

    def generate(self, prompts: Sequence[str], params: DecodeParams | Sequence[DecodeParams]) -> list[FusedOutput]:
        m = self.member
        rows = per_row(params, len(prompts))
        state = m.start(list(prompts), [p.system for p in rows])
        gens = [None if p.greedy else make_generator(p.seed, m.device) for p in rows]
        outputs: list[FusedOutput | None] = [None] * len(prompts)
        live = list(range(len(prompts)))  # original row index of each state row
        out_ids: list[list[int]] = [[] for _ in prompts]
        checks = [StopChecker(p.stop, p.max_new_tokens, m.eos_ids, token_bytes=m.token_bytes) for p in rows]
        while live:
            picks = choose_batch(state.logits, [rows[r] for r in live], [gens[r] for r in live])
            feed: list[list[int]] = []
            keep: list[int] = []
            for i, (r, tok) in enumerate(zip(live, picks)):
                stop = checks[r].token(tok)
                if stop is None or not stop.eos:
                    out_ids[r].append(tok)
                if stop is None:
                    keep.append(i)
                    feed.append([tok])
                else:
                    outputs[r] = self._finish(state, i, out_ids[r], stop.reason, rows[r])
            if not keep:
                break
            if len(keep) < len(live):
                state = m.select(state, keep)
                live = [live[i] for i in keep]
            m.feed(state, feed)
        return outputs  # type: ignore[return-value]

    def _finish(self, state, i: int, ids: list[int], finish: FinishReason, p: DecodeParams) -> FusedOutput:
        text = cut_at_stop(self.member.decode(ids), p.stop)
        stats = MemberStats(
            name=self.member.name, role="main", weight=1.0,
            calls=state.calls[i], tokens_in=state.tokens_in[i], tokens_out=len(ids),
        )
        return FusedOutput(text=text, token_count=len(ids), finish_reason=finish, member_stats=[stats])

    def label(
        self,
        prompts: Sequence[str],
        choices: Sequence[Sequence[str]],
        systems: Sequence[str | None] | None = None,
    ) -> list[LabelOutput]:
        check_choices(choices, len(prompts))
        m = self.member
        state = m.start(list(prompts), list(systems) if systems else None)
        conts = [[m.encode_text(c) for c in cs] for cs in choices]
        logps = m.score(state, conts)
        results = []
        for b, cs in enumerate(choices):
            mean_lp = [float(lp.mean()) for lp in logps[b]]
            probs = normalise_log_scores(mean_lp)
            best = max(range(len(cs)), key=lambda i: (probs[i], -i))
            stats = MemberStats(name=m.name, role="main", weight=1.0, calls=state.calls[b], tokens_in=state.tokens_in[b])
            results.append(LabelOutput(label=cs[best], probs=probs, member_stats=[stats]))
        return results
