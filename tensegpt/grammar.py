"""
The grammar of tense.txt: subjects, verbs with their five forms and objects, the twelve
tenses and the time phrases that agree with each, and the two things built from them:
sentence() makes a sentence, parse() reads one back (eval.py checks the model's
sentences with it). make_tense.py writes tense.txt from these tables.
"""

import random

# (text at the start of a sentence, person, kind). person: 1s, 2, 3s, 1p, 3p.
# kind decides which verbs make sense: a baby does not drive a bus.
SUBJECTS = [
    ("I", "1s", "adult"),
    ("You", "2", "adult"),
    ("He", "3s", "adult"),
    ("She", "3s", "adult"),
    ("We", "1p", "adult"),
    ("They", "3p", "adult"),
    ("The baby", "3s", "baby"),
    ("My sister", "3s", "adult"),
    ("My brother", "3s", "adult"),
    ("Our teacher", "3s", "adult"),
    ("The doctor", "3s", "adult"),
    ("My father", "3s", "adult"),
    ("My mother", "3s", "adult"),
    ("Tom", "3s", "adult"),
    ("Anna", "3s", "adult"),
    ("The children", "3p", "child"),
    ("The boy", "3s", "child"),
    ("The girl", "3s", "child"),
    ("My friends", "3p", "adult"),
    ("The students", "3p", "child"),
    ("My parents", "3p", "adult"),
    ("The dog", "3s", "dog"),
    ("The cat", "3s", "cat"),
    ("The birds", "3p", "bird"),
]
NAMES = {"I", "Tom", "Anna"}  # keep their capital letter inside a question

# base, third person singular, past, past participle, -ing; then the objects or
# phrases that follow it; then who may do it.
ALL = {"adult", "child", "baby", "dog", "cat", "bird"}
PEOPLE = {"adult", "child"}
VERBS = [
    ("eat eats ate eaten eating", ["an apple", "breakfast", "dinner", "some bread", "the cake"], ALL),
    ("drink drinks drank drunk drinking", ["some milk", "a glass of water", "the juice"], ALL),
    ("sleep sleeps slept slept sleeping", ["in the bedroom", "on the sofa", "in the garden"], ALL),
    ("play plays played played playing", ["with a ball", "in the garden", "with the toys"], ALL),
    ("cry cries cried cried crying", ["in the car", "at night", "loudly"], {"baby", "child"}),
    (
        "laugh laughs laughed laughed laughing",
        ["at the clown", "at the joke", "loudly"],
        {"baby", "adult", "child"},
    ),
    (
        "run runs ran run running",
        ["in the park", "to the station", "along the river"],
        {"adult", "child", "dog", "cat"},
    ),
    (
        "swim swims swam swum swimming",
        ["in the lake", "in the pool", "across the river"],
        {"adult", "child", "dog"},
    ),
    (
        "walk walks walked walked walking",
        ["to school", "in the park", "to the shop"],
        {"adult", "child", "dog"},
    ),
    ("read reads read read reading", ["a book", "the newspaper", "a letter", "a story"], PEOPLE),
    ("write writes wrote written writing", ["a letter", "an email", "a story", "a poem"], PEOPLE),
    ("watch watches watched watched watching", ["a film", "the news", "a football match"], PEOPLE),
    ("cook cooks cooked cooked cooking", ["dinner", "some soup", "pasta", "a big meal"], {"adult"}),
    ("clean cleans cleaned cleaned cleaning", ["the kitchen", "the windows", "the car", "the room"], PEOPLE),
    ("wash washes washed washed washing", ["the dishes", "the car", "the clothes"], PEOPLE),
    ("paint paints painted painted painting", ["the fence", "a picture", "the wall"], PEOPLE),
    ("build builds built built building", ["a house", "a sandcastle", "a bridge", "a treehouse"], PEOPLE),
    ("buy buys bought bought buying", ["a new car", "some bread", "a present", "new shoes"], {"adult"}),
    ("sing sings sang sung singing", ["a song", "in the choir", "at the concert"], PEOPLE | {"bird"}),
    ("draw draws drew drawn drawing", ["a picture", "a map", "a cat"], PEOPLE),
    ("drive drives drove driven driving", ["the car", "a bus", "to work"], {"adult"}),
    ("study studies studied studied studying", ["for the exam", "history", "mathematics"], PEOPLE),
    ("learn learns learned learned learning", ["English", "to swim", "a new song"], PEOPLE),
    ("speak speaks spoke spoken speaking", ["to the manager", "French", "on the phone"], {"adult"}),
    ("teach teaches taught taught teaching", ["the children", "a new class", "mathematics"], {"adult"}),
    ("make makes made made making", ["a cake", "a cup of tea", "a mistake", "a kite"], PEOPLE),
    ("fix fixes fixed fixed fixing", ["the bike", "the roof", "the computer"], {"adult"}),
    ("visit visits visited visited visiting", ["the museum", "our grandparents", "the zoo"], PEOPLE),
    ("carry carries carried carried carrying", ["the bags", "a heavy box", "the shopping"], PEOPLE),
    ("feed feeds fed fed feeding", ["the cat", "the ducks", "the fish"], PEOPLE),
    ("find finds found found finding", ["the keys", "a wallet", "the answer"], PEOPLE),
    ("lose loses lost lost losing", ["the keys", "the game", "an umbrella"], PEOPLE),
    ("take takes took taken taking", ["the bus", "a photo", "the train"], PEOPLE),
    ("do does did done doing", ["the homework", "the shopping", "the laundry"], PEOPLE),
    ("have has had had having", ["lunch", "a shower", "a party"], PEOPLE),
    ("dance dances danced danced dancing", ["at the party", "in the kitchen", "with a friend"], PEOPLE),
    ("work works worked worked working", ["at the office", "in the garden", "at the hospital"], {"adult"}),
    ("travel travels traveled traveled traveling", ["to Paris", "by train", "around the world"], {"adult"}),
    ("chase chases chased chased chasing", ["the ball", "a squirrel", "its tail"], {"dog", "cat"}),
    ("bark barks barked barked barking", ["at the postman", "at the door", "all the time"], {"dog"}),
]

# Time phrases that agree with each tense. Perfect tenses take completion or duration phrases.
TIMES = {
    "present simple": [
        "every day",
        "every morning",
        "on Sundays",
        "twice a week",
        "every weekend",
        "after school",
    ],
    "past simple": ["yesterday", "last night", "last week", "two days ago", "last summer", "in 2019"],
    "future simple": ["tomorrow", "next week", "next month", "soon", "on Friday"],
    "present continuous": ["now", "right now", "at the moment", "today"],
    "past continuous": [
        "at eight o'clock last night",
        "when the phone rang",
        "all afternoon yesterday",
        "when we arrived",
    ],
    "future continuous": [
        "at this time tomorrow",
        "at noon tomorrow",
        "all day next Saturday",
        "when you arrive",
    ],
    "present perfect": ["recently", "this week", "today", "many times", "twice this month"],
    "past perfect": [
        "before the guests arrived",
        "by the time we got home",
        "by last Friday",
        "before the storm",
    ],
    "future perfect": ["by tomorrow", "by next week", "by the end of the day", "by the time you arrive"],
    "present perfect continuous": ["for two hours", "since this morning", "all day", "for a long time"],
    "past perfect continuous": [
        "for an hour before dinner",
        "for two hours when we arrived",
        "for a long time before the rain",
    ],
    "future perfect continuous": [
        "for three hours by noon",
        "for a year by next June",
        "for two hours by the time you arrive",
    ],
}
TENSES = list(TIMES)


def be(person, past):
    if past:
        return "was" if person in ("1s", "3s") else "were"
    return {"1s": "am", "3s": "is"}.get(person, "are")


def sentence(subject, person, verb, obj, tense, form, time, time_first=False):
    """Returns one sentence. form is 'affirmative', 'negative' or 'question'."""
    base, third, past, participle, ing = verb.split()
    s3 = person == "3s"
    # Each tense as (auxiliary chain, main verb form); an empty chain means the verb
    # itself carries the tense in the affirmative ("She eats", "She ate").
    table = {
        "present simple": ([], third if s3 else base, "does" if s3 else "do"),
        "past simple": ([], past, "did"),
        "future simple": (["will"], base, None),
        "present continuous": ([be(person, False)], ing, None),
        "past continuous": ([be(person, True)], ing, None),
        "future continuous": (["will", "be"], ing, None),
        "present perfect": (["has" if s3 else "have"], participle, None),
        "past perfect": (["had"], participle, None),
        "future perfect": (["will", "have"], participle, None),
        "present perfect continuous": (["has" if s3 else "have", "been"], ing, None),
        "past perfect continuous": (["had", "been"], ing, None),
        "future perfect continuous": (["will", "have", "been"], ing, None),
    }
    aux, main, do_support = table[tense]
    if not aux and form != "affirmative":
        aux, main = [do_support], base  # "She does not eat", "Did she eat?"
    inner = subject if subject.split()[0] in NAMES else subject[0].lower() + subject[1:]  # inside a sentence
    if form == "question":
        words = [aux[0].capitalize(), inner, *aux[1:], main]
    elif form == "negative":
        words = [subject, aux[0], "not", *aux[1:], main]
    else:
        words = [subject, *aux, main]
    if time and time_first and form != "question":
        return f"{time[0].upper()}{time[1:]}, {' '.join([inner, *words[1:], obj])}."
    text = " ".join(w for w in (*words, obj, time) if w)
    return text + ("?" if form == "question" else ".")


def most_sentences():
    """
    The most distinct sentences generate() draws quickly: every tense gets an equal share,
    so twelve times half of what the smallest tense can make (each statement with no time
    phrase or one of its phrases, first or last; each question with none or one, last).
    """
    can_do = {kind: [v for v in VERBS if kind in v[2]] for _, _, kind in SUBJECTS}
    cores = sum(len(objects) for _, _, kind in SUBJECTS for _, objects, _ in can_do[kind])
    smallest = min(cores * (2 * (1 + 2 * len(TIMES[t])) + 1 + len(TIMES[t])) for t in TENSES)
    return len(TENSES) * (smallest // 2)


def generate(n, seed, time_first=0.7, siblings=0.0):
    """
    n distinct sentences, shuffled. siblings: the share of sentences followed by a sibling,
    the same subject, verb and object in another tense (with its own form and time phrase):
    text in which the next line often repeats words of the last one, so a model trained on
    it learns to copy from its context (docs/preparing-data.md: what that buys chat
    fine-tuning).
    """
    rng = random.Random(seed)
    seen, groups, count = set(), [], 0
    # Sample combinations until n distinct sentences; every tense and form is drawn
    # uniformly so all twelve tenses get the same share of the data.
    can_do = {kind: [v for v in VERBS if kind in v[2]] for _, _, kind in SUBJECTS}
    while count < n:
        # every subject an equal share, with a verb it can do: the dog's 5 verbs are seen as
        # often as an adult's 36, so the model learns what a dog does not do
        subject, person, kind = rng.choice(SUBJECTS)
        verb, objects, who = rng.choice(can_do[kind])
        tense = TENSES[count % len(TENSES)]
        form = rng.choice(["affirmative", "affirmative", "negative", "question"])
        obj = rng.choice(objects)
        time = rng.choice(TIMES[tense]) if rng.random() < 0.8 else ""
        text = sentence(subject, person, verb, obj, tense, form, time, time_first=rng.random() < time_first)
        if text in seen:
            continue
        seen.add(text)
        group, count = [text], count + 1
        if siblings and count < n and rng.random() < siblings:
            # the next tense in turn: another tense than its sentence's, and the shares stay equal
            tense = TENSES[count % len(TENSES)]
            form = rng.choice(["affirmative", "affirmative", "negative", "question"])
            time = rng.choice(TIMES[tense]) if rng.random() < 0.8 else ""
            text = sentence(subject, person, verb, obj, tense, form, time, time_first=rng.random() < time_first)
            if text not in seen:
                seen.add(text)
                group, count = group + [text], count + 1
        groups.append(group)
    # no pattern in the order (the tenses were drawn in turn); a sibling stays after its sentence
    rng.shuffle(groups)
    return [text for group in groups for text in group]


PHRASE_TENSES = {}  # time phrase -> the tenses it agrees with ("today": present continuous and perfect)
for _tense, _phrases in TIMES.items():
    for _phrase in _phrases:
        PHRASE_TENSES.setdefault(_phrase, set()).add(_tense)


def cores(lowercase=False):
    """
    {sentence without its time phrase and final mark: [(subject, kind, verb base, tense, form, object), ...]}
    for every subject, verb, object, tense and form (a list: "They read a book" is present and past),
    whether or not that subject may do that
    verb (a sentence where it may not is grammatical, and wrong about the world). Statements
    are there twice: as they start a sentence, and as they follow "Yesterday, ".
    lowercase: keys in lower case, for a word-level model's text.
    """
    table = {}
    for subject, person, kind in SUBJECTS:
        for verb, objects, _ in VERBS:
            for obj in objects:
                for tense in TENSES:
                    for form in ("affirmative", "negative", "question"):
                        info = (subject, kind, verb.split()[0], tense, form, obj)
                        keys = [sentence(subject, person, verb, obj, tense, form, "")[:-1]]
                        if form != "question":  # the core after a leading time phrase: "the baby ate an apple"
                            keys.append(sentence(subject, person, verb, obj, tense, form, "now", time_first=True)[5:-1])
                        for key in keys:
                            table.setdefault(key.lower() if lowercase else key, []).append(info)
    return table


WHO = {verb.split()[0]: who for verb, _, who in VERBS}


def parse(text, table, lowercase=False):
    """
    What a sentence is by this grammar, or None if the grammar cannot make it:
    {"tense", "form", "time" (the phrase or ""), "time_first", "agrees" (the time phrase fits
    the tense, or there is none), "sensible" (the subject may do the verb)}. table is cores(lowercase).
    """
    if lowercase:
        text = text.lower()
    if not text.endswith((".", "?")):
        return None
    question, body, time, first = text.endswith("?"), text[:-1], "", False
    for phrase in PHRASE_TENSES:
        said = phrase.lower() if lowercase else phrase
        lead = f"{said}, " if lowercase else f"{said[0].upper()}{said[1:]}, "
        if not question and body.startswith(lead) and body[len(lead) :] in table:
            body, time, first = body[len(lead) :], phrase, True
            break
        if body.endswith(" " + said) and body[: -len(said) - 1] in table and len(said) > len(time):
            time = phrase  # the longest phrase that leaves a sentence: "last night", not "night"
    if time and not first:
        body = body[: -len(time) - 1]
    readings = [r for r in table.get(body, []) if (r[4] == "question") == question]
    if not readings or (first and body[0].isupper() and body.split()[0] not in NAMES):
        return None  # not a sentence of the grammar, a question without "?", or "Yesterday, The baby ..."
    # of two readings ("They read a book": present or past), the one the time phrase agrees with
    subject, kind, verb, tense, form, obj = next(
        (r for r in readings if time and r[3] in PHRASE_TENSES[time]), readings[0]
    )
    return {
        "tense": tense,
        "form": form,
        "time": time,
        "time_first": first,
        "agrees": not time or tense in PHRASE_TENSES[time],
        "sensible": kind in WHO[verb],
    }
