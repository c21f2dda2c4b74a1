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

label: ``ensemble/fusers/deepen_label.py`` (the paper's: each choice teacher-forced through the fused
distribution, the same scorer as every member's; a gate on the main member's posterior margin).

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
from ensemble.fusers.base import ConfiguredFuser, FusedOutput, MemberStats, encode_prompts, fit_prompts, in_groups
from ensemble.fusers.deepen_label import DeePEnLabeling
from ensemble.fusers.gate import catch_up, confident_rows
from ensemble.fusers.stopping import StopChecker, cut_at_stop
from ensemble.members import Member, RowBatch
from ensemble.reference import next_logits_uncached
from ensemble.relative import FuseResult, RelativeEnsemble, RowSource, find_anchors
from ensemble.sampling import choose, choose_batch, make_generator
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


class DeePEn(DeePEnLabeling, ConfiguredFuser):
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

    def _rows(self, n: int) -> _Rows:
        return _Rows(self, n)

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
