"""DeePEn's labeling, the paper's: a mixin of :class:`~ensemble.fusers.deepen.DeePEn` (generation,
the fused step, broadcast and statistics live there; docs/algorithms.md, "Labeling").

Each choice is teacher-forced in the main member's tokenisation of the one scorer
(``ensemble.scoring.continuation_ids``: target delimiter for a completion-style main member); the other
members follow its text. At each position the forced token's log-probability under the fused
distribution is summed; the sums, with the main member's token counts, go through the same
``ensemble.labeling.ChoiceScores`` / ``posterior`` as every member's (``LabelParams.norm``; pmi: a
second fused pass over the same tokens after the neutral context). Every member also scores the
choices itself on its prefilled prompts (one ``Member.score``) for its statistics and for the gate:
a row whose main-member posterior margin reaches ``LabelParams.gate`` keeps the main member's label
and posterior and skips the fused pass (``LabelOutput.gated``). With ``LabelParams.priors`` the main
member's dev prior is divided out of its posterior for the gate (and the gated label), and the fused
posterior is corrected with the priors' ``fused`` table, estimated on DeePEn's own dev labels
(``ensemble.labeling.label_posterior``); the members' statistics keep their uncorrected posteriors.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ensemble.fusers.base import LabelOutput, MemberStats, check_choices, encode_prompts, in_groups, label_output
from ensemble.labeling import ChoiceScores, LabelParams, gate, label_posterior
from ensemble.members import RowBatch
from ensemble.scoring import choice_ids, choice_stats, neutral_sums, score_prefilled


class DeePEnLabeling:
    """``label`` and ``forced_sums`` of :class:`~ensemble.fusers.deepen.DeePEn`, which provides the
    members, the engine, the config and the step helpers (``_rows``, ``_record``, ``_broadcast``,
    ``_advance``, ``_stats``)."""

    def label(self, prompts: Sequence[str], choices: Sequence[Sequence[str]],
              systems: Sequence[str | None] | None = None, params: LabelParams | None = None) -> list[LabelOutput]:
        params = params or LabelParams()
        check_choices(choices, len(prompts))
        params.check_priors(choices, len(self.members))
        params.check_member_temperatures(len(self.members), "deepen")
        conts = [choice_ids(m, choices, params) for m in self.members]  # [member][row][choice]
        neutral = [neutral_sums(m, c, params, max_batch_tokens=self.max_batch_tokens)
                   for m, c in zip(self.members, conts)]
        encoded = encode_prompts(self.members, prompts, list(systems) if systems else [None] * len(prompts))
        forced = conts[self.config.main]
        lengths = [max(len(e[b]) + max(map(len, c[b])) for e, c in zip(encoded, conts)) for b in range(len(prompts))]

        def run(g: list[int]) -> list[LabelOutput]:
            return self._label([[e[b] for b in g] for e in encoded], [choices[b] for b in g],
                               [[c[b] for b in g] for c in conts],
                               [None if n is None else [n[b] for b in g] for n in neutral], params)

        return in_groups(lengths, self.max_batch_tokens, run, widths=[len(fs) for fs in forced])

    def _label(self, encoded: list[list[list[int]]], choices: list[Sequence[str]], conts: list[list[list[list[int]]]],
               neutral: list, params: LabelParams) -> list[LabelOutput]:
        """One group: ``encoded[member][row]``, ``conts[member][row][choice]``; each member scores the
        choices on its prefilled prompts (its statistics, and the gate's posterior), then the rows the
        gate leaves to the ensemble are teacher-forced through the fused distribution."""
        states = [m.start_ids(e) for m, e in zip(self.members, encoded)]
        scored = [score_prefilled(m, s, c, choices, n, max_batch_tokens=self.max_batch_tokens)
                  for m, s, c, n in zip(self.members, states, conts, neutral)]  # [member][row]
        fields = [[choice_stats(x.scores, params) for x in per] for per in scored]
        base = [[(x.calls, x.tokens_in) for x in per] for per in scored]
        forced = conts[self.config.main]
        main_posts = [label_posterior(x.scores, params, params.prior(cs, self.config.main))
                      for x, cs in zip(scored[self.config.main], choices)]  # the gate's (prior-corrected)
        todo = [b for b in range(len(choices)) if not gate(main_posts[b], params.gate)]
        fused = self.forced_sums(states, todo, [forced[b] for b in todo])
        at = {b: k for k, b in enumerate(todo)}
        sums: dict[tuple[int, ...], float] = {}  # pmi: a main-member continuation -> its fused neutral sum
        if params.norm == "pmi" and todo:
            distinct = list(dict.fromkeys(tuple(c) for b in todo for c in forced[b]))
            blank = [m.start_ids([m.encode_prompt(params.neutral_context)]) for m in self.members]
            sums = dict(zip(distinct, self.forced_sums(blank, [0], [[list(c) for c in distinct]])[0][0]))
        out = []
        for b, cs in enumerate(choices):
            stats_fields = [f[b] for f in fields]
            if b not in at:
                stats = [MemberStats(name=m.name, role="main" if i == self.config.main else "member",
                                     weight=self.weights[i], calls=base[i][b][0], tokens_in=base[i][b][1],
                                     **stats_fields[i]) for i, m in enumerate(self.members)]
                out.append(label_output(cs, main_posts[b], stats, gated=True))
                continue
            k = at[b]
            scores = ChoiceScores(logprob=tuple(fused[0][k]), tokens=tuple(len(f) for f in forced[b]),
                                  chars=tuple(len(c) for c in cs),
                                  neutral=tuple(sums[tuple(f)] for f in forced[b]) if params.norm == "pmi" else None)
            stats = self._label_stats(k, fused, [base[i][b] for i in range(len(self.members))], stats_fields)
            out.append(label_output(cs, label_posterior(scores, params, params.prior(cs, None)), stats))
        return out

    def forced_sums(self, states: list[RowBatch], rows: list[int], forced: list[list[list[int]]]):
        """Teacher-force ``forced[k][c]`` (main-member ids) after row ``rows[k]`` of every member's
        ``states`` (one state row per choice, copied from it), the other members following the text.
        Public for callers that need the fused log-probabilities themselves, not their posterior
        (``ensemble/lm_eval``'s loglikelihood).
        Returns ``(sums[k][c], pairs, st, counters)``: the summed fused log-probs of each choice, the
        (k, c) of each state row, its statistics sums and each member's (calls, tokens_in) at its end."""
        pairs = [(k, c) for k in range(len(rows)) for c in range(len(forced[k]))]
        sums = [[0.0] * len(fs) for fs in forced]
        st = self._rows(len(pairs))
        counters = [[(0, 0)] * len(self.members) for _ in pairs]
        if not pairs:
            return sums, pairs, st, counters
        toks = [forced[k][c] for k, c in pairs]
        states = [m.select(s, [rows[k] for k, _ in pairs]) for m, s in zip(self.members, states)]
        live, pos = list(range(len(pairs))), 0
        while live:
            extra = torch.tensor([toks[p][pos] for p in live], device=self.main.device)
            res = self.engine.fuse([s.logits for s in states], extra=extra)
            lp = res.forced_logprobs(extra).tolist()  # over the full main vocabulary
            self._record(st, res, live, extra.tolist(), states)
            pos += 1
            feeds: list[list] = [[] for _ in self.members]
            rbs: list[list] = [[] for _ in self.members]
            keep = []
            for j, p in enumerate(live):
                k, c = pairs[p]
                sums[k][c] += lp[j]
                if pos < len(toks[p]):
                    keep.append(j)
                    self._broadcast(st, p, toks[p][pos - 1], feeds, rbs)
                else:
                    counters[p] = [(s.calls[j], s.tokens_in[j]) for s in states]
            if not keep:
                break
            states, live = self._advance(states, live, keep, feeds, rbs)
        return sums, pairs, st, counters

    def _label_stats(self, k: int, fused, base: list[tuple[int, int]], fields: list[dict]) -> list[MemberStats]:
        """Statistics of the k-th teacher-forced row: its choices' pairs share every forward, so calls
        are the most of any pair and the tokens fed add up over them (from the member's ``base``
        counters, after it scored the choices itself); plus each member's own choice scores."""
        _, pairs, st, counters = fused
        mine = [p for p, (pk, _) in enumerate(pairs) if pk == k]
        counts = [(max(counters[p][i][0] for p in mine), base[i][1] + sum(counters[p][i][1] - base[i][1] for p in mine))
                  for i in range(len(self.members))]
        stats = self._stats(st, mine, counts, [0] * len(self.members))
        for s, f in zip(stats, fields):
            for name, value in f.items():
                setattr(s, name, value)
        return stats
