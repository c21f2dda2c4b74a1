"""DeePEn: token-level fusion of heterogeneous members in a relative space (Huang et al., NeurIPS 2024).

generate: every step, one batched forward per member gives next-token logits ``(B, V_i)``;
:class:`~ensemble.relative.RelativeEnsemble` maps them to the anchor space, aggregates them with the
member weights and searches the main member's logits (AdamW, 5 steps, lr 0.15 by default); the token
is the argmax (greedy) or a per-row seeded sample of ``softmax(z / temperature)`` with top-k/top-p, and
always comes from the main vocabulary. A row stops on the main member's EOS (``eos_policy='any'``: also
when any member's own top token is its EOS), a stop string, or its own ``max_new_tokens``; finished
rows leave the batch. Broadcast: the token's bytes extend the row's response; the main member and
members with the same vocabulary fingerprint take the token id as is; every other member re-tokenises
only the unstable tail (:class:`~ensemble.text.TokenTrack`) and feeds what changed, rolling its KV
cache back over the rest (incomplete UTF-8 is held back until it completes).

Gate (``fuse_below``, ``gate_on``; ``ensemble.fusers.gate``): a step is fused only for the rows where
the main member's own confidence is below ``fuse_below``; a confident row takes the main member's
token (greedy: its argmax; sampled: a draw from its own distribution with the row's temperature,
top-k/top-p and generator, as Single draws) and stops only on the main member's EOS, whatever the
``eos_policy``. Only the main member is fed every step; the others catch up lazily, every row's whole
backlog in one batched forward at the next step that fuses some row (none at the end: their
``tokens_out`` is a re-tokenisation of the response). ``fuse_below=1`` (the default) is DeePEn as published, token for
token; ``0`` is the main member alone (docs/algorithms.md).

label (the paper's): each choice is teacher-forced in the main member's tokenisation of the one scorer
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

generate and label take the prompts in consecutive groups within ``max_batch_tokens``
(``ensemble.config``; per row: the longest prompt over the members plus ``max_new_tokens``, or plus
each member's prompt plus its longest choice once per choice, as label holds one state row per choice;
``ensemble.batching.pack``).

Per-member statistics per row: calls, tokens in (prompt and re-tokenisation included), tokens out (the
member's tokenisation of the final response), agreement (fraction of fused steps where the member's own
top token and the fused token are, in bytes, one a prefix of the other; for an EOS step: the member's
top is its own EOS), mean ``KL(q_i || q)`` over the fused steps (both None when no step was fused), in
generate ``fused_share`` (the row's fused steps over all its steps, the same on every member); in label
mode also the member's own scores of the choices (``choice_probs`` and the rest,
``ensemble.scoring.choice_stats``), and no agreement or KL on a gated row.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ensemble.config import (DecodeParams, DeePEnConfig, EosPolicy, check_batch_tokens,
                             normalise_weights, per_row)
from ensemble.fusers.base import (ConfiguredFuser, FusedOutput, LabelOutput, MemberStats, check_choices, encode_prompts, fit_prompts,
                                  in_groups, label_output)
from ensemble.fusers.gate import catch_up, confident_rows
from ensemble.fusers.stopping import StopChecker, cut_at_stop
from ensemble.labeling import ChoiceScores, LabelParams, gate, label_posterior
from ensemble.members import Member, RowBatch
from ensemble.reference import next_logits_uncached
from ensemble.relative import FuseResult, RelativeEnsemble, RowSource, find_anchors
from ensemble.sampling import choose, choose_batch, make_generator
from ensemble.scoring import choice_ids, choice_stats, neutral_sums, score_prefilled
from ensemble.text import TokenTrack
from ensemble.utf8 import complete_utf8_prefix, valid_utf8


class _Rows:
    """Per original row: response bytes, each member's track, output ids and statistics sums."""

    def __init__(self, fuser: "DeePEn", n: int):
        k = len(fuser.members)
        self.tracks = [[TokenTrack(m.codec, fuser.config.tail_window) for _ in range(n)] for m in fuser.members]
        self.resp = [b""] * n
        self.out: list[list[int]] = [[] for _ in range(n)]
        self.agree = [[0] * n for _ in range(k)]
        self.kl = [[0.0] * n for _ in range(k)]
        self.steps = [0] * n


class DeePEn(ConfiguredFuser):
    """DeePEn over heterogeneous members behind the fuser interface (see module docstring).

    ``DeePEn(members, main=, weights=, lr=, steps=, topk=, top_mass=, ..., max_batch_tokens=)``: the
    keywords are :class:`~ensemble.config.DeePEnConfig`'s fields; ``DeePEn.from_config(members, config)``."""

    name = "deepen"
    config_class = DeePEnConfig
    fit_prompts = fit_prompts  # ensemble.fusers.base.fit_prompts as a method

    def _setup(self, members: list[Member], cfg: DeePEnConfig, max_batch_tokens: int) -> None:
        self.max_batch_tokens = check_batch_tokens(max_batch_tokens)
        if not members:
            raise ValueError("DeePEn needs at least one member")
        if cfg.main >= len(members):
            raise ValueError(f"main must be in [0, {len(members)}), got {cfg.main}")
        self._members, self.config = members, cfg
        self.weights = normalise_weights(cfg.weights, len(members))
        self.main = members[cfg.main]
        self.anchor_strings, anchor_ids = find_anchors(
            [m.tokenizer for m in members], [m.name for m in members],
            min_anchors=cfg.min_anchors, subset=cfg.anchor_subset)
        shared: dict[tuple, RowSource] = {}  # one source per distinct (embedding, vocabulary)
        sources = []
        for m, ids in zip(members, anchor_ids):
            key = (m.input_embeddings().data_ptr(), m.vocab_fingerprint)
            if key not in shared:
                shared[key] = RowSource(m.input_embeddings(), ids, tau=cfg.tau,
                                         cache_rows=cfg.row_cache_size, store=cfg.row_store)
            sources.append(shared[key])
        self.engine = RelativeEnsemble(sources, self.weights, cfg.main, topk=cfg.topk, top_mass=cfg.top_mass,
                                       main_top_mass=cfg.main_top_mass, refine_margin=cfg.refine_margin,
                                       search=cfg.search_params(), dense=cfg.dense)
        self.same_ids = [m.vocab_fingerprint == self.main.vocab_fingerprint for m in members]

    @property
    def members(self) -> list[Member]:
        return self._members

    # ---- one step, shared by generate / label / the uncached oracle --------------------------------
    def _pick(self, res: FuseResult, params: list[DecodeParams], gens: list) -> list[int]:
        picks = res.greedy().tolist()
        if all(p.greedy for p in params):
            return picks
        z = res.token_logits()  # (B, k)
        for j, p in enumerate(params):
            if not p.greedy:
                picks[j] = int(res.cand[j, choose(z[j], p, gens[j])])
        return picks

    def _is_stop_token(self, tok: int, tops: list[list[int]], j: int) -> bool:
        if tok in self.main.eos_ids:
            return True
        return self.config.eos_policy is EosPolicy.ANY and any(
            tops[i][j] in m.eos_ids for i, m in enumerate(self.members) if i != self.config.main)

    def _agrees(self, i: int, top: int, tok: int) -> bool:
        m = self.members[i]
        if tok in self.main.eos_ids:
            return top in m.eos_ids
        a, f = m.codec.token_bytes(top), self.main.codec.token_bytes(tok)
        return bool(a) and bool(f) and (f.startswith(a) or a.startswith(f))

    def _record(self, st: _Rows, res: FuseResult, live: list[int], picks: list[int], states: list[RowBatch]):
        return self._record_logits(st, res, live, picks, [s.logits for s in states])

    def _record_logits(self, st: _Rows, res: FuseResult, live: list[int], picks: list[int],
                       logits: list[torch.Tensor]) -> list[list[int]]:
        """Agreement and KL sums of the fused rows ``live`` (``logits[i]`` ``(B, V_i)``, in their
        order); returns each member's top token per row."""
        tops = [lg.argmax(dim=-1).tolist() for lg in logits]
        kls = [k.tolist() for k in res.member_kl()]
        for j, r in enumerate(live):
            st.steps[r] += 1
            for i in range(len(self.members)):
                st.agree[i][r] += self._agrees(i, tops[i][j], picks[j])
                st.kl[i][r] += kls[i][j]
        return tops

    def _broadcast(self, st: _Rows, r: int, tok: int, feeds: list[list], rbs: list[list]) -> None:
        st.resp[r] += self.main.codec.token_bytes(tok)
        for i in range(len(self.members)):
            tr = st.tracks[i][r]
            if self.same_ids[i]:
                tr.push_tokens([tok])
                feeds[i].append([tok])
                rbs[i].append(0)
            else:
                rb, new = tr.sync(valid_utf8(st.resp[r]))
                feeds[i].append(new)
                rbs[i].append(rb)

    def _advance(self, states, live, keep, feeds, rbs):
        """Drop finished rows from every member's state, then one batched feed per member."""
        if len(keep) < len(live):
            states = [m.select(s, keep) for m, s in zip(self.members, states)]
            live = [live[j] for j in keep]
        for m, s, f, rb in zip(self.members, states, feeds, rbs):
            m.feed(s, f, rollback=rb)
        return states, live

    def _stats(self, st: _Rows, rs: list[int], counts: list[tuple[int, int]],
               tokens_out: list[int]) -> list[MemberStats]:
        """Statistics of original rows ``rs`` (one row, or all pairs of a labelled row)."""
        n = sum(st.steps[r] for r in rs)
        return [MemberStats(
            name=m.name, role="main" if i == self.config.main else "member", weight=self.weights[i],
            calls=counts[i][0], tokens_in=counts[i][1], tokens_out=tokens_out[i],
            agreement=sum(st.agree[i][r] for r in rs) / n if n else None,
            mean_kl=sum(st.kl[i][r] for r in rs) / n if n else None) for i, m in enumerate(self.members)]

    def _tokens_out(self, st: _Rows, r: int) -> list[int]:
        """Each member's token count for the whole response (the others re-tokenise its tail)."""
        out = []
        for i, tracks in enumerate(st.tracks):
            if self.same_ids[i]:
                out.append(len(st.out[r]))
            else:
                tracks[r].sync(valid_utf8(st.resp[r]))
                out.append(len(tracks[r].ids))
        return out

    # ---- generate ---------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], params: DecodeParams | Sequence[DecodeParams]) -> list[FusedOutput]:
        rows = per_row(params, len(prompts))
        encoded = encode_prompts(self.members, prompts, [p.system for p in rows])
        lengths = [max(len(e[r]) for e in encoded) + p.max_new_tokens for r, p in enumerate(rows)]
        return in_groups(lengths, self.max_batch_tokens,
                         lambda g: self._generate([[e[r] for r in g] for e in encoded], [rows[r] for r in g]))

    def _generate(self, encoded: list[list[list[int]]], rows: list[DecodeParams]) -> list[FusedOutput]:
        """One group: ``encoded[member][row]`` prompt ids, decoded together. Each step the gate
        (``ensemble.fusers.gate``) splits the rows: the confident ones take the main member's own token,
        the others catch every member up and are fused; then only the main member is fed."""
        cfg, main_i = self.config, self.config.main
        states = [m.start_ids(e) for m, e in zip(self.members, encoded)]
        gens = [None if p.greedy else make_generator(p.seed, self.main.device) for p in rows]
        st = _Rows(self, len(rows))
        steps = [0] * len(rows)  # every step of the row; st.steps counts its fused ones
        outputs: list[FusedOutput | None] = [None] * len(rows)
        live = list(range(len(rows)))
        checks = [StopChecker(p.stop, p.max_new_tokens, self.main.eos_ids, token_bytes=self.main.token_bytes)
                  for p in rows]
        while live:
            main_logits = states[main_i].logits  # (B, V_main)
            sure = confident_rows(main_logits, cfg.fuse_below, cfg.gate_on)
            picks = [-1] * len(live)
            confident = [j for j, ok in enumerate(sure) if ok]
            if confident:  # the main member's own choice, as Single's (greedy rows in one argmax)
                got = choose_batch(main_logits[confident], [rows[live[j]] for j in confident],
                                   [gens[live[j]] for j in confident])
                for j, tok in zip(confident, got):
                    picks[j] = tok
            eos = [p in self.main.eos_ids for p in picks]  # a confident step stops on the main member's EOS
            fuse = [j for j, ok in enumerate(sure) if not ok]
            if fuse:
                self._fuse_rows(st, states, live, fuse, rows, gens, picks, eos)
            feed: list[list[int]] = []
            keep: list[int] = []
            for j, (r, tok) in enumerate(zip(live, picks)):
                steps[r] += 1
                stop = checks[r].token(tok, eos=eos[j])
                if stop is None or not stop.eos:
                    st.out[r].append(tok)
                    st.resp[r] += self.main.codec.token_bytes(tok)
                if stop is None:
                    keep.append(j)
                    feed.append([tok])
                    continue
                counts = [(s.calls[j], s.tokens_in[j]) for s in states]
                stats = self._stats(st, [r], counts, self._tokens_out(st, r))
                for x in stats:
                    x.fused_share = st.steps[r] / steps[r]
                outputs[r] = FusedOutput(
                    text=cut_at_stop(self.main.decode(st.out[r]), rows[r].stop), token_count=len(st.out[r]),
                    finish_reason=stop.reason, member_stats=stats)
            if not keep:
                break
            if len(keep) < len(live):
                states = [m.select(s, keep) for m, s in zip(self.members, states)]
                live = [live[j] for j in keep]
            self.main.feed(states[main_i], feed, rollback=[0] * len(feed))
        return outputs  # type: ignore[return-value]

    def _fuse_rows(self, st: _Rows, states: list[RowBatch], live: list[int], fuse: list[int],
                   rows: list[DecodeParams], gens: list, picks: list[int], eos: list[bool]) -> None:
        """Fuse state rows ``fuse``, after catching the other members up (every live row, see
        ``ensemble.fusers.gate``): their tokens into ``picks`` and their stop decisions into ``eos``,
        in place; agreement and KL recorded."""
        catch_up(self.members, self.config.main, self.same_ids, st.tracks, st.out, st.resp, states, live)
        fl = [live[j] for j in fuse]
        if len(fuse) == len(live):
            logits = [s.logits for s in states]
        else:
            index = torch.tensor(fuse, device=self.main.device)
            logits = [s.logits.index_select(0, index.to(s.logits.device)) for s in states]
        res = self.engine.fuse(logits, greedy_rows=torch.tensor([rows[r].greedy for r in fl]))
        got = self._pick(res, [rows[r] for r in fl], [gens[r] for r in fl])
        tops = self._record_logits(st, res, fl, got, logits)
        for k, j in enumerate(fuse):
            picks[j], eos[j] = got[k], self._is_stop_token(got[k], tops, k)

    # ---- label ------------------------------------------------------------------------------------
    def label(self, prompts: Sequence[str], choices: Sequence[Sequence[str]],
              systems: Sequence[str | None] | None = None, params: LabelParams | None = None) -> list[LabelOutput]:
        params = params or LabelParams()
        check_choices(choices, len(prompts))
        params.check_priors(choices, len(self.members))
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
        st = _Rows(self, len(pairs))
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

    # ---- slow oracle ------------------------------------------------------------------------------
    def greedy_uncached(self, prompt: str, max_new_tokens: int, system: str | None = None, *,
                        cache_main: bool = False) -> list[int]:
        """Greedy DeePEn for one prompt, re-encoding every member's whole sequence each step (the
        reference code's structure). With ``cache_main`` the main member keeps a KV cache (as the
        reference's ``generate`` does) and only the other members are re-encoded. The gate
        (``fuse_below``) applies: at a confident step no other member is encoded."""
        ms, main_i = self.members, self.config.main
        prompt_ids = [m.encode_prompt(prompt, system) for m in ms]
        state = self.main.start_ids([prompt_ids[main_i]]) if cache_main else None
        out: list[int] = []
        resp = b""
        for _ in range(max_new_tokens):
            main_logits = state.logits if state is not None else next_logits_uncached(
                self.main, prompt_ids[main_i] + out)[None]
            if confident_rows(main_logits, self.config.fuse_below, self.config.gate_on)[0]:  # the gate
                tok = int(main_logits[0].argmax())
                stop = tok in self.main.eos_ids
            else:
                tok, stop = self._fuse_uncached(main_logits, prompt_ids, out, resp)
            if stop:
                break
            out.append(tok)
            resp += self.main.codec.token_bytes(tok)
            if state is not None:
                self.main.feed(state, [[tok]])
        return out

    def _fuse_uncached(self, main_logits: torch.Tensor, prompt_ids: list[list[int]], out: list[int],
                       resp: bytes) -> tuple[int, bool]:
        """The oracle's fused step: every other member re-encodes its whole sequence; returns the
        greedy token and whether it stops the row."""
        logits = []
        for i, m in enumerate(self.members):
            if i == self.config.main:
                logits.append(main_logits)
            elif self.same_ids[i]:
                logits.append(next_logits_uncached(m, prompt_ids[i] + out)[None])
            else:
                text = complete_utf8_prefix(valid_utf8(resp)).decode("utf-8")
                logits.append(next_logits_uncached(m, prompt_ids[i] + m.encode_text(text))[None])
        tok = int(self.engine.fuse(logits).greedy()[0])
        return tok, self._is_stop_token(tok, [[int(lg[0].argmax())] for lg in logits], 0)
