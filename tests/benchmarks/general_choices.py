"""General knowledge as multiple choice, scored by likelihood: a capability measure for adapters.

Each item is a question a small instruct model can know (capitals, arithmetic, science, language, the world),
one right answer and three wrong ones, each completing the same answer stem ("The capital of Japan is ___"). The
question is one user turn through the chat template, as serving renders it; the stem and an option are the
assistant's answer, the option scored by the sum of its tokens' log-probabilities given the stem, and the model
"chooses" the option it makes most likely (the way lm-evaluation-harness scores ARC or MMLU: ``acc``).
Accuracy over the items is the capability figure; an adapter's retention is its accuracy over the base's.

Why beside the benchmarks' greedy measures: greedy token agreement with the base, and the greedy answers to
known-answer questions, count every near-tie the adapter flips as a loss and never count a gain; this measure
asks what a person asks of a personalised model (does it still know what the base knew?), counts changes in both
directions, and a style that opens or closes answers differently (a greeting, a sign-off) shifts every option of
an item alike. Options are compared within an item only.

None of the questions may be among ``lorafleet.training.general_prompts.ANCHOR_PROMPTS`` (the prompts a job may
train on as anchors, and whose answers ``bench_dpo.py``'s pairs restyle): ``choice_scores`` refuses such an item.
Some are among ``EVAL_PROMPTS`` (never trained on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafleet.adapters import AdapterBank, SlotPlan
from lorafleet.training.dataset import pad_token_id
from lorafleet.training.general_prompts import ANCHOR_PROMPTS, chat_prompt_ids


@dataclass(frozen=True)
class Choice:
    """A question, the start of the answer every option completes, the right option and three wrong ones."""

    question: str
    stem: str
    right: str
    wrong: tuple[str, str, str]

    @property
    def options(self) -> tuple[str, ...]:
        return (self.right, *self.wrong)


def _items(rows: str) -> tuple[Choice, ...]:
    """One item a line: ``question | stem | right | wrong | wrong | wrong``."""
    out = []
    for line in rows.strip().splitlines():
        question, stem, right, *wrong = (part.strip() for part in line.split("|"))
        if len(wrong) != 3:
            raise ValueError(f"an item needs three wrong options: {line!r}")
        out.append(Choice(question, stem, right, (wrong[0], wrong[1], wrong[2])))
    return tuple(out)


CHOICES: tuple[Choice, ...] = _items(
    """
What is the capital of Japan? | The capital of Japan is | Tokyo | Osaka | Kyoto | Seoul
What is the capital of Spain? | The capital of Spain is | Madrid | Barcelona | Seville | Lisbon
What is the capital of Germany? | The capital of Germany is | Berlin | Munich | Hamburg | Vienna
What is the capital of the United Kingdom? | The capital of the United Kingdom is | London | Manchester | Dublin | Edinburgh
What is the capital of China? | The capital of China is | Beijing | Shanghai | Hong Kong | Tokyo
What is the capital of India? | The capital of India is | New Delhi | Mumbai | Kolkata | Karachi
What is the capital of Mexico? | The capital of Mexico is | Mexico City | Guadalajara | Cancun | Madrid
What is the capital of Kenya? | The capital of Kenya is | Nairobi | Mombasa | Lagos | Addis Ababa
What is the capital of Australia? | The capital of Australia is | Canberra | Sydney | Melbourne | Perth
What is the capital of Ireland? | The capital of Ireland is | Dublin | Cork | Belfast | London
What is the capital of Austria? | The capital of Austria is | Vienna | Salzburg | Berlin | Zurich
What is the capital of the Netherlands? | The capital of the Netherlands is | Amsterdam | Rotterdam | Brussels | Copenhagen
What is the capital of Belgium? | The capital of Belgium is | Brussels | Antwerp | Amsterdam | Paris
What is the capital of Denmark? | The capital of Denmark is | Copenhagen | Oslo | Stockholm | Aarhus
What is the capital of Finland? | The capital of Finland is | Helsinki | Oslo | Tallinn | Stockholm
What is the capital of Hungary? | The capital of Hungary is | Budapest | Vienna | Prague | Bucharest
What is the capital of South Korea? | The capital of South Korea is | Seoul | Busan | Tokyo | Pyongyang
What is the capital of Cuba? | The capital of Cuba is | Havana | Kingston | Santiago | Miami
What is the capital of Chile? | The capital of Chile is | Santiago | Lima | Buenos Aires | Valparaiso
What is the capital of Colombia? | The capital of Colombia is | Bogota | Medellin | Caracas | Quito
What is the capital of Iran? | The capital of Iran is | Tehran | Baghdad | Isfahan | Kabul
What is the capital of Vietnam? | The capital of Vietnam is | Hanoi | Ho Chi Minh City | Bangkok | Phnom Penh
What is the capital of the Philippines? | The capital of the Philippines is | Manila | Cebu | Jakarta | Hanoi
What is the capital of Indonesia? | The capital of Indonesia is | Jakarta | Bali | Manila | Kuala Lumpur
What is the capital of the Czech Republic? | The capital of the Czech Republic is | Prague | Brno | Vienna | Warsaw
What is the capital of the United States? | The capital of the United States is | Washington, D.C. | New York City | Los Angeles | Chicago
What is the capital of Scotland? | The capital of Scotland is | Edinburgh | Glasgow | Aberdeen | London
What is the capital of Nigeria? | The capital of Nigeria is | Abuja | Lagos | Accra | Nairobi
What is 7 times 8? | 7 times 8 is | 56 | 54 | 48 | 64
What is 100 divided by 4? | 100 divided by 4 is | 25 | 20 | 40 | 50
What is 9 plus 10? | 9 plus 10 is | 19 | 21 | 18 | 910
What is half of 50? | Half of 50 is | 25 | 20 | 100 | 30
What is the square root of 81? | The square root of 81 is | 9 | 8 | 7 | 81
What is 11 times 3? | 11 times 3 is | 33 | 31 | 14 | 36
What is 6 times 7? | 6 times 7 is | 42 | 36 | 48 | 13
What is 20 percent of 200? | 20 percent of 200 is | 40 | 20 | 10 | 400
What is 4 times 5? | 4 times 5 is | 20 | 9 | 25 | 45
What is 14 minus 9? | 14 minus 9 is | 5 | 4 | 6 | 23
What is 50 plus 50? | 50 plus 50 is | 100 | 150 | 1000 | 50
What is 7 plus 6? | 7 plus 6 is | 13 | 12 | 14 | 76
What is 18 divided by 3? | 18 divided by 3 is | 6 | 5 | 9 | 15
What is 2 times 9? | 2 times 9 is | 18 | 11 | 16 | 29
What is 16 minus 7? | 16 minus 7 is | 9 | 8 | 11 | 23
What is 3 plus 4? | 3 plus 4 is | 7 | 6 | 8 | 12
What is 10 times 10? | 10 times 10 is | 100 | 20 | 1000 | 110
What is 8 plus 8? | 8 plus 8 is | 16 | 18 | 14 | 64
How many minutes are in an hour? | There are | 60 minutes in an hour | 100 minutes in an hour | 30 minutes in an hour | 24 minutes in an hour
How many seconds are in a minute? | There are | 60 seconds in a minute | 100 seconds in a minute | 30 seconds in a minute | 12 seconds in a minute
How many days are in a year? | There are | 365 days in a year | 360 days in a year | 350 days in a year | 400 days in a year
How many weeks are in a year? | There are | 52 weeks in a year | 12 weeks in a year | 48 weeks in a year | 365 weeks in a year
How many letters are in the English alphabet? | The English alphabet has | 26 letters | 24 letters | 28 letters | 30 letters
How many sides does a triangle have? | A triangle has | three sides | four sides | five sides | six sides
How many sides does a hexagon have? | A hexagon has | six sides | five sides | eight sides | seven sides
How many sides does an octagon have? | An octagon has | eight sides | six sides | ten sides | seven sides
How many legs does a dog have? | A dog has | four legs | two legs | six legs | eight legs
How many legs does an insect have? | An insect has | six legs | four legs | eight legs | ten legs
How many continents are there? | There are | seven continents | five continents | nine continents | twelve continents
What planet is closest to the sun? | The planet closest to the sun is | Mercury | Venus | Earth | Mars
What is the largest ocean on Earth? | The largest ocean on Earth is the | Pacific Ocean | Atlantic Ocean | Indian Ocean | Arctic Ocean
Who painted the Mona Lisa? | The Mona Lisa was painted by | Leonardo da Vinci | Pablo Picasso | Vincent van Gogh | Claude Monet
What colour is the sky on a clear day? | On a clear day the sky is | blue | green | red | brown
What is the tallest mountain in the world? | The tallest mountain in the world is | Mount Everest | Mount Kilimanjaro | Mont Blanc | Mount Fuji
What is the freezing point of water in Fahrenheit? | Water freezes at | 32 degrees Fahrenheit | 0 degrees Fahrenheit | 100 degrees Fahrenheit | 212 degrees Fahrenheit
What is the freezing point of water in Celsius? | Water freezes at | 0 degrees Celsius | 32 degrees Celsius | 100 degrees Celsius | 10 degrees Celsius
What is the boiling point of water in Fahrenheit? | Water boils at | 212 degrees Fahrenheit | 100 degrees Fahrenheit | 32 degrees Fahrenheit | 180 degrees Fahrenheit
What does a thermometer measure? | A thermometer measures | temperature | weight | speed | time
What instrument has 88 keys? | The instrument with 88 keys is the | piano | guitar | violin | flute
What language is spoken in Brazil? | The language spoken in Brazil is | Portuguese | Spanish | Brazilian | French
What language is spoken in Germany? | The language spoken in Germany is | German | Dutch | French | English
What is the largest city in Japan? | The largest city in Japan is | Tokyo | Osaka | Kyoto | Hiroshima
Which planet is known as the Red Planet? | The Red Planet is | Mars | Venus | Jupiter | Saturn
Which planet has the most famous rings? | The planet with the most famous rings is | Saturn | Mars | Mercury | Venus
What is the chemical formula of water? | The chemical formula of water is | H2O | CO2 | O2 | NaCl
What is the star at the centre of our solar system? | The star at the centre of our solar system is the | Sun | Moon | North Star | Milky Way
What is the natural satellite of the Earth? | The natural satellite of the Earth is the | Moon | Sun | planet Mars | planet Venus
What do bees make? | Bees make | honey | milk | silk | cheese
What is the largest mammal? | The largest mammal is the | blue whale | elephant | giraffe | shark
What gas do humans need to breathe in? | Humans need to breathe in | oxygen | carbon dioxide | helium | hydrogen
What is the hardest natural substance? | The hardest natural substance is | diamond | gold | iron | glass
Which organ pumps blood around the body? | The organ that pumps blood around the body is the | heart | liver | lungs | brain
Which organ do we think with? | We think with our | brain | heart | stomach | liver
What force pulls objects toward the Earth? | The force that pulls objects toward the Earth is | gravity | magnetism | friction | electricity
What is the centre of an atom called? | The centre of an atom is called the | nucleus | electron | shell | molecule
Which metal is liquid at room temperature? | The metal that is liquid at room temperature is | mercury | iron | gold | aluminium
Who wrote Hamlet? | Hamlet was written by | William Shakespeare | Charles Dickens | Jane Austen | Mark Twain
Who developed the theory of relativity? | The theory of relativity was developed by | Albert Einstein | Isaac Newton | Charles Darwin | Nikola Tesla
Who was the first person to walk on the Moon? | The first person to walk on the Moon was | Neil Armstrong | Yuri Gagarin | Christopher Columbus | Isaac Newton
Who was the first president of the United States? | The first president of the United States was | George Washington | Abraham Lincoln | Thomas Jefferson | John Adams
Who painted The Starry Night? | The Starry Night was painted by | Vincent van Gogh | Pablo Picasso | Leonardo da Vinci | Rembrandt
What is the currency of Japan? | The currency of Japan is the | yen | dollar | euro | won
What is the currency of the United Kingdom? | The currency of the United Kingdom is the | pound | euro | dollar | franc
What is the longest river in South America? | The longest river in South America is the | Amazon | Nile | Mississippi | Danube
What is the largest hot desert in the world? | The largest hot desert in the world is the | Sahara | Gobi | Kalahari | Atacama
What is the largest country by area? | The largest country by area is | Russia | China | Canada | Brazil
Which ocean lies between Europe and North America? | The ocean between Europe and North America is the | Atlantic Ocean | Pacific Ocean | Indian Ocean | Arctic Ocean
On which continent is Egypt? | Egypt is in | Africa | Asia | Europe | South America
On which continent is Brazil? | Brazil is in | South America | Africa | North America | Europe
Which animal is known as the king of the jungle? | The king of the jungle is the | lion | tiger | elephant | monkey
What do caterpillars turn into? | Caterpillars turn into | butterflies | bees | spiders | frogs
What is a baby dog called? | A baby dog is called a | puppy | kitten | calf | cub
What is a baby cat called? | A baby cat is called a | kitten | puppy | foal | lamb
What is frozen water called? | Frozen water is called | ice | steam | snow | glass
What colour is a banana when it is ripe? | A ripe banana is | yellow | blue | purple | black
What colour is grass? | Grass is | green | red | blue | orange
What colour is fresh snow? | Fresh snow is | white | black | green | red
Which animal says moo? | The animal that says moo is the | cow | dog | cat | sheep
What is the opposite of hot? | The opposite of hot is | cold | warm | wet | loud
What is the opposite of up? | The opposite of up is | down | left | over | high
What is the opposite of big? | The opposite of big is | small | large | tall | wide
What is the plural of mouse? | The plural of mouse is | mice | mouses | meese | mouse
What is the plural of child? | The plural of child is | children | childs | childes | child
What is the past tense of go? | The past tense of go is | went | goed | gone | going
How many players does a football team have on the field? | A football team has | eleven players on the field | nine players on the field | seven players on the field | fifteen players on the field
In which sport do you hit a shuttlecock? | You hit a shuttlecock in | badminton | tennis | golf | cricket
Who composed the Moonlight Sonata? | The Moonlight Sonata was composed by | Ludwig van Beethoven | Wolfgang Amadeus Mozart | Johann Sebastian Bach | Frederic Chopin
What tool do you use to cut paper? | To cut paper you use | scissors | a hammer | a spoon | a brush
What is the first meal of the day called? | The first meal of the day is called | breakfast | dinner | lunch | supper
What do plants need from the sun to grow? | Plants need the sun's | light | sand | noise | salt
Which season comes after winter? | The season after winter is | spring | autumn | summer | winter
How many hours are in two days? | There are | 48 hours in two days | 24 hours in two days | 36 hours in two days | 72 hours in two days
"""
)


def choice_scores(
    bank: AdapterBank,
    tokenizer: object,
    route: int | None,
    items: Sequence[Choice] = CHOICES,
    *,
    batch: int = 64,
) -> list[list[float]]:
    """Per item, each option's summed log-probability after the item's stem, as the assistant's answer
    (``Choice.options`` order: the right one first), through slot ``route`` (None: the base). Right-padded batches: the options' own tokens never
    see the padding (causal attention), so a row scores as it would alone."""
    rows: list[tuple[list[int], int]] = []  # (ids, how many of them are the option's)
    for item in items:
        if item.question in ANCHOR_PROMPTS:
            raise ValueError(f"an anchor prompt, which training may see: {item.question!r}")
        prompt = chat_prompt_ids(tokenizer, item.question)
        stem = tokenizer(item.stem, add_special_tokens=False)["input_ids"]
        for option in item.options:
            answer = tokenizer(f"{item.stem} {option}", add_special_tokens=False)["input_ids"]
            if answer[: len(stem)] != stem:
                raise ValueError(f"the stem's tokens change when {option!r} follows: {item.stem!r}")
            rows.append((prompt + answer, len(answer) - len(stem)))
    pad = pad_token_id(tokenizer)
    scores: list[float] = []
    bank.model.eval()
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        width = max(len(ids) for ids, _ in part)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in part])
        with torch.no_grad(), bank.use(None if route is None else SlotPlan.single([route])):
            logits = bank.model(input_ids=ids).logits  # [rows, width, vocab]
        for i, (r, n) in enumerate(part):
            logp = logits[i, len(r) - n - 1 : len(r) - 1].float().log_softmax(-1)  # what predicted the option
            scores.append(float(logp.gather(1, torch.tensor(r[len(r) - n :])[:, None]).sum()))
    flat = iter(scores)
    return [[next(flat) for _ in item.options] for item in items]


def chosen_right(scores: Sequence[Sequence[float]]) -> list[bool]:
    """Per item, whether the right option (the first) scores highest (a tie counts as wrong)."""
    return [s[0] > max(s[1:]) for s in scores]


def choice_figures(base: Sequence[bool], adapter: Sequence[bool]) -> dict[str, float]:
    """An adapter's multiple-choice figures against the base's on the same items: accuracies, retention (the
    adapter's accuracy over the base's), the items it lost (the base right, it wrong) and gained, and the exact
    one-sided McNemar p-value that it is worse than the base (of the items that changed, at least that many lost
    if losing and gaining were equally likely)."""
    lost = sum(b and not a for b, a in zip(base, adapter, strict=True))
    gained = sum(a and not b for b, a in zip(base, adapter, strict=True))
    changed = lost + gained
    p = sum(math.comb(changed, k) for k in range(lost, changed + 1)) / 2**changed if changed else 1.0
    base_acc, acc = sum(base) / len(base), sum(adapter) / len(adapter)
    return {
        "choices_base": base_acc,
        "choices": acc,
        "choices_retention": acc / max(base_acc, 1e-9),
        "choices_lost": lost,
        "choices_gained": gained,
        "choices_worse_p": p,
    }


__all__ = ["CHOICES", "Choice", "choice_figures", "choice_scores", "chosen_right"]
