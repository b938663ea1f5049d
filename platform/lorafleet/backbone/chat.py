"""Chat rendering: the one place that turns messages into a backbone's prompt and knows where its turns end.

Training (``training.dataset.encode_example``) and serving (``serving.engine``) both render here, so what trains
is what serves. Messages are ``(role, content)`` pairs (or ``{"role", "content"}`` mappings), roles ``system``,
``user`` and ``assistant``.

- **A backbone with a chat template** (SmolLM2's ChatML): ``tokenizer.apply_chat_template(tokenize=False)``. The
  rendered text already holds the template's special tokens (``<|im_start|>`` ...), so ``encode_messages``
  tokenizes it without adding any: the ids equal ``apply_chat_template(tokenize=True)``, with no second BOS.
- **A backbone without one** (the built-in tiny backbone): the plain format. A conversation that is a single user
  turn renders as its content unchanged, so a plain prompt keeps its exact tokens; anything else renders as
  ``"<role>: <content>\\n"`` per message followed by ``"assistant:"``, and generation then also stops at
  ``"\\nuser:"`` (``chat_stop_strings``). The text is tokenized as the tokenizer does a plain prompt.

End of turn: generation stops at any of ``end_of_turn_ids`` (the eos ids of the generation config and the
tokenizer, plus the template's end-of-turn token when it is one special token, e.g. ``<|im_end|>``), and
training appends ``end_of_turn_id`` to every target, so an adapter learns to end its answers where serving
stops. Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lorafleet.errors import ValidationError

#: the roles a conversation may hold (OpenAI's ``developer`` is taken as ``system`` by the API and feedback)
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
#: the plain format's extra stop string: the model starting the user's next turn
PLAIN_STOP = "\nuser:"
#: content of the assistant turn rendered to find where a template ends a turn
_PROBE = "lorafleet-end-of-turn-probe"

Message = tuple[str, str] | Mapping[str, Any]


def as_pairs(messages: Sequence[Message]) -> tuple[tuple[str, str], ...]:
    """Messages as ``(role, content)`` pairs (validated by their callers); an empty conversation is refused."""
    pairs = tuple(
        (str(m["role"]), str(m["content"])) if isinstance(m, Mapping) else (str(m[0]), str(m[1]))
        for m in messages
    )
    if not pairs:
        raise ValidationError("messages: a conversation needs at least one message")
    return pairs


def general_side_on(setting: bool | None, tokenizer: Any) -> bool:
    """Whether gates give the base model a side (``Settings.gate_general_prompts``): as set, or when unset on a
    backbone with a chat template (a pretrained chat model, whose pooled embeddings tell a user's questions from
    general ones), off without one (``builtin:tiny``, random weights: its embeddings tell nothing)."""
    return has_chat_template(tokenizer) if setting is None else bool(setting)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer brings its own chat template (else the plain format applies)."""
    return bool(getattr(tokenizer, "chat_template", None))


def is_single_user_turn(messages: Sequence[Message]) -> bool:
    """A conversation of exactly one user message (the plain format renders it as its content unchanged)."""
    pairs = as_pairs(messages)
    return len(pairs) == 1 and pairs[0][0] == "user"


def render_messages(
    tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = True
) -> str:
    """The prompt text of a conversation: the tokenizer's chat template, else the plain format (module doc)."""
    pairs = as_pairs(messages)
    if has_chat_template(tokenizer):
        conversation = [{"role": role, "content": content} for role, content in pairs]
        try:
            text = tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # a template may refuse a conversation (e.g. roles that do not alternate)
            raise ValidationError(f"messages: the backbone's chat template refused them: {exc}") from exc
        return str(text)
    if is_single_user_turn(pairs):
        return pairs[0][1]
    lines = "".join(f"{role}: {content}\n" for role, content in pairs)
    return lines + "assistant:" if add_generation_prompt else lines


def encode_messages(
    tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of the rendered conversation; a template's text is not given special tokens a second time."""
    text = render_messages(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    if has_chat_template(tokenizer):
        return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return [int(t) for t in tokenizer(text)["input_ids"]]


def chat_stop_strings(tokenizer: Any, messages: Sequence[Message]) -> tuple[str, ...]:
    """Stop strings the rendering adds: ``PLAIN_STOP`` when the plain format wrote role lines, else none."""
    if has_chat_template(tokenizer) or is_single_user_turn(messages):
        return ()
    return (PLAIN_STOP,)


def last_user_content(messages: Sequence[Message]) -> str:
    """The content of the last user turn (the last message's when there is none): what gates and routing keys
    embed, so a template's shared system prompt does not make every request look alike."""
    pairs = as_pairs(messages)
    return next((content for role, content in reversed(pairs) if role == "user"), pairs[-1][1])


def template_end_of_turn_id(tokenizer: Any) -> int | None:
    """The token a chat template writes right after an assistant's content, when it is one special token
    (``<|im_end|>`` in ChatML); None without a template, or when the template ends turns otherwise."""
    if not has_chat_template(tokenizer):
        return None
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = str(tokenizer.apply_chat_template(conversation, tokenize=False))
    except Exception:  # a template that refuses this minimal conversation names no end-of-turn token
        return None
    at = text.rfind(_PROBE)
    suffix = text[at + len(_PROBE) :] if at >= 0 else ""
    ids = list(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else []
    if not ids or int(ids[0]) not in set(tokenizer.all_special_ids):
        return None
    token = tokenizer.convert_ids_to_tokens(int(ids[0]))
    return int(ids[0]) if isinstance(token, str) and suffix.startswith(token) else None


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The id training appends to a target: the template's end-of-turn token, else the tokenizer's eos."""
    found = template_end_of_turn_id(tokenizer)
    if found is not None:
        return found
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if isinstance(eos, int) else None


def end_of_turn_ids(model_or_generation_config: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends generation: eos ids of the generation config (a model's, or the config itself; an int
    or a list) and of the tokenizer, plus the template's end-of-turn token."""
    config = getattr(model_or_generation_config, "generation_config", model_or_generation_config)
    found: set[int] = set()
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list | tuple):
            found.update(int(v) for v in value)
    template_id = template_end_of_turn_id(tokenizer)
    if template_id is not None:
        found.add(template_id)
    return frozenset(found)


__all__ = [
    "CHAT_ROLES",
    "PLAIN_STOP",
    "Message",
    "as_pairs",
    "chat_stop_strings",
    "encode_messages",
    "end_of_turn_id",
    "end_of_turn_ids",
    "has_chat_template",
    "is_single_user_turn",
    "last_user_content",
    "render_messages",
    "template_end_of_turn_id",
]
