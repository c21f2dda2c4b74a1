"""SpecFuse: segment-level propose, verify, rank and broadcast, with model exit
(Lv et al., arXiv 2412.07380; specification in docs/algorithms.md).

generate(prompts, params) runs rounds over each row's shared response until the row stops:

1. Propose: every member active on a row drafts up to ``segment_tokens`` tokens (capped by the row's
   remaining budget) from its own KV-cached state, greedy or sampled with a per-(row, member)
   generator seeded from the row's seed only. Drafts are fed one token at a time, batched over rows;
   the draft is then rewound (``Member.rewind``, no forward pass) and cut back to whole words
   (:func:`ensemble.segments.trim_to_word`). Self-score: mean probability of the kept tokens (and of
   the EOS token when the draft ended with one) under the member's own unfiltered distribution.
2. Verify: each active member scores the other active members' candidates of all its rows in ONE
   batched forward over its cached prefix (``Member.score``). A candidate is scored in the verifier's
   tokenisation of the candidate text (exactly the proposer's ids when the vocabularies are equal),
   followed by the verifier's EOS id when the candidate ended with EOS.
3. Rank: :func:`ensemble.segments.rank` (per-verifier normalisation, weighted mean, ties to the
   lower member index); the member weights are renormalised over the row's active members. With
   ``self_score`` off a candidate is ranked by the other members' scores only.
4. Broadcast: the winner's text extends the response. The proposer, and members with the same
   vocabulary and the same accepted tokens, append the winner's token ids exactly; the others
   re-tokenise only the unstable tail (``TokenTrack.sync``) and roll their cache back
   (``Member.feed(rollback=...)``). Nothing is re-encoded from the start. With ``kv_reuse`` (default)
   verification scores in each member's own cache (``Member.score_shared``, no copies) and a member
   revives the slots that already hold its broadcast (``Member.revive``, no forward): the proposer its
   kept draft, a verifier the winner's tokens it scored; only the rest is fed. With ``kv_compact``
   (default) dead slots are removed after each round (``Member.compact``); see ensemble/kv.py.
5. Model exit, after every round t >= max(1, exit_min_rounds), by ``exit_rule``: 'rank' (
   :func:`ensemble.segments.rank_exit_mask`): each round records every active member's place
   (:func:`~ensemble.segments.round_outcomes`: won, ranked last); a member exits when it won none of
   its last ``exit_window`` rounds and its last places in them have a p-value <= ``exit_alpha``
   against the chance rate 1/n. 'lead' (:func:`ensemble.segments.lead_exit_mask`): a member exits
   when it won none of its last ``exit_window`` rounds while one other member won and beat it in
   enough of them (p-value <= ``exit_alpha``, null: uniform winners). ``exit_alpha`` None is the
   rule's own level (``ensemble.config.EXIT_ALPHA``). 'softmax' (legacy, :func:`ensemble.segments.exit_mask`): cumulative
   quality Q = sum of a member's final scores; T = max(exit_min_temperature, entropy in nats of
   Q / sum(Q)); p = softmax(Q / T); a member exits when p_i < exit_delta / n_active. Under every rule
   the round's winner never exits, so the last active member never does. An exited member's row is
   dropped from its state: it neither proposes nor verifies again. Rows are independent: each has
   its own active set, rounds, exit record and stop.
6. Stop (per row): the winner ended with EOS (``stop``), the response contains a stop string (cut
   before it, ``stop``), the main (first) member's tokenisation of the response reaches
   ``max_new_tokens`` (truncated to it, ``length``), or ``max_rounds`` rounds (``length``).

label(prompts, choices, systems, params): the choices are the candidates of one verification round:
every member scores them with the one choice scorer (``ensemble/scoring.py``, normalisation
``LabelParams.norm``) and the members' posteriors are pooled with the member weights,
``config.label_pool`` 'linear' (weighted mean) or 'loglinear' (weighted geometric mean, renormalised);
with one member this is exactly ``Single``'s label. The first member is the main one for the gate
(``LabelParams.gate``): when its posterior margin reaches the gate, the row keeps its label and
posterior (``LabelOutput.gated``). With ``LabelParams.priors`` each member's dev prior is divided
out of its posterior before the pool and the gate (``ensemble.labeling.label_posterior``), and
``LabelParams.member_temperatures`` tempers each member's posterior at its own temperature. Every
member's own (uncorrected) posterior and scores are in its statistics.

generate and label take the prompts in consecutive groups within ``max_batch_tokens``
(``ensemble.config``; per row: the longest prompt over the members plus ``max_new_tokens``; label: each
member its own prompt plus its longest choice; ``ensemble.batching.pack``); verification scores within
the same bound.

Statistics per row and member (``MemberStats``): ``calls`` counts *member calls*, i.e. invocations of
the member for this row: one to propose and one to verify in each round it is active (a lone active
member has nothing to verify and is invoked once), so with exit disabled a round costs 2N member calls.
A propose call runs up to ``segment_tokens`` forward passes; forward passes are not counted here.
``tokens_in`` counts tokens fed (prompt, drafts, verification and re-tokenisation), ``tokens_out``
tokens drafted, ``proposed``/``accepted`` candidates, ``mean_score`` the mean final score of its
candidates, ``rounds_active`` rounds it took part in and ``exit_round`` the round after which it exited
(None if it never did; when set it equals ``rounds_active``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ensemble.config import (DecodeParams, SpecFuseConfig, check_batch_tokens, normalise_weights,
                             per_row)
from ensemble.fusers.base import (ConfiguredFuser, FinishReason, FusedOutput, LabelOutput, MemberStats, encode_prompts,
                                  fit_prompts, in_groups, label_output)
from ensemble.fusers.stopping import StopChecker
from ensemble.kv import Slots, reuse_plan
from ensemble.labeling import LabelParams, gated_pool, label_posterior
from ensemble.members import Member, RowBatch
from ensemble.sampling import choose_batch, make_generator
from ensemble.scoring import choice_stats, score_choices
from ensemble.segments import (Outcome, exit_mask, lead_exit_mask, rank, rank_exit_mask, round_outcomes, segment_score,
                               trim_to_word)
from ensemble.text import TokenTrack
from ensemble.utf8 import complete_utf8_prefix, valid_utf8

log = logging.getLogger(__name__)

_SEED_STRIDE = 0x9E3779B97F4A7C15  # decorrelates the generators of one row's members


@dataclass
class _Candidate:
    member: int
    ids: list[int]  # kept draft tokens, EOS excluded
    data: bytes  # their bytes
    eos: bool
    self_score: float
    base: bytes  # the response bytes the proposer drafted after (its track's data)
    own: Slots | None = None  # kv_reuse: the proposer's dead cache slots holding the kept draft tokens it fed


@dataclass
class _Row:
    params: DecodeParams
    tracks: list[TokenTrack]
    gens: list[torch.Generator | None]
    active: list[bool]
    max_rounds: int
    stops: StopChecker
    response: bytes = b""
    rounds: int = 0
    finish: FinishReason | None = None
    text: str = ""
    token_count: int = 0
    pending: dict[int, tuple[int, list[int]]] = field(default_factory=dict)  # member -> (rollback, new)
    stats: list[MemberStats] = field(default_factory=list)
    quality: list[float] = field(default_factory=list)
    score_sum: list[float] = field(default_factory=list)
    outcomes: list[list[Outcome]] = field(default_factory=list)  # per member, its active rounds
    winner: _Candidate | None = None  # this round's
    verified: dict[tuple[int, int], Slots] = field(default_factory=dict)  # kv_reuse: (verifier, proposer) -> slots


class SpecFuse(ConfiguredFuser):
    """Segment-level ensemble of heterogeneous members with model exit (see the module docstring).

    ``SpecFuse(members, segment_tokens=, exit=, exit_rule=, exit_window=, exit_alpha=, weights=,
    self_score=, ..., max_batch_tokens=)``: the keywords are :class:`~ensemble.config.SpecFuseConfig`'s fields;
    ``SpecFuse.from_config(members, config)``."""

    name = "specfuse"
    config_class = SpecFuseConfig
    fit_prompts = fit_prompts  # ensemble.fusers.base.fit_prompts as a method

    def _setup(self, members: list[Member], config: SpecFuseConfig, max_batch_tokens: int) -> None:
        self.max_batch_tokens = check_batch_tokens(max_batch_tokens)
        if not members:
            raise ValueError(f"members must be a non-empty list of Member, got {members!r}")
        self.config = config
        self.weights = normalise_weights(config.weights, len(members))
        self._members = members

    @property
    def members(self) -> list[Member]:
        return list(self._members)

    # ---- generate ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], params: DecodeParams | Sequence[DecodeParams]) -> list[FusedOutput]:
        params = per_row(params, len(prompts))
        encoded = encode_prompts(self._members, prompts, [p.system for p in params])
        lengths = [max(len(e[r]) for e in encoded) + p.max_new_tokens for r, p in enumerate(params)]
        return in_groups(lengths, self.max_batch_tokens,
                         lambda g: self._generate([[e[r] for r in g] for e in encoded], [params[r] for r in g]))

    @torch.inference_mode()
    def _generate(self, encoded: list[list[list[int]]], params: list[DecodeParams]) -> list[FusedOutput]:
        """One group: ``encoded[member][row]`` prompt ids, in rounds until every row stops."""
        n = len(self._members)
        rows = [self._new_row(p) for p in params]
        states: list[RowBatch | None] = [m.start_ids(e) for m, e in zip(self._members, encoded)]
        where: list[list[int]] = [list(range(len(rows))) for _ in range(n)]  # state row -> prompt row
        outputs: list[FusedOutput | None] = [None] * len(rows)
        while any(o is None for o in outputs):
            for row in rows:
                row.verified.clear()
            cands = [self._propose(i, states[i], [rows[r] for r in where[i]]) if states[i] is not None else [] for i in range(n)]
            by_row: list[dict[int, _Candidate]] = [{} for _ in rows]
            for i in range(n):
                for r, cand in zip(where[i], cands[i]):
                    by_row[r][i] = cand
            verdicts: list[dict[tuple[int, int], float]] = [{} for _ in rows]  # (verifier, proposer) -> score
            for i in range(n):
                if states[i] is not None:
                    self._verify(i, states[i], [rows[r] for r in where[i]], [by_row[r] for r in where[i]],
                                 [verdicts[r] for r in where[i]])
            for r, row in enumerate(rows):
                if outputs[r] is None:
                    self._settle(row, by_row[r], verdicts[r])
            for i in range(n):  # drop finished rows and exited members, then broadcast
                if states[i] is not None:
                    states[i], where[i] = self._compact(i, states[i], where[i], rows)
                if states[i] is not None:
                    fed = [rows[r].pending.pop(i) for r in where[i]]
                    if self.config.kv_reuse:
                        fed = self._reuse(i, states[i], [rows[r] for r in where[i]], fed)
                    states[i] = self._broadcast(i, states[i], fed)
                    if self.config.kv_compact:
                        self._members[i].compact(states[i])
            for r, row in enumerate(rows):
                if outputs[r] is None and row.finish is not None:
                    outputs[r] = FusedOutput(row.text, row.token_count, row.finish, row.stats)
        return outputs  # type: ignore[return-value]

    def _broadcast(self, i: int, state: RowBatch, fed: list[tuple[int, list[int]]]) -> RowBatch:
        """Bring member i's rows to the new responses: per row, roll the cache back over ``fed[b][0]``
        tokens and feed the ids ``fed[b][1]`` (the re-tokenised tail). Returns the state to use next."""
        self._members[i].feed(state, [f[1] for f in fed], rollback=[f[0] for f in fed])
        return state

    def _reuse(self, i: int, state: RowBatch, rows: list[_Row], fed: list[tuple[int, list[int]]]) -> list[tuple[int, list[int]]]:
        """kv_reuse: per row, revive member i's dead slots that already hold the start of its broadcast
        ``fed[b]`` (its own kept draft when it won, else the winner's tokens it scored), without a
        forward pass; returns what is left to feed. A broadcast that rolls back reuses nothing."""
        plans = []
        for row, (rollback, new) in zip(rows, fed):
            w = row.winner  # set by _settle for every row with a pending broadcast
            plans.append(reuse_plan(w.own if w.member == i else row.verified.get((i, w.member)), rollback, new))
        self._members[i].revive(state, [slots for slots, _ in plans])
        return [(rollback, left) for (rollback, _), (_, left) in zip(fed, plans)]

    def _new_row(self, p: DecodeParams) -> _Row:
        n = len(self._members)
        return _Row(
            params=p,
            tracks=[TokenTrack(m.codec) for m in self._members],
            gens=[None if p.greedy else make_generator((p.seed + i * _SEED_STRIDE) % 2**64, m.device)
                  for i, m in enumerate(self._members)],
            active=[True] * n,
            max_rounds=self.config.max_rounds or 2 * p.max_new_tokens,
            stops=StopChecker(p.stop, p.max_new_tokens),
            stats=[MemberStats(name=m.name, role="main" if i == 0 else "member", weight=self.weights[i],
                               proposed=0, accepted=0, rounds_active=0) for i, m in enumerate(self._members)],
            quality=[0.0] * n,
            score_sum=[0.0] * n,
            outcomes=[[] for _ in range(n)],
        )

    def _propose(self, i: int, state: RowBatch, rows: list[_Row]) -> list[_Candidate]:
        """Draft one candidate per state row from member i's cache, then rewind the draft."""
        m, L = self._members[i], self.config.segment_tokens
        remaining = [max(1, r.params.max_new_tokens - len(r.tracks[0].ids)) for r in rows]
        caps = [min(L, rem) for rem in remaining]
        prefix_logits = state.logits  # (B, V): feed() replaces the tensor, this one stays as it is
        # steps[t][b]: logits after row b's first t draft tokens (kept only for kv_reuse's kept drafts)
        steps = [prefix_logits] if self.config.kv_reuse else None
        drafts: list[list[int]] = [[] for _ in rows]
        logps: list[list[torch.Tensor]] = [[] for _ in rows]
        eos = [False] * len(rows)
        going = list(range(len(rows)))
        while going:
            logits = state.logits.index_select(0, torch.tensor(going, device=m.device))  # (G, V)
            picks = choose_batch(logits, [rows[b].params for b in going], [rows[b].gens[i] for b in going])
            lp = torch.log_softmax(logits.float(), dim=-1).gather(
                1, torch.tensor(picks, device=m.device)[:, None]).squeeze(1)  # (G,)
            feed: list[list[int]] = [[] for _ in rows]
            for k, b in enumerate(going):
                drafts[b].append(picks[k])
                logps[b].append(lp[k])
                if picks[k] in m.eos_ids:
                    eos[b] = True
                elif len(drafts[b]) < caps[b]:
                    feed[b] = [picks[k]]
            going = [b for b in going if feed[b]]
            if going:
                m.feed(state, feed)
                if steps is not None:
                    steps.append(state.logits)
        cols = m.rewind(state, [len(d) - 1 for d in drafts], prefix_logits)
        out = []
        for b, row in enumerate(rows):
            ids = drafts[b][:-1] if eos[b] else drafts[b]
            pieces = [m.codec.token_bytes(t) for t in ids]
            k = trim_to_word(pieces, ended=eos[b] or len(drafts[b]) >= remaining[b])
            kept = logps[b][:k] + (logps[b][-1:] if eos[b] else [])
            row.stats[i].tokens_out += len(drafts[b])
            fed = min(k, len(drafts[b]) - 1)  # kept tokens that were fed (a draft's last token never is)
            own = (Slots(cols[b][:fed], tuple(ids[:fed]), int(state.next_pos[b]), state.layout, steps[fed][b].clone())
                   if self.config.kv_reuse and fed > 0 else None)
            out.append(_Candidate(i, ids[:k], b"".join(pieces[:k]), eos[b],
                                  segment_score(torch.stack(kept)), row.tracks[i].data, own))
        return out

    def _tokens_for(self, j: int, row: _Row, cand: _Candidate) -> list[int]:
        """Candidate ``cand`` in member j's tokenisation, after j's accepted prefix."""
        m, track = self._members[j], row.tracks[j]
        if m.vocab_fingerprint == self._members[cand.member].vocab_fingerprint and track.data == cand.base:
            toks = list(cand.ids)
        else:
            new = valid_utf8(cand.base + cand.data)
            extra = new[len(track.data):] if new.startswith(track.data) else valid_utf8(cand.data)
            text = complete_utf8_prefix(extra).decode("utf-8", errors="replace")
            toks = m.encode_text(text) if text else []
        if cand.eos and m.eos_ids:
            eos = m.tokenizer.eos_token_id
            toks.append(eos if eos in m.eos_ids else min(m.eos_ids))
        return toks

    def _verify(self, j: int, state: RowBatch, rows: list[_Row], cands: list[dict[int, _Candidate]],
                verdicts: list[dict[tuple[int, int], float]]) -> None:
        """Member j scores every other active candidate of all its rows in one batched forward."""
        others = [[c for c in sorted(cs) if c != j] for cs in cands]
        conts = [[self._tokens_for(j, row, cs[c]) for c in oth] for row, cs, oth in zip(rows, cands, others)]
        if not any(conts):
            return
        if self.config.kv_reuse:
            logps, slots = self._members[j].score_shared(state, conts, max_batch_tokens=self.max_batch_tokens)
            for row, oth, ss in zip(rows, others, slots):
                row.verified.update({(j, c): s for c, s in zip(oth, ss) if s is not None})
        else:
            logps = self._score(j, state, conts)
        for b, oth in enumerate(others):
            if oth:
                rows[b].stats[j].calls += 1
            for c, lp in zip(oth, logps[b]):
                verdicts[b][(j, c)] = segment_score(lp)

    def _score(self, j: int, state: RowBatch, conts: list[list[list[int]]]) -> list[list[torch.Tensor]]:
        """Member j's per-token log-probs of ``conts[b][c]`` after row b's cached prefix (one forward)."""
        return self._members[j].score(state, conts, max_batch_tokens=self.max_batch_tokens)

    def _settle(self, row: _Row, cands: dict[int, _Candidate], verdicts: dict[tuple[int, int], float]) -> None:
        """Rank one row's candidates, update statistics and exits, extend the response, decide the stop."""
        cfg, act = self.config, sorted(cands)
        matrix = [[cands[c].self_score if j == c else verdicts[(j, c)] for c in act] for j in act]
        final, w = rank(matrix, [self.weights[j] for j in act], cfg.self_score)
        winner = cands[act[w]]
        for i, outcome in zip(act, round_outcomes(final, w)):
            row.outcomes[i].append(outcome)
        row.rounds += 1
        for k, i in enumerate(act):
            st = row.stats[i]
            st.calls += 1  # the propose call; the verify call was counted in _verify
            st.rounds_active += 1
            st.proposed += 1
            row.score_sum[i] += final[k]
            row.quality[i] += final[k]
            st.mean_score = row.score_sum[i] / st.proposed
        row.stats[winner.member].accepted += 1
        if cfg.exit and row.rounds >= max(1, cfg.exit_min_rounds):
            for i, out in zip(act, self._exits(row, act)):
                if out and i != winner.member:  # the round's winner never exits
                    row.active[i] = False
                    row.stats[i].exit_round = row.rounds
                    log.debug("member %s exits after round %d", self._members[i].name, row.rounds)
        row.response = winner.base + winner.data
        row.winner = winner
        main = self._extend(0, row, winner)
        self._finish_check(row, winner)
        if row.finish is None:
            for i in range(len(self._members)):
                if row.active[i]:
                    row.pending[i] = main if i == 0 else self._extend(i, row, winner)

    def _exits(self, row: _Row, act: list[int]) -> list[bool]:
        """Which of the row's active members ``act`` the configured exit rule removes now."""
        cfg = self.config
        if cfg.exit_rule == "softmax":
            if cfg.exit_delta == 0:
                return [False] * len(act)
            return exit_mask([row.quality[i] for i in act], cfg.exit_delta, cfg.exit_min_temperature)
        masks = {"rank": rank_exit_mask, "lead": lead_exit_mask}  # the window rules (looked up per call)
        mask = masks.get(cfg.exit_rule)
        if mask is None:
            raise ValueError(f"exit_rule {cfg.exit_rule!r} has no exit mask (known: 'softmax', "
                             f"{', '.join(map(repr, masks))})")
        return mask([row.outcomes[i] for i in act], cfg.exit_window, cfg.exit_level)

    def _extend(self, i: int, row: _Row, winner: _Candidate) -> tuple[int, list[int]]:
        """Bring member i's token track to the new response; return (rollback, new ids) to feed."""
        track = row.tracks[i]
        same = self._members[i].vocab_fingerprint == self._members[winner.member].vocab_fingerprint
        if i == winner.member or (same and track.data == winner.base):
            track.push_tokens(winner.ids)
            return 0, list(winner.ids)
        return track.sync(valid_utf8(row.response))

    def _finish_check(self, row: _Row, winner: _Candidate) -> None:
        p, main = row.params, row.tracks[0]
        data, count = row.response, len(main.ids)
        if count > p.max_new_tokens:  # a long winner from another vocabulary: cut to the budget
            codec = self._members[0].codec
            data, count = b"".join(codec.token_bytes(t) for t in main.ids[: p.max_new_tokens]), p.max_new_tokens
        stop = row.stops.segment(data, count, eos=winner.eos and data is row.response)
        if stop is not None:
            row.finish = stop.reason
        elif row.rounds >= row.max_rounds:
            row.finish = FinishReason.LENGTH
        if row.finish is not None:  # decode once, when the row is done
            text = data.decode("utf-8", errors="replace")
            row.text = text if stop is None or stop.cut is None else text[: stop.cut]
        row.token_count = count

    def _compact(self, i: int, state: RowBatch, where: list[int], rows: list[_Row]) -> tuple[RowBatch | None, list[int]]:
        """Drop member i's rows that finished or that it exited, saving their counters."""
        keep = [b for b, r in enumerate(where) if rows[r].finish is None and rows[r].active[i]]
        for b, r in enumerate(where):
            rows[r].stats[i].tokens_in = state.tokens_in[b]
        if len(keep) == len(where):
            return state, where
        if not keep:
            return None, []
        return self._members[i].select(state, keep), [where[b] for b in keep]

    # ---- label -----------------------------------------------------------------------------------
    def label(self, prompts: Sequence[str], choices: Sequence[Sequence[str]],
              systems: Sequence[str | None] | None = None, params: LabelParams | None = None) -> list[LabelOutput]:
        """One verification round over the choices: every member's posterior from the one scorer
        (``ensemble/scoring.py``), pooled with the weights (``config.label_pool``); the gate may keep
        the first member's (see the module docstring)."""
        params = params or LabelParams()
        params.check_priors(choices, len(self._members))
        params.check_member_temperatures(len(self._members), "specfuse")
        scored = [score_choices(m, prompts, choices, systems, params, max_batch_tokens=self.max_batch_tokens)
                  for m in self._members]  # [member][row]
        results = []
        for b, cs in enumerate(choices):
            stats = [MemberStats(name=m.name, role="main" if i == 0 else "member", weight=self.weights[i], calls=1,
                                 tokens_in=scored[i][b].tokens_in, rounds_active=1,
                                 **choice_stats(scored[i][b].scores, params, i)) for i, m in enumerate(self._members)]
            posts = [label_posterior(scored[i][b].scores, params, params.prior(cs, i), i) for i in range(len(stats))]
            probs, gated = gated_pool(posts, self.weights, self.config.label_pool, params.gate)
            results.append(label_output(cs, probs, stats, gated=gated))
        return results
