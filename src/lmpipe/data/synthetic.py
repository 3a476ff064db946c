"""The embedded default corpus: generated documents with real structure plus deliberate noise.

Pure Python, no network, no data files, deterministic for a seed, fast (thousands of documents
per second). Three kinds of clean documents:

* ``story``: 4-paragraph stories from a small grammar (characters, places, objects, events,
  dialogue, a resolution and a lesson), about 180-240 words;
* ``review``: movie/product reviews whose sentiment (``meta.label``) is learnable from the words,
  with negation ("not dull at all") now and then;
* ``instruction``: instruction/answer pairs a tiny model can learn (arithmetic word problems with
  correct answers, reversing and sorting word lists, antonyms, capitals).

With ``entity_fraction``, news-like ``entity`` documents with people, places and organisations
tagged word by word (:mod:`lmpipe.data.synthetic_entity`) come on top, from a random stream of their own.

Clean documents pass the Gopher quality rules (Rae et al. 2021: >= 50 words, mean word length
3-10, >= 80% alphabetic words, stop words present) and are varied enough that no two are near
duplicates. On top come ``noise_fraction * num_docs`` noisy documents, each tagged with
``meta.noise`` so tests can check that ``clean`` removes them (or, for ``pii``, redacts them).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Generator, Mapping
from typing import Any

from lmpipe.data import synthetic_entity, synthetic_zh
from lmpipe.errors import ConfigError

Record = tuple[str, dict[str, Any]]
DOC_KINDS = ("story", "review", "instruction")
NOISE_KINDS = ("exact_duplicate", "near_duplicate", "boilerplate", "non_english", "pii",
               "broken_encoding", "repetitive_spam", "too_short", "symbol_heavy")


def _p(text: str) -> tuple[str, ...]:
    """A vocabulary from a '|'-separated string (keeps the word lists compact and readable)."""
    return tuple(part.strip() for part in text.split("|"))


# ------------------------------------------------------------------------------------- vocabulary
NAMES = _p("Mara|Tobin|Lina|Oskar|Priya|Felix|Nadia|Hugo|Ines|Rafael|Yuki|Omar|Greta|Milo|Amara|Theo|Sana|"
           "Jonas|Leila|Bruno|Clara|Dev|Elsa|Farid|Gemma|Idris|Juno|Kofi|Lena|Mateo|Nia|Otto|Rosa|Sami|Tara|"
           "Vera|Wren|Yara|Zane|Anya|Boris|Cora|Dario|Edie|Flynn|Hana|Ivo|Jade|Kai|Luca|Maya|Nico|Olga|Pavel|"
           "Remy|Sofia|Timo|Uma|Willa|Ada|Cleo|Dina|Emil|Fern|Gus|Iris|Jasper|Kira|Leo|Marta|Noor|Pia|Ravi")
ROLES = _p("baker|fisherman|shepherd|clockmaker|painter|young sailor|librarian|gardener|blacksmith|weaver|"
           "potter|beekeeper|mapmaker|lighthouse keeper|carpenter|singer|farmer|teacher|doctor|tailor|miller|"
           "ferryman|cook|candlemaker|bookbinder|glassblower|astronomer|postman|stonemason|herbalist")
TRAITS = _p("curious|patient|shy|stubborn|cheerful|clever|quiet|brave|careful|restless|kind|forgetful|proud|"
            "gentle|honest|clumsy|thoughtful|bold|lonely|generous")
PLACES = _p("a small village by the sea|a busy town at the foot of the mountains|a farm at the edge of a pine "
            "forest|a narrow street in an old harbour city|a cottage beside a slow green river|an island with "
            "one lighthouse|a valley full of apple orchards|a windy town on a high plateau|a quiet hamlet among "
            "the wheat fields|a market town on a wide brown river|a fishing port where fog rolled in every "
            "morning|a village built around an old stone bridge|a house at the end of a long dusty road|a "
            "mountain village buried in snow half the year|a crowded quarter behind the railway station")
OBJECTS = _p("a brass key|a torn map|a wooden flute|a silver locket|a blue umbrella|an old compass|a jar of "
             "honey|a red kite|a leather notebook|a lantern with cracked glass|a basket of plums|a music box|a "
             "pair of knitted gloves|a clay whistle|a bundle of letters|a spyglass|a loaf of warm bread|a tin "
             "soldier|a painted egg|a coil of rope|a broken clock|a paper boat|a wool scarf|a small bell|a "
             "packet of seeds|a chipped teacup|a straw hat|a carved bird|a fishing net|a stub of candle")
PETS = _p("a grey cat|an old dog|a noisy goose|a tame crow|a little goat|a patient donkey|a ginger kitten|"
          "a shaggy pony|a white rabbit|a clever magpie")
TIMES = _p("morning|evening|autumn afternoon|rainy night|winter morning|hot summer day|foggy dawn|market day|"
           "spring evening|quiet Sunday")
FOUND = _p("under a loose floorboard|at the bottom of an old well|in the pocket of a borrowed coat|between "
           "the roots of an oak|on the steps of the chapel|inside a hollow wall|in a crate at the market|on "
           "the beach after the tide went out|behind the bakery ovens|in the attic among dusty trunks")
FEELINGS = _p("worried|delighted|puzzled|nervous|hopeful|tired|surprised|uneasy|proud|excited|calm|amazed")
ROUTINES = _p("walked to the harbour to watch the boats|swept the square before the shops opened|counted "
              "the bees in the garden|read one chapter of a book before breakfast|mended nets for the other "
              "fishermen|climbed the hill to look at the weather|baked bread for half the street|fed the "
              "birds on the windowsill|wrote a letter to a friend far away|repaired things that nobody "
              "else could fix|sang while sorting the post|watered rows of beans and tomatoes")
NEWS = _p("the bridge over the river had collapsed|the village well had run dry|the winter stores had been "
          "spoiled by rain|a child had gone missing in the forest|the old mill had stopped turning|the "
          "ferry would not run for a month|the festival lanterns had been stolen|the orchard was full of "
          "strange insects|a fire had burned the schoolhouse roof|the road to the city was blocked by snow")
CLUES = _p("a name was scratched on the side|it was still warm to the touch|it was tied with a faded ribbon|a "
           "note was folded around it|it smelled of salt and smoke|someone had polished it recently|it "
           "hummed quietly when the wind blew")
QUESTIONS = _p("Where do you think it came from?|What should we do now?|Have you ever seen this before?|Who "
               "could help us?|Is it far from here?|Can we fix it before dark?|Why would anyone leave it "
               "behind?|Do you remember the old stories?|Are you afraid?|How much time do we have?")
ANSWERS = _p("I think we should ask the old {role}|We could follow the river until we find out|My "
             "grandmother told me about something like this|Let us wait until morning and look again|Nobody "
             "will believe us unless we bring proof|If we work together we can finish by sunset|Maybe the "
             "answer is hidden somewhere in the hills|I have a feeling that we are not the first|Trust me, "
             "there is always a way")
MANNERS = _p("scratching {poss} head|with a small smile|after a long pause|looking at the sky|in a low "
             "voice|without looking up|laughing softly|folding {poss} arms|with a sigh")
TRAVEL = _p("walked along the cliffs|rowed across the bay|climbed the steep goat path|took the night train|"
            "followed the old cart track|crossed the frozen lake|rode in a creaking cart|waded through the marsh")
DESTS = _p("the ruined tower|the house of an old {role}|the market in the next town|the top of the hill|the "
           "cave behind the waterfall|the library in the city|the island across the water|the farm where "
           "the road ends")
OBSTACLES = _p("warned them about wolves in the valley|asked for help carrying a heavy sack|offered them soup "
               "and a dry place to sleep|pointed them toward a shorter path|would not let them pass until "
               "they solved a riddle|told them a long story about a lost ship|lent them a lamp and a map")
ENDINGS = _p("{A} returned {obj} to its owner, an old {role} who wept with joy|the whole village helped to "
             "rebuild what was broken in three days|they discovered that {obj} opened a door nobody had "
             "noticed before|{B} admitted that {b_pron} had been wrong and thanked {A}|the river rose again "
             "and the mill began to turn|they found the lost child asleep in a barn, safe and warm|a letter "
             "arrived from the city with the answer they had hoped for")
LESSONS = _p("small kindness travels far|asking for help is not a weakness|patience can solve what strength "
             "cannot|a friend is worth more than treasure|every stranger has a story worth hearing|curiosity "
             "is a kind of courage|it is never too late to say sorry|the best maps are drawn by walking")
CLOSINGS = _p("{A} kept {obj} on the shelf above the fire|people told the story every winter by the stove|"
              "{A} and {B} met every week to share a meal|{pet} slept by the door as if guarding a secret|"
              "nobody in the village ever laughed at {A} again")


# ------------------------------------------------------------------------------------------ story
def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _the(phrase: str) -> str:
    """'a brass key' -> 'the brass key'."""
    return "the " + phrase.split(" ", 1)[1]


def story(rng: random.Random) -> Record:
    """A 4-paragraph story: who and where, what happened, a journey with dialogue, how it ended."""
    a, b, c = rng.sample(NAMES, 3)
    pron, poss = rng.choice((("he", "his"), ("she", "her")))
    b_pron = rng.choice(("he", "she"))
    role, role_b, role_c = rng.sample(ROLES, 3)
    obj, pet = rng.choice(OBJECTS), rng.choice(PETS)
    trait, place = rng.choice(TRAITS), rng.choice(PLACES)
    fill = {"A": a, "B": b, "obj": _the(obj), "role": rng.choice(ROLES), "b_pron": b_pron,
            "pet": _cap(_the(pet)), "poss": poss}
    intro = [rng.choice([f"Once there was a {trait} {role} named {a} who lived in {place}.",
                         f"In {place} there lived a {trait} {role} called {a}.",
                         f"{a} was a {trait} {role} from {place}."]),
             f"Every day {pron} {rng.choice(ROUTINES)}, and in the evening {pron} {rng.choice(ROUTINES)}.",
             rng.choice([f"{_cap(pron)} shared a small house with {pet}.",
                         f"{a} had {pet} that followed {poss} steps everywhere.",
                         f"{_cap(poss)} only companion was {pet}, who liked to sleep in the sun."])]
    if rng.random() < 0.5:
        event = [f"One {rng.choice(TIMES)}, {a} found {obj} {rng.choice(FOUND)}.",
                 f"{_cap(pron)} had never seen anything like it, and {pron} felt {rng.choice(FEELINGS)}.",
                 f"It seemed to belong to someone, because {rng.choice(CLUES)}.",
                 f"{_cap(pron)} showed it to {b}, the {role_b} who lived next door."]
    else:
        event = [f"One {rng.choice(TIMES)}, {b}, the {role_b}, knocked on the door with bad news: {rng.choice(NEWS)}.",
                 f"{a} felt {rng.choice(FEELINGS)}, but {pron} picked up {obj} for luck and put on {poss} coat."]
    talk = []
    for question, answer in zip(rng.sample(QUESTIONS, 2), rng.sample(ANSWERS, 2), strict=True):
        talk += [f'"{question}" asked {a}.', f'"{answer.format(**fill)}," said {b}, {rng.choice(MANNERS).format(**fill)}.']
        a, b = b, a  # the speakers take turns asking
    a, b = fill["A"], fill["B"]
    journey = [f"The next {rng.choice(TIMES)} {a} and {b} {rng.choice(TRAVEL)} to {rng.choice(DESTS).format(**fill)}.",
               f"On the way they met {c}, a {role_c}, who {rng.choice(OBSTACLES)}."]
    ending = [f"In the end, {rng.choice(ENDINGS).format(**fill)}.",
              f"{a} learned that {rng.choice(LESSONS)}.",
              f"From that day on, {rng.choice(CLOSINGS).format(**fill)}."]
    paragraphs = [intro, event, talk + journey if rng.random() < 0.5 else journey + talk, ending]
    return "\n\n".join(" ".join(p) for p in paragraphs), {"kind": "story"}


# ----------------------------------------------------------------------------------------- review
TITLE_ADJ = _p("Silent|Glass|Last|Northern|Hidden|Broken|Golden|Distant|Paper|Hollow|Winter|Crimson|Iron|Velvet")
TITLE_NOUN = _p("Harbour|Garden|Promise|Orchard|Letter|Station|Kingdom|Lantern|River|Signal|Mirror|Voyage|Tide")
BRANDS = _p("Norvik|Altara|Brightwell|Kestrel|Solano|Tavira|Emberly|Lumo|Quillon|Vantor|Haldor|Pixa")
PRODUCTS = _p("wireless headphones|coffee grinder|hiking backpack|desk lamp|electric kettle|running shoes|"
              "phone case|vacuum cleaner|portable speaker|office chair|air fryer|rain jacket|keyboard|blender")
MOVIE_ASPECTS = _p("the acting|the story|the soundtrack|the camera work|the dialogue|the pacing|the ending|the "
                   "special effects|the lead performance|the script|the costumes|the humour")
PRODUCT_ASPECTS = _p("the battery life|the build quality|the design|the price|the sound|the setup|the customer "
                     "service|the packaging|the comfort|the instructions|the weight|the materials")
POSITIVE = _p("excellent|wonderful|brilliant|superb|delightful|impressive|charming|beautiful|fantastic|"
              "outstanding|lovely|remarkable|moving|solid|reliable|elegant|gorgeous|clever")
NEGATIVE = _p("terrible|awful|dull|boring|disappointing|clumsy|flimsy|weak|poor|tedious|frustrating|mediocre|"
              "confusing|cheap|sloppy|forgettable|annoying|lifeless")
INTENSIFIERS = _p("really|truly|genuinely|quite|rather|absolutely|simply|honestly")
WHEN = _p("last weekend|on a rainy Sunday|on Friday night|during a long flight|after work yesterday|a month ago")
# Aspect lines are shared by both labels: only the adjectives (and negation of the opposite ones)
# carry the sentiment, so a model must learn word polarity rather than template shapes.
ASPECT_LINES = _p("{Aspect} was {intens} {good}.|I found {aspect} {good} from start to finish.|{Aspect} was not "
                  "{bad} at all; it was {good}.|Honestly, {aspect} was {good}.|I was surprised by how {good} "
                  "{aspect} turned out.|{Aspect} felt {good}, and so did {aspect2}.")
MIXED_LINE = "To be fair, {aspect} was {bad}, but that did not change my opinion."
VERDICTS = {
    "positive": (_p("I was never bored for a second.|It was worth every penny.|I have already told my friends "
                    "about it.|It exceeded what I expected."),
                 _p("I would recommend it to anyone.|Five stars from me, without hesitation.|Definitely worth "
                    "it, and I will come back for more.|A great choice, and I am glad I picked it.")),
    "negative": (_p("I was bored most of the time.|It was a waste of money.|I have already warned my friends "
                    "about it.|It fell far below what I expected."),
                 _p("I would not recommend it to anyone.|One star from me, and that is generous.|Save your "
                    "money and skip this one.|A poor choice, and I regret picking it.")),
}


def review(rng: random.Random) -> Record:
    """A movie or product review of 50+ words with its sentiment label in meta."""
    label = rng.choice(("positive", "negative"))
    good, bad = (POSITIVE, NEGATIVE) if label == "positive" else (NEGATIVE, POSITIVE)
    if rng.random() < 0.5:
        topic, aspects = "movie", MOVIE_ASPECTS
        item = f"The {rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUN)}"
        opening = rng.choice([f"I watched {item} {rng.choice(WHEN)} with a few friends.",
                              f"I finally saw {item} {rng.choice(WHEN)}, after months of waiting."])
    else:
        topic, aspects = "product", PRODUCT_ASPECTS
        item = f"{rng.choice(BRANDS)} {rng.choice(PRODUCTS)}"
        opening = rng.choice([f"I bought the {item} {rng.choice(WHEN)} to replace my old one.",
                              f"I have been using the {item} every day since I bought it {rng.choice(WHEN)}."])
    order = rng.sample(aspects, len(aspects))
    sentences, words = [opening], len(opening.split())
    for template, aspect, aspect2 in zip(rng.sample(ASPECT_LINES, len(ASPECT_LINES)), order, order[1:], strict=False):
        line = template.format(Aspect=_cap(aspect), aspect=aspect, aspect2=aspect2, intens=rng.choice(INTENSIFIERS),
                               good=rng.choice(good), bad=rng.choice(bad))
        sentences.append(line)
        words += len(line.split())
        if words >= 45 and rng.random() < 0.5:
            break
    if rng.random() < 0.25:  # a point against the overall verdict keeps the task from being trivial
        sentences.insert(rng.randrange(2, len(sentences) + 1),
                         MIXED_LINE.format(aspect=order[-1], bad=rng.choice(bad)))
    extra, close = VERDICTS[label]
    sentences += [rng.choice(extra), rng.choice(close)] if rng.random() < 0.5 else [rng.choice(close)]
    return " ".join(sentences), {"kind": "review", "label": label, "topic": topic}


# ------------------------------------------------------------------------------------ instruction
ITEMS = _p("apples|marbles|stickers|pencils|shells|cookies|stamps|buttons|candles|oranges|books|coins|tulips")
BOXES = _p("bags|boxes|jars|baskets|packs|crates|tins|bundles")
NUMBER_WORDS = _p("zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve")
NOUNS = _p("apple|river|candle|window|garden|ladder|pepper|violin|harbor|blanket|marble|forest|rocket|teapot|"
           "button|island|pillow|feather|lantern|mirror|saddle|tunnel|walnut|basket|meadow|jacket|pebble|"
           "tractor|bicycle|cabinet|dolphin|engine|falcon|goblet|hammer|kettle|lemon|magnet|needle|orchard|"
           "parrot|quarry|rabbit|spider|thimble|umbrella|velvet|wagon|yogurt|zipper|anchor|bridge|castle|"
           "desert|eagle|fountain|glacier|helmet|iceberg|jungle|kitten|lizard|mountain|notebook|ocean|planet")
ANTONYMS = _p("hot:cold|early:late|heavy:light|tall:short|wide:narrow|loud:quiet|fast:slow|happy:sad|rich:poor|"
              "strong:weak|young:old|empty:full|dark:bright|hard:soft|clean:dirty|open:closed|wet:dry|"
              "thick:thin|brave:afraid|cheap:expensive|deep:shallow|sharp:dull|smooth:rough|sweet:sour|"
              "win:lose|begin:end|push:pull|buy:sell|arrive:leave|remember:forget|accept:refuse|above:below|"
              "inside:outside|always:never|friend:enemy|question:answer|summer:winter|day:night|north:south|"
              "ancient:modern|generous:selfish|polite:rude|calm:angry|simple:complex|visible:hidden")
CAPITALS = _p("France:Paris|Germany:Berlin|Japan:Tokyo|Kenya:Nairobi|Canada:Ottawa|Brazil:Brasilia|Egypt:Cairo|"
              "Spain:Madrid|Italy:Rome|India:New Delhi|China:Beijing|Mexico:Mexico City|Peru:Lima|Chile:Santiago|"
              "Norway:Oslo|Sweden:Stockholm|Finland:Helsinki|Poland:Warsaw|Greece:Athens|Portugal:Lisbon|"
              "Ireland:Dublin|Austria:Vienna|Hungary:Budapest|Turkey:Ankara|Iran:Tehran|Thailand:Bangkok|"
              "Vietnam:Hanoi|Australia:Canberra|Argentina:Buenos Aires|Colombia:Bogota|Morocco:Rabat|"
              "Ghana:Accra|Nigeria:Abuja|Ethiopia:Addis Ababa|Cuba:Havana|Denmark:Copenhagen|Belgium:Brussels|"
              "Netherlands:Amsterdam|Switzerland:Bern|Czechia:Prague|Romania:Bucharest|Ukraine:Kyiv|"
              "Indonesia:Jakarta|Philippines:Manila|South Korea:Seoul|Pakistan:Islamabad|Nepal:Kathmandu")
# Lines end in a slot, start with at most four fixed words and are used at most twice per answer, so
# no answer trips Gopher's repeated n-gram rules (Rae et al. 2021, table A1) on template text alone.
ANTONYM_LINES = _p("The opposite of {a} is {b}.|If something is not {a}, it may be {b}.|{A} is opposite to "
                   "{b}.|We say {b} as the reverse of {a}.|Where one word is {a}, the other is {b}.")
CAPITAL_LINES = _p("The capital of {c} is {k}.|{k} is the capital of {c}.|{c} has its government in {k}.|"
                   "For {c}, the answer is {k}.|In {c}, the government sits in {k}.")


def _number(n: int) -> str:
    """Small numbers as words (as people write them), larger ones as digits."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    name, friend = rng.sample(NAMES, 2)
    pron = rng.choice(("he", "she"))
    item = rng.choice(ITEMS)
    if rng.random() < 0.5:
        start, bags, each = rng.randint(12, 60), rng.randint(2, 9), rng.randint(3, 9)
        give = rng.randint(2, start + bags * each - 1)
        total = start + bags * each
        box = rng.choice(BOXES)
        question = (f"{name} has {start} {item}. Later {pron} buys {_number(bags)} {box} with {_number(each)} {item} in "
                    f"each of them, and then gives {give} {item} away to {friend}. How many {item} does {name} have now?")
        answer = (f"First, {name} starts with {start} {item}. The {box} hold {_number(bags)} times {_number(each)}, "
                  f"which makes {bags * each} more, so {pron} then owns {total} in total. After handing over {give} "
                  f"of them to {friend}, the count goes down to {total - give}. The answer is {total - give} {item}.")
    else:
        count, friends = rng.randint(20, 99), rng.randint(3, 9)
        share, left = divmod(count, friends)
        question = (f"{name} collects {count} {item} and wants to share them equally among {_number(friends)} friends, "
                    f"keeping whatever is left over. How many {item} does each friend get, and how many remain with {name}?")
        answer = (f"We divide {count} by {_number(friends)}. Since {_number(friends)} times {share} is "
                  f"{friends * share}, every friend receives {share} {item}. The difference between {count} and "
                  f"{friends * share} is {_number(left)}, so {name} keeps {_number(left)} of them. The answer is "
                  f"{share} each, with {_number(left)} left over.")
    instruction = rng.choice(["Solve the word problem and explain each step.",
                              "Read the problem, work it out step by step, and give the final answer.",
                              "Answer the math question below and show how you got the result."])
    return instruction, question, answer


def _word_list(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(NOUNS, rng.randint(12, 16))
    if rng.random() < 0.5:
        result = list(reversed(words))
        instruction = rng.choice(["Reverse the order of the words in the list.",
                                  "Write the following list of words backwards, from the last word to the first."])
        answer = (f"Here is the list in reverse order: {', '.join(result)}. The word that was last is now at the "
                  f"front, and the word {words[0]} that used to open the list now closes it.")
    else:
        result = sorted(words)
        instruction = rng.choice(["Sort the following words in alphabetical order.",
                                  "Put these words in order from A to Z."])
        answer = (f"In alphabetical order the words are: {', '.join(result)}. The word that comes first is "
                  f"{result[0]}, and the one that comes last is {result[-1]}.")
    return instruction, ", ".join(words), answer


def _antonyms(rng: random.Random) -> tuple[str, str, str]:
    pairs = [p.split(":") for p in rng.sample(ANTONYMS, rng.randint(7, 10))]
    templates = rng.sample(ANTONYM_LINES * 2, len(pairs))
    lines = [t.format(a=a, A=_cap(a), b=b) for t, (a, b) in zip(templates, pairs, strict=True)]
    instruction = rng.choice(["Give the opposite of each word.", "Write an antonym for every word in the list.",
                              "For each of these words, name a word with the opposite meaning."])
    return instruction, ", ".join(a for a, _ in pairs), " ".join(lines)


def _capitals(rng: random.Random) -> tuple[str, str, str]:
    pairs = [p.split(":") for p in rng.sample(CAPITALS, rng.randint(7, 10))]
    templates = rng.sample(CAPITAL_LINES * 2, len(pairs))
    lines = [t.format(c=c, k=k) for t, (c, k) in zip(templates, pairs, strict=True)]
    instruction = rng.choice(["Name the capital city of each country.", "What are the capitals of these countries?",
                              "For every country in the list, give its capital."])
    return instruction, ", ".join(c for c, _ in pairs), " ".join(lines)


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "arithmetic": _arithmetic, "word_list": _word_list, "antonyms": _antonyms, "capitals": _capitals,
}


def instruction(rng: random.Random) -> Record:
    """An instruction/answer pair; meta holds instruction, input and output separately for SFT."""
    family = rng.choice(tuple(FAMILIES))
    instr, given, output = FAMILIES[family](rng)
    text = f"Instruction: {instr}\nInput: {given}\nAnswer: {output}"
    return text, {"kind": "instruction", "family": family, "instruction": instr, "input": given, "output": output}


GENERATORS: dict[str, Callable[[random.Random], Record]] = {"story": story, "review": review, "instruction": instruction}


# ------------------------------------------------------------------------------------------ noise
FOREIGN = {
    "de": _p("Am Morgen gehen die Kinder gemeinsam zur Schule, und die Straßen sind noch ruhig.|Der alte Bäcker "
             "öffnet seinen Laden jeden Tag um sechs Uhr.|Im Sommer fahren viele Familien an die Ostsee, um sich "
             "zu erholen.|Die Stadtbibliothek bietet jeden Mittwoch eine Lesestunde für Kinder an.|Nach dem Regen "
             "riecht der Wald nach Moos und feuchter Erde.|Mein Großvater erzählt gern Geschichten aus seiner "
             "Jugend auf dem Land.|Der Zug nach München hatte heute leider zwanzig Minuten Verspätung.|Wir haben "
             "am Wochenende einen Apfelkuchen für die Nachbarn gebacken."),
    "fr": _p("Le matin, les enfants marchent ensemble jusqu'à l'école du village.|La boulangère ouvre sa boutique "
             "tous les jours à six heures.|En été, beaucoup de familles partent en vacances au bord de la mer.|"
             "Après la pluie, la forêt sent la mousse et la terre mouillée.|Mon grand-père aime raconter des "
             "histoires de sa jeunesse à la campagne.|Le train pour Lyon avait malheureusement vingt minutes de "
             "retard.|Nous avons préparé une tarte aux pommes pour nos voisins ce week-end."),
    "es": _p("Por la mañana, los niños caminan juntos hasta la escuela del pueblo.|La panadera abre su tienda "
             "todos los días a las seis.|En verano, muchas familias pasan sus vacaciones cerca del mar.|Después "
             "de la lluvia, el bosque huele a musgo y a tierra mojada.|Mi abuelo disfruta contando historias de "
             "su juventud en el campo.|El tren a Sevilla llegó hoy con veinte minutos de retraso.|Este fin de "
             "semana preparamos una tarta de manzana para los vecinos."),
    # Japanese, not Chinese: Chinese is a language of the corpus (its share comes from synthetic_zh).
    # Eight sentences, as the Chinese list had, so the random stream and every English document
    # stay as they were.
    "ja": _p("朝、子どもたちはいっしょに村の学校まで歩いて行きます。|パン屋の主人は毎朝六時に店を開けます。|"
             "夏になると、たくさんの家族が海辺で休みを過ごします。|雨のあとの森は、こけと土のにおいがします。|"
             "祖父は若いころの田舎の話をするのが好きです。|今日の大阪行きの電車は二十分遅れました。|"
             "週末、私たちは近所の人にりんごのパイを焼きました。|市の図書館では毎週水曜日に子ども向けの読み聞かせがあります。"),
}
SITES = _p("dailynews-online.com|shopwise.net|bestrecipes.org|techgadgets.io|travelnotes.co|citytimes.info")
BOILERPLATE = (  # web page furniture; '|' is part of the text here, so a plain tuple
    "We use cookies to improve your experience on {site}. By continuing to browse, you agree to our use of "
    "cookies.\nAccept all | Reject all | Manage preferences", "Home | About us | Products | Blog | Careers | "
    "Contact | Log in | Sign up", "Click here to subscribe to our newsletter!\nClick here to download the free "
    "guide.", "© {year} {site}. All rights reserved.\nPrivacy Policy | Terms of Use | Sitemap", "Share this "
    "article: Facebook | Twitter | LinkedIn | Email\nRead more >>", "Skip to main content\nMenu\nSearch\nBack "
    "to top", "This page uses JavaScript. Please enable JavaScript in your browser settings and reload the page.")
SPAM = _p("BUY CHEAP WATCHES NOW best prices guaranteed!!!|Make 5000 dollars a week from home, click the link|"
          "Lose ten kilos in ten days with this one weird trick|Limited offer: free shipping on everything today")
SHORT = _p("Thanks!|ok see you then|Page 2 of 7|Loading...|Error 404: page not found|lol same|Back to top|Reply")
SYMBOL_WORDS = _p("#sale|#deal|#win|###|...|#free|#hot|#now|$$$|!!!|#new")
PII_LINES = _p("If you have questions, write to {email} or call {phone}.|The booking was confirmed by "
               "{email} yesterday.|My new number is {phone}, so please update your contacts.|The logs show "
               "that the request came from {ip} at midnight.|Our office printer sits at {ip} on the local "
               "network, and the admin is {email}.")
ACCENTED = _p("We stopped at the café near the station and ordered crème brûlée.|“It’s déjà vu,” she said "
              "with a naïve smile.|Her résumé listed a year in Zürich – and a fiancée in Málaga.")


def _pii(rng: random.Random) -> dict[str, str]:
    """A made-up e-mail address, phone number (several national formats) and IPv4 address."""
    digits = "".join(str(rng.randint(0, 9)) for _ in range(7))
    last = rng.choice(("lopez", "smith", "novak", "chen", "okafor", "berg", "ricci", "tanaka"))
    host = rng.choice(("example.com", "mailbox.org", "post.example.net"))
    phone = rng.choice([f"(415) 555-{digits[:4]}", f"+1 212 555 {digits[:4]}", f"+44 20 7946 {digits[3:]}",
                        f"020 7946 {digits[:4]}", f"555-{digits[:3]}-{digits[3:]}"])
    octets = [rng.choice((10, 172, 192, rng.randint(11, 223))), *(rng.randint(0, 255) for _ in range(2)),
              rng.randint(1, 254)]
    return {"email": f"{rng.choice(NAMES).lower()}.{last}@{host}", "phone": phone, "ip": ".".join(map(str, octets))}


def _insert_sentences(text: str, extra: list[str], rng: random.Random) -> str:
    """Append each sentence to the end of a random paragraph (stories) or the text (reviews)."""
    paragraphs = text.split("\n\n")
    for sentence in extra:
        idx = rng.randrange(len(paragraphs))
        paragraphs[idx] = f"{paragraphs[idx]} {sentence}"
    return "\n\n".join(paragraphs)


def _near_duplicate(text: str, rng: random.Random) -> str:
    """Change one word and add one at the end: Jaccard over 5-word shingles stays near 0.95 for 120+
    words, well above the usual 0.8 dedup threshold even with MinHash estimation error."""
    words = text.split(" ")
    words[rng.randrange(len(words))] = rng.choice(("truly", "really", "quietly", "suddenly", "simply"))
    return " ".join(words) + rng.choice((" Indeed.", " Really.", " Yes.", " Anyway.", " Truly."))


def _noise(kind: str, rng: random.Random, recent: deque[Record]) -> Record:
    """One noisy document of ``kind``; duplicates copy a document from ``recent``."""
    if kind in ("exact_duplicate", "near_duplicate"):
        # near duplicates of long documents only, so a few edits keep them above the dedup threshold
        pool = [r for r in recent if r[0].count(" ") >= 120] if kind == "near_duplicate" else []
        text, meta = rng.choice(pool or list(recent))
        return (text if kind == "exact_duplicate" else _near_duplicate(text, rng)), {**meta, "noise": kind}
    if kind in ("pii", "broken_encoding"):
        # fresh documents (not copies), so only the PII/encoding rule has a reason to act on them
        text, meta = GENERATORS[rng.choice(("story", "review"))](rng)
        if kind == "pii":
            extra = [line.format(**_pii(rng)) for line in rng.sample(PII_LINES, rng.randint(1, 3))]
        else:  # UTF-8 read as Windows-1252: "café" -> "cafÃ©", plus U+FFFD where bytes were lost
            extra = [s.encode("utf-8").decode("cp1252", errors="replace") for s in rng.sample(ACCENTED, 2)]
        return _insert_sentences(text, extra, rng), {**meta, "noise": kind}
    meta = {"kind": "noise", "noise": kind}
    if kind == "non_english":
        lang = rng.choice(tuple(FOREIGN))
        sentences = rng.sample(FOREIGN[lang], rng.randint(4, 6))
        meta["language"] = lang
        return ("" if lang == "ja" else " ").join(sentences), meta
    if kind == "boilerplate":
        blocks = [b.format(site=rng.choice(SITES), year=rng.randint(2015, 2025)) for b in rng.sample(BOILERPLATE, 3)]
        while len(" ".join(blocks).split()) >= 45:  # page furniture alone: under Gopher's 50-word minimum
            blocks.pop()
        return "\n".join(blocks), meta
    if kind == "repetitive_spam":
        return "\n".join([rng.choice(SPAM)] * rng.randint(8, 25)), meta
    if kind == "too_short":
        return rng.choice(SHORT), meta
    if kind == "symbol_heavy":
        words = rng.randint(50, 80)
        return " ".join(rng.choice(SYMBOL_WORDS if rng.random() < 0.4 else NOUNS) for _ in range(words)), meta
    raise ValueError(f"unknown noise kind {kind!r}")


def _apportion(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder)."""
    norm = sum(weights.values())
    exact = {k: total * w / norm for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for key in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: total - sum(counts.values())]:
        counts[key] += 1
    return counts


def check_kinds(kinds: Mapping[str, float], where: str = "kinds") -> None:
    """Raise ConfigError for unknown kinds, negative weights or an all-zero mix."""
    if unknown := sorted(set(kinds) - set(DOC_KINDS)):
        raise ConfigError(f"{where}: unknown kind(s) {', '.join(unknown)} (known: {', '.join(DOC_KINDS)})")
    if any(w < 0 for w in kinds.values()) or sum(kinds.values()) <= 0:
        raise ConfigError(f"{where}: weights must be >= 0 with a positive sum")


def chinese_count(num_docs: int, noise_fraction: float, zh_fraction: float) -> int:
    """Documents of the Chinese share: clean ones plus their noise."""
    clean = round(zh_fraction * num_docs)
    return clean + round(noise_fraction * clean)


def _chinese(num_docs: int, noise_fraction: float, kinds: Mapping[str, float],
             rng: random.Random) -> Generator[Record, None, None]:
    """The Chinese share (:mod:`lmpipe.data.synthetic_zh`): ``num_docs`` clean documents in the
    ``kinds`` mix, each noisy one after a clean one."""
    order = [kind for kind, count in _apportion(num_docs, kinds).items() for _ in range(count)]
    rng.shuffle(order)
    n_noise = round(noise_fraction * num_docs)
    noise_kinds = [synthetic_zh.NOISE_KINDS[i % len(synthetic_zh.NOISE_KINDS)] for i in range(n_noise)]
    rng.shuffle(noise_kinds)
    after = sorted(rng.randrange(num_docs) for _ in range(n_noise))
    recent: deque[Record] = deque(maxlen=256)
    pending = 0
    for idx, kind in enumerate(order):
        record = synthetic_zh.GENERATORS[kind](rng)
        recent.append(record)
        yield record
        while pending < n_noise and after[pending] == idx:
            yield synthetic_zh.noise(noise_kinds[pending], rng, recent)
            pending += 1


def generate(num_docs: int, *, noise_fraction: float = 0.15, kinds: Mapping[str, float] | None = None,
             seed: int = 0, zh_fraction: float = 0.0, entity_fraction: float = 0.0) -> Generator[Record, None, None]:
    """Yield ``num_docs`` clean documents plus ``round(noise_fraction * num_docs)`` noisy ones, and
    a Chinese share of ``round(zh_fraction * num_docs)`` clean documents with their own noise.

    Kinds are mixed exactly in proportion to ``kinds`` (default story 0.5, review 0.3, instruction
    0.2); noise kinds take turns, so all nine appear from nine noisy documents on, each after a clean
    one. Chinese documents come from a random stream of their own, interleaved after English
    ones, so the English documents are the same whatever ``zh_fraction``. Entity documents
    (:mod:`lmpipe.data.synthetic_entity`, ``round(entity_fraction * num_docs)`` of them, tokens and
    IOB2 tags in meta) come the same way from a stream of their own, so neither share changes the
    other documents. Deterministic for ``seed``. Raises ConfigError for a bad ``kinds``.
    """
    kinds = dict(kinds) if kinds is not None else {"story": 0.5, "review": 0.3, "instruction": 0.2}
    check_kinds(kinds)
    zh_rng = random.Random(f"zh:{seed}")
    n_zh_clean = round(zh_fraction * num_docs)
    zh_stream = _chinese(n_zh_clean, noise_fraction, kinds, zh_rng) if n_zh_clean else iter(())
    zh_after = sorted(zh_rng.randrange(num_docs) for _ in range(chinese_count(num_docs, noise_fraction, zh_fraction)))
    zh_next = 0
    entity_rng = random.Random(f"entity:{seed}")
    entity_after = sorted(entity_rng.randrange(num_docs) for _ in range(round(entity_fraction * num_docs)))
    entity_next = 0
    rng = random.Random(seed)
    order = [kind for kind, count in _apportion(num_docs, kinds).items() for _ in range(count)]
    rng.shuffle(order)
    n_noise = round(noise_fraction * num_docs)
    noise_kinds = [NOISE_KINDS[i % len(NOISE_KINDS)] for i in range(n_noise)]
    rng.shuffle(noise_kinds)
    after = sorted(rng.randrange(num_docs) for _ in range(n_noise))  # index of the clean doc each follows
    recent: deque[Record] = deque(maxlen=256)  # originals for duplicates: bounded memory
    pending = 0
    for idx, kind in enumerate(order):
        text, meta = GENERATORS[kind](rng)
        recent.append((text, meta))
        yield text, meta
        while pending < n_noise and after[pending] == idx:
            yield _noise(noise_kinds[pending], rng, recent)
            pending += 1
        while zh_next < len(zh_after) and zh_after[zh_next] == idx:
            yield next(zh_stream)
            zh_next += 1
        while entity_next < len(entity_after) and entity_after[entity_next] == idx:
            yield synthetic_entity.entity(entity_rng)
            entity_next += 1

