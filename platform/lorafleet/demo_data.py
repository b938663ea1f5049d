"""The demo's shared task: replying to customer-support messages in one house style (no torch import).

A support team wants every reply to apologise, restate the problem and promise a follow-up within a day, in the
same words each time: "We're sorry to hear that your parcel arrived damaged. A support agent will contact you
within 24 hours." The base model answers such messages in its own, varying way. Records pair a customer's
message (several phrasings of many problems) with the house reply; held-out problems show whether the task
adapter learnt the style rather than the examples.
"""

from __future__ import annotations

import random

from lorafleet.training.dataset import Example

TASK = "support-reply"
#: (the problem as the customer says it, the problem as the reply restates it)
PROBLEMS: tuple[tuple[str, str], ...] = (
    ("my parcel arrived damaged", "your parcel arrived damaged"),
    ("I was charged twice for one order", "you were charged twice for one order"),
    ("I can't reset my password", "you can't reset your password"),
    ("my order never arrived", "your order never arrived"),
    ("the app crashes when I open it", "the app crashes when you open it"),
    ("I received the wrong size", "you received the wrong size"),
    ("my refund hasn't come through", "your refund hasn't come through"),
    ("the tracking link doesn't work", "the tracking link doesn't work"),
    ("my discount code was rejected", "your discount code was rejected"),
    ("the item is missing a part", "the item is missing a part"),
    ("I can't log in to my account", "you can't log in to your account"),
    ("my subscription renewed without warning", "your subscription renewed without warning"),
    ("the delivery driver left my parcel in the rain", "the delivery driver left your parcel in the rain"),
    ("my invoice shows the wrong address", "your invoice shows the wrong address"),
    ("the headphones I bought stopped working", "the headphones you bought stopped working"),
    ("I was sent someone else's order", "you were sent someone else's order"),
)
OPENERS: tuple[str, ...] = ("Hi, ", "Hello, ", "", "Help! ", "Hey, ", "Good morning, ")
CLOSERS: tuple[str, ...] = (".", "!", ". What can you do?", ". Please help.", ". This is frustrating.")
#: problems never trained on (the last ones): the demo asks about these
HELD_OUT = 3
REPLY = "We're sorry to hear that {problem}. A support agent will contact you within 24 hours."


def customer_message(problem: str, *, opener: int, closer: int) -> str:
    """A customer's message about ``problem`` in one of the phrasings."""
    return f"{OPENERS[opener % len(OPENERS)]}{problem}{CLOSERS[closer % len(CLOSERS)]}"


def house_reply(restated: str) -> str:
    return REPLY.format(problem=restated)


def task_records(n: int = 36, *, seed: int = 0) -> list[dict[str, str]]:
    """``n`` feedback payloads (kind ``sft``) over the trained problems, phrasings drawn without repeats."""
    rng = random.Random(f"support-reply/{seed}")
    trained = PROBLEMS[: len(PROBLEMS) - HELD_OUT]
    combos = [
        (p, o, c) for p in range(len(trained)) for o in range(len(OPENERS)) for c in range(len(CLOSERS))
    ]
    rng.shuffle(combos)
    return [
        {
            "kind": "sft",
            "prompt": customer_message(trained[p][0], opener=o, closer=c),
            "completion": house_reply(trained[p][1]),
        }
        for p, o, c in combos[:n]
    ]


def held_out_examples() -> list[Example]:
    """Messages about problems the task never trained on, with the reply the house style gives."""
    return [
        Example(i + 1, customer_message(said, opener=i, closer=i + 1), house_reply(restated), "sft")
        for i, (said, restated) in enumerate(PROBLEMS[len(PROBLEMS) - HELD_OUT :])
    ]


def in_house_style(answer: str) -> bool:
    """Whether a reply follows the house style (the apology and the 24-hour promise)."""
    return answer.startswith("We're sorry to hear that") and "within 24 hours" in answer
