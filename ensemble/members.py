"""Member: one Hugging Face causal LM + its tokenizer, driven in batches with per-row KV state.

Contract:
- ``start(prompts, systems)`` encodes each prompt (chat template when the tokenizer has one, plain
  completion with the tokenizer's special tokens otherwise), runs one batched prefill over the
  left-padded prompts and returns a :class:`RowBatch` holding the KV cache and next-token logits.
- ``feed(state, new, rollback)`` discards the last ``rollback[b]`` live tokens of row ``b`` and appends
  ``new[b]``. Discarded cache slots are not removed: they are zeroed in the 2-D attention mask and the
  new tokens get explicit ``position_ids``, so each row of a batch may roll back a different amount
  (measured equal to a clean forward within 2e-5, see docs/algorithms.md).
- ``score(state, conts, max_batch_tokens=...)`` returns the per-token log-probabilities of candidate
  continuations of each row's live prefix, in batched forwards over copies of the cached prefixes (as
  many as ``max_batch_tokens`` asks, see below); ``state`` is unchanged.
- ``select(state, rows)`` keeps a subset of rows (to drop finished ones).
- ``rewind(state, counts, logits)`` drops the last ``counts[b]`` live tokens of row b without a forward
  pass, given the next-token logits the caller saved for the kept prefix (SpecFuse discards drafts);
  it returns each row's dropped cache columns, which stay in the cache as dead slots.
- ``score_shared(state, conts, ...)``, ``revive(state, rows)`` and ``compact(state)``: scoring in the
  state's own cache (no copies), making dead slots live again without a forward, and removing dead
  slots (``ensemble/kv.py``; SpecFuse's KV reuse and compaction, docs/algorithms.md).

Per-row counters on the state (``calls``, ``tokens_in``) feed the per-member statistics.

Memory (``ensemble.config.MAX_BATCH_TOKENS``): ``score`` packs its candidates with
``ensemble.batching.pack`` so that a forward covers at most ``max_batch_tokens`` token slots (candidates
times the cached prefix plus the longest candidate) and full-vocabulary logits are computed only at the
candidates' own positions (``logits_to_keep`` as a mask), for at most ``logit_rows(max_batch_tokens)``
positions per forward; a longer candidate is fed in slices. The fusers group their prompts the same way.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch
from jinja2.exceptions import TemplateError
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ensemble import kv
from ensemble.batching import logit_rows, pack
from ensemble.config import MAX_BATCH_TOKENS
from ensemble.text import Codec

log = logging.getLogger(__name__)


@dataclass
class RowBatch:
    """Decoding state of B rows for one member. Row order is the caller's."""

    cache: DynamicCache
    mask: torch.Tensor  # (B, S) long: 1 where the cache slot holds a live token
    next_pos: torch.Tensor  # (B,) long: position id of each row's next token
    logits: torch.Tensor  # (B, V) float: next-token logits after each row's last live token
    ids: list[list[int]]  # per row: live token ids, prompt then response
    n_prompt: list[int]  # per row: number of prompt tokens at the front of ids
    calls: list[int] = field(default_factory=list)  # per row: forward passes that included the row
    tokens_in: list[int] = field(default_factory=list)  # per row: tokens fed (prompt + re-feeds)
    layout: int = 0  # changes whenever cache columns move (compaction): kv.Slots check it

    @property
    def size(self) -> int:
        return len(self.ids)

    def response_ids(self, b: int) -> list[int]:
        return self.ids[b][self.n_prompt[b]:]


def _repeat_cache(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """A new cache whose row i is row ``index[i]`` of ``cache`` (the source is untouched)."""
    out = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        out.update(layer.keys.index_select(0, index), layer.values.index_select(0, index), layer_idx)
    return out


class Member:
    """One causal LM with its tokenizer. Stateless between calls: all state lives in RowBatch."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.eos_ids = self._eos_ids()
        self.pad_id = next(
            (t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0
        )
        self.context_window = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    # ---- tokenizer facts ---------------------------------------------------------------------
    def _eos_ids(self) -> frozenset[int]:
        """EOS ids from the tokenizer and the generation config, never from the model's name."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.model, "generation_config", None)
        gen_eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos is not None:
            ids.update(int(t) for t in gen_eos)
        return frozenset(ids)

    @property
    def vocab_fingerprint(self) -> str:
        """Hash of the id -> piece mapping: equal fingerprints mean token ids can be shared as is."""
        if not hasattr(self, "_fingerprint"):
            vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
            self._fingerprint = hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]
        return self._fingerprint

    @property
    def codec(self) -> Codec:
        """Bytes of each token and continuation encoding, for broadcast (see ensemble/text.py)."""
        if not hasattr(self, "_codec"):
            self._codec = Codec(self.tokenizer)
        return self._codec

    def token_bytes(self, tok: int) -> bytes:
        """The bytes token ``tok`` adds to the response text (b"" for special tokens)."""
        return self.codec.token_bytes(tok)

    def input_embeddings(self) -> torch.Tensor:
        """The input-embedding matrix ``(V, d)``."""
        return self.model.get_input_embeddings().weight

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a continuation text (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode_prompt(self, prompt: str, system: str | None = None) -> list[int]:
        """Prompt ids: chat template + generation prompt when the tokenizer has a template, plain
        completion with the tokenizer's own special tokens (e.g. BOS) otherwise."""
        if not self.has_chat_template:
            text = prompt if system is None else f"{system}\n\n{prompt}"
            return self.tokenizer.encode(text, add_special_tokens=True)
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError:
            if system is None:
                raise
            # this template has no system role: fold the system message into the user turn
            merged = [{"role": "user", "content": f"{system}\n\n{prompt}"}]
            text = self.tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)
        # the template writes its own BOS; do not add another
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ---- batched forward passes ----------------------------------------------------------------
    @torch.inference_mode()
    def start(self, prompts: list[str], systems: list[str | None] | None = None) -> RowBatch:
        """Prefill B prompts (left-padded) and return their state."""
        systems = systems or [None] * len(prompts)
        encoded = [self.encode_prompt(p, s) for p, s in zip(prompts, systems)]
        return self.start_ids(encoded)

    @torch.inference_mode()
    def start_ids(self, encoded: list[list[int]]) -> RowBatch:
        """Prefill B already-encoded prompts."""
        if any(len(e) == 0 for e in encoded):
            raise ValueError("every prompt must encode to at least one token")
        B = len(encoded)
        state = RowBatch(
            cache=DynamicCache(),
            mask=torch.zeros(B, 0, dtype=torch.long, device=self.device),
            next_pos=torch.zeros(B, dtype=torch.long, device=self.device),
            logits=torch.zeros(B, self.vocab_size, device=self.device),
            ids=[[] for _ in range(B)],
            n_prompt=[len(e) for e in encoded],
            calls=[0] * B,
            tokens_in=[0] * B,
        )
        self.feed(state, encoded)
        return state

    @torch.inference_mode()
    def feed(
        self,
        state: RowBatch,
        new: list[list[int]],
        rollback: list[int] | None = None,
        *,
        all_logits: bool = False,
    ) -> list[torch.Tensor] | None:
        """Roll back ``rollback[b]`` live tokens of row b, then append ``new[b]``, in one forward.

        Updates ``state.logits`` for rows that received tokens. With ``all_logits`` returns, per row,
        the logits after each fed token ``(n_b, V)``, computed at the fed positions only (no padding).
        """
        B = state.size
        if len(new) != B:
            raise ValueError(f"feed needs one token list per row ({B}), got {len(new)}")
        new = [list(t) for t in new]
        if rollback is not None:
            for b, r in enumerate(rollback):
                if r <= 0:
                    continue
                _check_drop(state, b, r, "roll back")
                if not new[b]:  # the logits after the kept prefix are not stored: re-feed its last token
                    r += 1
                    new[b] = [state.ids[b][-r]]
                _drop_live(state, b, r)
        lens = [len(t) for t in new]
        T = max(lens, default=0)
        if T == 0:
            return [torch.zeros(0, self.vocab_size, device=self.device) for _ in range(B)] if all_logits else None
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        chunk_mask = torch.zeros(B, T, dtype=torch.long)
        offsets = torch.zeros(B, T, dtype=torch.long)
        for b, toks in enumerate(new):
            n = len(toks)
            if n:  # left-pad inside the chunk so every row's last real token is at position T-1
                input_ids[b, T - n:] = torch.tensor(toks, dtype=torch.long)
                chunk_mask[b, T - n:] = 1
                offsets[b, T - n:] = torch.arange(n)
        input_ids, chunk_mask, offsets = (x.to(self.device) for x in (input_ids, chunk_mask, offsets))
        position_ids = (state.next_pos[:, None] + offsets) * chunk_mask  # (B, T)
        attention_mask = torch.cat([state.mask, chunk_mask], dim=1)  # (B, S+T)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=state.cache,
            use_cache=True,
            logits_to_keep=chunk_mask.bool() if all_logits else 1,  # a mask: the fed positions, row by row
        )
        state.mask = attention_mask
        lens_t = torch.tensor(lens, device=self.device)
        state.next_pos = state.next_pos + lens_t
        fed = lens_t > 0  # (B,)
        for b, toks in enumerate(new):
            if toks:
                state.ids[b].extend(toks)
                state.calls[b] += 1
                state.tokens_in[b] += len(toks)
        if not all_logits:
            state.logits = torch.where(fed[:, None], out.logits[:, -1].float(), state.logits)  # (B, V)
            return None
        fed_logits = list(out.logits.float().split(lens))  # (sum n_b, V) -> (n_b, V) per row
        state.logits = torch.stack([x[-1] if n else state.logits[b]
                                    for b, (x, n) in enumerate(zip(fed_logits, lens))])  # (B, V)
        return fed_logits

    @torch.inference_mode()
    def rewind(self, state: RowBatch, counts: list[int], logits: torch.Tensor) -> list[torch.Tensor]:
        """Drop the last ``counts[b]`` live tokens of row b without a forward pass (added for SpecFuse:
        a draft is discarded before verification without re-feeding the last kept token).

        ``logits (B, V)`` must hold the next-token logits after each row's kept prefix, saved by the
        caller before the dropped tokens were fed; rows with ``counts[b] == 0`` keep their logits.
        Returns, per row, the cache columns of the dropped tokens in order (dead slots now).
        """
        if len(counts) != state.size:
            raise ValueError(f"rewind needs one count per row ({state.size}), got {len(counts)}")
        cols = []
        for b, r in enumerate(counts):
            if r <= 0:
                cols.append(torch.zeros(0, dtype=torch.long, device=self.device))
                continue
            _check_drop(state, b, r, "rewind")
            cols.append(_drop_live(state, b, r))
        dropped = torch.tensor([r > 0 for r in counts], device=self.device)  # (B,)
        state.logits = torch.where(dropped[:, None], logits.to(state.logits.dtype), state.logits)  # (B, V)
        return cols

    @torch.inference_mode()
    def revive(self, state: RowBatch, rows: list[kv.Slots | None]) -> None:
        """Make the dead slots ``rows[b]`` of row b live again (no forward pass): the row's tokens,
        next position and logits become those after the slots' tokens (``ensemble.kv.revive``)."""
        if len(rows) != state.size:
            raise ValueError(f"revive needs one entry per row ({state.size}), got {len(rows)}")
        for b, slots in enumerate(rows):
            if slots is not None:
                kv.revive(state, b, slots)

    @torch.inference_mode()
    def compact(self, state: RowBatch) -> int:
        """Remove dead cache slots (``ensemble.kv.compact``); returns how many columns went."""
        return kv.compact(state)

    @torch.inference_mode()
    def score_shared(self, state: RowBatch, conts: list[list[list[int]]], *,
                     max_batch_tokens: int = MAX_BATCH_TOKENS) -> tuple[list[list[torch.Tensor]], list[list[kv.Slots | None]]]:
        """As :meth:`score`, but in the state's own cache: the candidates are appended as dead slots
        in one forward (as many as ``logit_rows(max_batch_tokens)`` logit rows ask), and ``slots[b][c]``
        lets :meth:`revive` make candidate c of row b live later (``ensemble.kv.score_shared``)."""
        if len(conts) != state.size:
            raise ValueError(f"score_shared needs one candidate list per row ({state.size}), got {len(conts)}")
        return kv.score_shared(self, state, conts, logit_rows(max_batch_tokens))

    def select(self, state: RowBatch, rows: list[int]) -> RowBatch:
        """A state holding only ``rows`` (in that order); the cache tensors are gathered."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        return RowBatch(
            cache=_repeat_cache(state.cache, index),
            mask=state.mask.index_select(0, index),
            next_pos=state.next_pos.index_select(0, index),
            logits=state.logits.index_select(0, index),
            ids=[list(state.ids[r]) for r in rows],
            n_prompt=[state.n_prompt[r] for r in rows],
            calls=[state.calls[r] for r in rows],
            tokens_in=[state.tokens_in[r] for r in rows],
            layout=state.layout,  # the rows' columns do not move
        )

    @torch.inference_mode()
    def score(self, state: RowBatch, conts: list[list[list[int]]], *,
              max_batch_tokens: int = MAX_BATCH_TOKENS) -> list[list[torch.Tensor]]:
        """Per-token log-probs of candidate continuations: ``conts[b][c]`` is a token list scored
        after row b's live prefix. Returns ``out[b][c]`` of shape ``(len(conts[b][c]),)``.

        The candidates go through batched forwards over gathered copies of the cached prefixes, packed
        by ``ensemble.batching.pack`` within ``max_batch_tokens`` (one forward when they fit); logits are
        computed at the candidates' positions only and reduced to the forced tokens' log-probs forward
        by forward. ``state`` itself is not modified, except that each row with candidates counts one
        call (however many forwards the bound splits it into) and its fed tokens.
        """
        pairs = [(b, c) for b in range(state.size) for c in range(len(conts[b]))]
        result: list[list[torch.Tensor]] = [[None] * len(conts[b]) for b in range(state.size)]  # type: ignore[list-item]
        if not pairs:
            return result
        for b in sorted({b for b, _ in pairs}):  # the first token of each candidate: the row's saved logits
            first = torch.log_softmax(state.logits[b].float(), dim=-1)  # (V,)
            for c, toks in enumerate(conts[b]):
                result[b][c] = first.gather(0, torch.tensor(toks[:1], dtype=torch.long, device=self.device))
        rest = [(b, c) for b, c in pairs if len(conts[b][c]) > 1]
        width = state.mask.shape[1]
        fed = [len(conts[b][c]) - 1 for b, c in rest]
        for group in pack([width + n for n in fed], max_batch_tokens, logits=fed):
            chosen = [rest[i] for i in group]
            for (b, c), lp in zip(chosen, self._forced(state, chosen, conts, logit_rows(max_batch_tokens))):
                result[b][c] = torch.cat([result[b][c], lp])
        for b in {b for b, _ in pairs}:
            state.calls[b] += 1
            state.tokens_in[b] += sum(max(len(t) - 1, 0) for t in conts[b])
        return result

    def _forced(self, state: RowBatch, chosen: list[tuple[int, int]], conts: list[list[list[int]]],
                cap: int) -> list[torch.Tensor]:
        """Log-probs of tokens 1.. of each chosen candidate, teacher-forced on a copy of its row: one
        forward, or slices of ``cap`` positions for a lone candidate longer than ``cap``."""
        copy = self.select(state, [b for b, _ in chosen])
        toks = [conts[b][c] for b, c in chosen]
        longest = max(len(t) - 1 for t in toks)
        step = longest if len(chosen) > 1 else cap  # pack() keeps a group of several within cap
        out: list[list[torch.Tensor]] = [[] for _ in chosen]
        for at in range(0, longest, step):
            logits = self.feed(copy, [t[at:min(at + step, len(t) - 1)] for t in toks], all_logits=True)
            assert logits is not None
            for k, (t, lg) in enumerate(zip(toks, logits)):
                if len(lg):
                    want = torch.tensor(t[at + 1:at + 1 + len(lg)], device=self.device)  # (n,)
                    out[k].append(torch.log_softmax(lg, dim=-1).gather(1, want[:, None]).squeeze(1))
            del logits
        return [torch.cat(o) for o in out]


def _check_drop(state: RowBatch, b: int, r: int, verb: str) -> None:
    """Only response tokens may be dropped from row ``b``."""
    n_resp = len(state.ids[b]) - state.n_prompt[b]
    if r > n_resp:
        raise ValueError(f"row {b}: cannot {verb} {r} tokens, only {n_resp} response tokens")


def _drop_live(state: RowBatch, b: int, r: int) -> torch.Tensor:
    """Forget row ``b``'s last ``r`` live tokens: their KV slots are masked out (the cache keeps them
    as dead entries) and the next position moves back. Returns their columns ``(r,)``."""
    live = torch.nonzero(state.mask[b]).squeeze(-1)  # (live,)
    state.mask[b, live[-r:]] = 0
    state.next_pos[b] -= r
    del state.ids[b][-r:]
    return live[-r:]
