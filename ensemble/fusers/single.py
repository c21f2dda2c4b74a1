"""Single: one member decoding alone. The baseline every ensemble is compared against, and the
oracle its invariants are checked against (one member, or copies of one, must reproduce it).

generate: batched, KV-cached greedy or sampled decoding with per-row generators; a row stops on
any of the member's EOS ids, a stop string, or its own max_new_tokens.
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
from ensemble.members import Member
from ensemble.sampling import choose_batch, make_generator

log = logging.getLogger(__name__)


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


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
        while live:
            picks = choose_batch(state.logits, [rows[r] for r in live], [gens[r] for r in live])
            feed: list[list[int]] = []
            keep: list[int] = []
            for i, (r, tok) in enumerate(zip(live, picks)):
                p = rows[r]
                finish = None
                if tok in m.eos_ids:
                    finish = FinishReason.STOP
                else:
                    out_ids[r].append(tok)
                    if p.stop and find_stop(m.decode(out_ids[r]), p.stop) is not None:
                        finish = FinishReason.STOP
                    elif len(out_ids[r]) >= p.max_new_tokens:
                        finish = FinishReason.LENGTH
                if finish is None:
                    keep.append(i)
                    feed.append([tok])
                else:
                    outputs[r] = self._finish(state, i, out_ids[r], finish, p)
            if not keep:
                break
            if len(keep) < len(live):
                state = m.select(state, keep)
                live = [live[i] for i in keep]
            m.feed(state, feed)
        return outputs  # type: ignore[return-value]

    def _finish(self, state, i: int, ids: list[int], finish: FinishReason, p: DecodeParams) -> FusedOutput:
        text = self.member.decode(ids)
        cut = find_stop(text, p.stop) if p.stop else None
        if cut is not None:
            text = text[:cut]
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
