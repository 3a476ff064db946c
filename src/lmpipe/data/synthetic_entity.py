"""Entity documents of the embedded default: news-like sentences with people, places and
organisations, tagged word by word for token classification.

Each document is 5-7 sentences drawn without repetition from templates whose slots are filled
with person (``PER``), location (``LOC``) and organisation (``ORG``) names of one to three words.
``meta`` carries the words (``tokens``, punctuation split off as CoNLL-2003 does) and their IOB2
``tags``; the text is the words joined with a space, punctuation attached to the word before it,
so splitting the text into words and punctuation gives ``tokens`` back. The text is plain ASCII
(NFC leaves it as it is, no PII pattern matches it) and passes the Gopher rules, so the tags still
fit the text after ``clean``. Which type a name is cannot be told from the word alone: a dozen
names are people and places (``Jordan``, ``Florence``, ``Lincoln``), some surnames and places
name companies too (``Quinn Motors``, ``Kingston Bank``), so a tagger has to read the context.
"""

from __future__ import annotations

import random
import re
from typing import Any

Record = tuple[str, dict[str, Any]]


def _p(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split("|"))


FIRST = _p("Mara|Tobin|Lina|Oskar|Priya|Felix|Nadia|Hugo|Ines|Rafael|Yuki|Omar|Greta|Milo|Amara|Theo|Sana|Jonas|"
           "Leila|Bruno|Clara|Elsa|Farid|Gemma|Idris|Kofi|Lena|Mateo|Rosa|Tara|Vera|Zane|Anya|Boris|Jordan|Victoria|"
           "Georgia|Florence|Chad|Sydney|Austin|Paris|Chelsea|Lincoln|Regina")
LAST = _p("Lindqvist|Okafor|Moreau|Tanaka|Novak|Berger|Castillo|Haddad|Kowalski|Mendes|Petrov|Rahman|Silva|"
          "Varga|Weber|Osei|Laine|Duarte|Ferreira|Nakamura|Abbott|Quinn|Marsh|Holloway")
PLACES = _p("Lisbon|Nairobi|Oslo|Lima|Hanoi|Accra|Vienna|Dublin|Prague|Bogota|Cairo|Madrid|Santiago|Helsinki|"
            "Buenos Aires|New Delhi|Cape Town|Mexico City|Addis Ababa|Kuala Lumpur|Norway|Peru|Kenya|Portugal|"
            "Chile|Ghana|Austria|Vietnam|Morocco|Finland|Jordan|Victoria|New Zealand|South Korea|Georgia|Florence|"
            "Chad|Sydney|Austin|Paris|Chelsea|Lincoln|Regina|Kingston")
ORG_HEADS = _p("Norvik|Altara|Brightwell|Kestrel|Solano|Tavira|Emberly|Lumo|Quillon|Vantor|Haldor|Pixa|Marlow|"
               "Corvane|Dunmore|Estrella|Marsh|Holloway|Quinn|Abbott|Kingston|Lincoln")
ORG_TAILS = _p("Bank|Airlines|Foods|Energy|Motors|Labs|Insurance|Shipping|Telecom|Press|Pharma|Textiles|"
               "Railways|Systems|Holdings|Studios")
ORG_WHOLE = _p("the United Nations|the Red Cross|the World Bank|the Ocean Institute|the National Library|"
               "the Harbour Authority")

# A slot is {PER}, {LOC} or {ORG}; a leading "the" of an organisation is not part of its name.
TEMPLATES = _p(
    "{PER} moved to {LOC} last spring to work for {ORG}.|"
    "According to {PER}, the new office of {ORG} in {LOC} will open soon.|"
    "{ORG} hired {PER} as its chief engineer after a long search.|"
    "The delegation from {LOC} met {PER} at the headquarters of {ORG}.|"
    "{PER} and {PER} spent the summer walking across {LOC}.|"
    "Reporters in {LOC} asked {PER} about the future of {ORG}.|"
    "Shares of {ORG} rose sharply after its deal with {ORG} was announced.|"
    "{PER} grew up near {LOC} and studied history before joining {ORG}.|"
    "A spokesperson for {ORG} said the factory near {LOC} would stay open.|"
    "Last week {PER} flew from {LOC} to {LOC} for a meeting with {PER}.|"
    "The mayor of {LOC}, {PER}, praised the volunteers who cleaned the river.|"
    "Many families in {LOC} still remember when {ORG} built the old bridge.|"
    "{PER} wrote a long letter to the board of {ORG} asking for more time.|"
    "Travellers often confuse {LOC} with {LOC}, although the two are far apart.|"
    "When {PER} arrived in {LOC}, the streets were already full of people.|"
    "The football club of {LOC} signed a new contract with {ORG} this year.|"
    "Nobody at {ORG} expected the storm that closed every road around {LOC}.|"
    "In an interview, {PER} said that {ORG} had treated the workers fairly.|"
    "The weather stayed mild for most of the week, and the markets were calm.|"
    "Several witnesses described what they saw to the local newspaper.")
_SLOT = re.compile(r"\{(PER|LOC|ORG)\}")
_WORDS = re.compile(r"\w+|[^\w\s]")  # the tokens of a text: words, and each punctuation mark alone
NO_SPACE_BEFORE = {".", ",", "?", "!", ";", ":"}


def _name(kind: str, rng: random.Random) -> list[str]:
    """The words of a random name of ``kind``."""
    if kind == "PER":
        return rng.choice([[rng.choice(FIRST), rng.choice(LAST)], [rng.choice(FIRST), rng.choice(LAST)],
                           [rng.choice(LAST)], [rng.choice(FIRST)]])
    if kind == "LOC":
        return rng.choice(PLACES).split()
    if rng.random() < 0.25:
        return rng.choice(ORG_WHOLE).split()
    return [rng.choice(ORG_HEADS), *([rng.choice(ORG_TAILS)] if rng.random() < 0.8 else [])]


def _sentence(template: str, rng: random.Random) -> tuple[list[str], list[str]]:
    tokens: list[str] = []
    tags: list[str] = []
    position = 0
    for match in _SLOT.finditer(template):
        plain = _WORDS.findall(template[position:match.start()])
        tokens += plain
        tags += ["O"] * len(plain)
        words = _name(match.group(1), rng)
        if words[0] == "the":  # "the World Bank": the article stays outside the entity
            tokens.append("the" if tokens else "The")
            tags.append("O")
            words = words[1:]
        tokens += words
        tags += [f"B-{match.group(1)}", *[f"I-{match.group(1)}"] * (len(words) - 1)]
        position = match.end()
    plain = _WORDS.findall(template[position:])
    return tokens + plain, tags + ["O"] * len(plain)


def detokenize(tokens: list[str]) -> str:
    """The words joined by spaces, with punctuation attached to the word before it."""
    out: list[str] = []
    for token in tokens:
        if out and token in NO_SPACE_BEFORE:
            out[-1] += token
        else:
            out.append(token)
    return " ".join(out)


MIN_SENTENCES, MIN_WORDS = 5, 56  # Gopher's 50-word minimum with room to spare


def entity(rng: random.Random) -> Record:
    """An entity document: distinct templates until there are 5 sentences and 56 words (about 100
    pieces, inside the tiny model's 128-token context), ``meta`` with ``tokens`` and ``tags``."""
    tokens: list[str] = []
    tags: list[str] = []
    for count, template in enumerate(rng.sample(TEMPLATES, len(TEMPLATES)), 1):
        words, labels = _sentence(template, rng)
        tokens += words
        tags += labels
        if count >= MIN_SENTENCES and sum(t not in NO_SPACE_BEFORE for t in tokens) >= MIN_WORDS:
            break
    return detokenize(tokens), {"kind": "entity", "tokens": tokens, "tags": tags}
