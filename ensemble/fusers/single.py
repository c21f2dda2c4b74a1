"""Single: one member decoding alone. The baseline every ensemble is compared against, and the
oracle its invariants are checked against (one member, or copies of one, must reproduce it).

generate: batched, KV-cached greedy or sampled decoding with per-row generators; a row stops on
any of the member's EOS ids, a stop string, or its own max_new_tokens (``ensemble/fusers/stopping.py``);
the text is the member's decode of its tokens, cut before the first stop string.
label: the member's posterior over each row's choices from the one scorer (``ensemble/scoring.py``;
``LabelParams.norm`` picks the normalisation, docs/algorithms.md), with its dev prior divided out when
``LabelParams.priors`` is set (``ensemble.labeling.label_posterior``); its statistics carry the scores
and the uncorrected posterior.

Both take the prompts in consecutive groups within ``max_batch_tokens`` (``ensemble.config``:
prompt plus ``max_new_tokens``, or plus the longest choice, per row; ``ensemble.batching.pack``).
"""
from __future__ import annotations

from typing import Sequence

from ensemble.config import MAX_BATCH_TOKENS, DecodeParams, check_batch_tokens, per_row
from ensemble.fusers.base import (
    FinishReason,
    FusedOutput,
    LabelOutput,
    MemberStats,
    encode_prompts,
    fit_prompts,
    in_groups,
    label_output,
)
from ensemble.fusers.stopping import StopChecker, cut_at_stop
from ensemble.labeling import LabelParams, label_posterior
from ensemble.members import Member
from ensemble.sampling import choose_batch, make_generator
from ensemble.scoring import choice_stats, score_choices


class Single:
    """One member alone, behind the fuser interface."""

    name = "single"
    fit_prompts = fit_prompts  # ensemble.fusers.base.fit_prompts as a method

    def __init__(self, member: Member, *, max_batch_tokens: int = MAX_BATCH_TOKENS):
        self.member = member
        self.max_batch_tokens = check_batch_tokens(max_batch_tokens)

    @property
    def members(self) -> list[Member]:
        return [self.member]

    def generate(self, prompts: Sequence[str], params: DecodeParams | Sequence[DecodeParams]) -> list[FusedOutput]:
        rows = per_row(params, len(prompts))
        [encoded] = encode_prompts([self.member], prompts, [p.system for p in rows])
        return in_groups([len(e) + r.max_new_tokens for e, r in zip(encoded, rows)], self.max_batch_tokens,
                         lambda g: self._generate([encoded[r] for r in g], [rows[r] for r in g]))

    def _generate(self, encoded: list[list[int]], rows: list[DecodeParams]) -> list[FusedOutput]:
        """One group: batched, KV-cached decoding of the encoded prompts."""
        m = self.member
        state = m.start_ids(encoded)
        gens = [None if p.greedy else make_generator(p.seed, m.device) for p in rows]
        outputs: list[FusedOutput | None] = [None] * len(rows)
        live = list(range(len(rows)))  # the group's row index of each state row
        out_ids: list[list[int]] = [[] for _ in rows]
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

    def label(self, prompts: Sequence[str], choices: Sequence[Sequence[str]],
              systems: Sequence[str | None] | None = None, params: LabelParams | None = None) -> list[LabelOutput]:
        params = params or LabelParams()
        params.check_priors(choices, 1)
        params.check_member_temperatures(1, "single")
        m = self.member
        results = []
        for scored, cs in zip(score_choices(m, prompts, choices, systems, params,
                                            max_batch_tokens=self.max_batch_tokens), choices):
            stats = MemberStats(name=m.name, role="main", weight=1.0, calls=scored.calls, tokens_in=scored.tokens_in,
                                **choice_stats(scored.scores, params))
            results.append(label_output(cs, label_posterior(scored.scores, params, params.prior(cs, 0)), [stats]))
        return results
