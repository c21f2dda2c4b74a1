"""Chat histories through lm-eval's string contexts, so that each member applies its own template.

lm-eval with ``--apply_chat_template`` asks the model to render the chat history
(``LM.apply_chat_template``) and then passes the rendered string back as the request's context. An
ensemble's members have different templates (and some none), so the ensemble-fuse model does not
render one: :func:`encode_chat` returns a marker followed by the history as JSON, and
:func:`decode_context` turns a context back into the prompt and system message that the fusers give
each member, which applies its own chat template, or none for a completion-style member
(``ensemble.members.Member.encode_prompt``). A context without the marker is raw text (lm-eval run
without ``--apply_chat_template``), scored and continued as text by every member (docs/lm_eval.md).

The fusers take one user turn and an optional system message per row, so a history must be an
optional system message followed by one user message (lm-eval's default collapses few-shot examples
into the user turn; ``--fewshot_as_multiturn`` and tasks with a ``gen_prefix``, which prefill the
assistant's turn, are refused with an error naming what was given).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

CHAT_MARKER = "\x1eensemble-fuse-chat\x1e"
"""Starts a context that holds a chat history as JSON (an ASCII record separator on each side: no
task's text starts with it)."""


@dataclass(frozen=True)
class Turn:
    """One request's context as the fusers take it."""

    prompt: str
    system: str | None = None
    chat: bool = False
    """The context came from lm-eval's chat path: chat members apply their templates; False: raw text."""


def _check(history: Any) -> tuple[str, str | None]:
    """(user content, system content or None) of a history of an optional system and one user message."""
    if not isinstance(history, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                and isinstance(m.get("content"), str) for m in history):
        raise ValueError(f"a chat history must be a list of {{'role', 'content'}} string messages, got {history!r}")
    roles = [m["role"] for m in history]
    if roles not in (["user"], ["system", "user"]):
        raise ValueError(f"the ensemble-fuse model takes a chat of one user message after an optional system "
                         f"message (each member applies its own template to it), got roles {roles}: run without "
                         f"--fewshot_as_multiturn and without a task gen_prefix")
    return history[-1]["content"], history[0]["content"] if roles[0] == "system" else None


def encode_chat(history: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The context string standing for ``history`` (see the module docstring)."""
    if not add_generation_prompt:
        raise ValueError("the ensemble-fuse model cannot continue a prefilled assistant turn "
                         "(add_generation_prompt=False, a task gen_prefix): each member renders its own template")
    history = [dict(m) for m in history]
    _check(history)
    return CHAT_MARKER + json.dumps(history, ensure_ascii=False)


def decode_context(context: str) -> Turn:
    """A request's context as a :class:`Turn`; an empty raw context is refused (nothing to score after)."""
    if not isinstance(context, str):
        raise ValueError(f"a request's context must be a string, got {context!r}")
    if not context.startswith(CHAT_MARKER):
        if not context:
            raise ValueError("an empty context (lm-eval's unconditional term, e.g. acc_mutual_info) is not "
                             "supported by the ensemble-fuse model: every continuation is scored after a prompt")
        return Turn(context)
    try:
        history = json.loads(context[len(CHAT_MARKER):])
    except json.JSONDecodeError as exc:
        raise ValueError(f"a chat context of the ensemble-fuse model is not valid JSON after its marker "
                         f"({exc.msg} at char {exc.pos}): was the context changed after apply_chat_template?") from None
    prompt, system = _check(history)
    return Turn(prompt, system, chat=True)


__all__ = ["CHAT_MARKER", "Turn", "decode_context", "encode_chat"]
