"""
The chat task set that make_tense.py --task=chat writes: instructions about tense.txt's grammar (rewrite a
sentence into a named tense, name its tense, make it negative or a question, a second turn about the first
answer, and a fixed reply to anything else), each with exactly one right answer.

A request is a frame, the wording pattern that says what to do ("convert {x} to the {tense}"), dressed in a
style drawn apart from it: where the sentence stands (after a colon, quoted inside the request, before it or on
the next line), politeness ("please", "could you ...?"), capitalisation, the final mark, "the past simple" or
"the Past Simple tense". A phrasing family is one frame. HELD_OUT names the families that only the held-out
file uses, in every style: eval.py compares the answers to requests worded as in training with the answers to
requests worded in ways training never showed, which is the difference between learning the instructions and
learning the templates.
"""

import functools
import itertools
import random
import re

from tensegpt.grammar import SUBJECTS, TENSES, TIMES, VERBS, parse, sentence

# task -> {family: frame}. {x} is the sentence (quoted) or a word that points at it; {tense} the tense asked
# for. A frame that ends in "?" is a question, in "!" or "." a greeting or a fragment; the others are imperatives.
FRAMES = {
    "rewrite": {
        "rewrite": "rewrite {x} in the {tense}",
        "put": "put {x} into the {tense}",
        "change": "change {x} to the {tense}",
        "say": "say {x} in the {tense}",
        "write": "write {x} in the {tense}",
        "turn": "turn {x} into the {tense}",
        "how-would": "how would {x} sound in the {tense}?",
        "make": "make {x} {tense}",
        "give": "give me {x} in the {tense}",
        "restate": "restate {x} in the {tense}",
        "need": "I need {x} in the {tense}",
        "use": "use the {tense} for {x}",
        "what-would": "what would {x} be in the {tense}?",
        "switch": "switch {x} to the {tense}",
        "how-does": "how does {x} look in the {tense}?",
        "convert": "convert {x} to the {tense}",
        "express": "express {x} in the {tense}",
        "what-is": "what is {x} in the {tense}?",
        "any-verb": "{recast} {x} in the {tense}",
    },
    "name": {
        "what-tense": "what tense is {x}?",
        "which-used": "which tense is used in {x}?",
        "name": "name the tense of {x}",
        "tell": "tell me the tense of {x}",
        "what-is": "what is the tense of {x}?",
        "in-which": "in which tense is {x} written?",
        "which-in": "which tense is {x} in?",
        "tell-which": "tell me which tense {x} uses",
        "determine": "determine the tense of {x}",
        "whats": "what's the tense of {x}?",
        "does-have": "what tense does {x} have?",
        "did-use": "which tense did I use in {x}?",
        "has-been": "which tense has been used in {x}?",
        "identify": "identify the tense of {x}",
        "which-does": "which tense does {x} use?",
        "any-verb": "{find} the tense of {x}",
    },
    "negative": {
        "make": "make {x} negative",
        "negate": "negate {x}",
        "turn": "turn {x} into a negative sentence",
        "put": "put {x} in the negative",
        "rewrite": "rewrite {x} as a negative sentence",
        "opposite": 'say the opposite of {x} with "not"',
        "write": "write {x} in the negative",
        "add-not": 'add "not" to {x}',
        "how-would": "how would {x} sound as a negative?",
        "what-would": "what would {x} be in the negative?",
        "how-does": "how does {x} look in the negative?",
        "negative-version": "the negative version of {x}, please.",
        "give": "give me the negative of {x}",
        "what-is": "what is the negative of {x}?",
        "form": "form the negative of {x}",
        "any-verb": "{recast} {x} in the negative",
    },
    "question": {
        "turn": "turn {x} into a question",
        "make": "make {x} a question",
        "ask": "ask {x} as a question",
        "yes-no": "make a yes/no question from {x}",
        "rewrite": "rewrite {x} as a question",
        "form": "form a question from {x}",
        "say": "say {x} as a question",
        "how-ask": "how would you ask {x}?",
        "put": "put {x} in question form",
        "what-would": "what would {x} be as a question?",
        "how-does": "how does {x} look as a question?",
        "question-version": "the question version of {x}, please.",
        "convert": "convert {x} to a question",
        "change": "change {x} into a question",
        "what-is": "what is the question form of {x}?",
        "any-verb": "{recast} {x} as a question",
    },
    # a second turn about the first answer ("it"): into another tense, or negative, or a question
    "follow-up": {
        "now-put": "now put it into the {tense}",
        "and-in": "and in the {tense}?",
        "now-the": "now the {tense}, please.",
        "same": "the same sentence in the {tense}.",
        "how-about": "how about the {tense}?",
        "and-now": "and now the {tense}?",
        "next": "next, the {tense}.",
        "again": "again, but in the {tense}",
        "change-it": "now change it to the {tense}",
        "negative-please": "the negative, please.",
        "question-please": "as a question, please.",
        "now-make-question": "now make it a question",
        "do": "do the {tense} now",
        "switch": "switch to the {tense}",
        "go-with": "go with the {tense} this time",
        "lets-see": "let's see the {tense}",
        "and-what": "and what would it be in the {tense}?",
        "show": "show me the {tense}",
        "make-it": "make it {tense}",
        "redo": "redo it in the {tense}",
        "now-make-negative": "now make it negative",
        "now-negate": "now negate it",
        "now-question": "now turn it into a question",
        "now-ask": "now ask it as a question",
        "what-about": "what about the {tense}?",
        "try": "try the {tense}",
        "and-negative": "and the negative?",
        "and-question": "and as a question?",
    },
    # anything else gets REFUSAL; {place}, {thing}, ... are drawn from FILL
    "off-task": {
        "greeting": "{greeting}!",
        "capital": "what is the capital of {place}?",
        "sum": "what is {a} plus {b}?",
        "joke": "tell me a joke about {thing}",
        "poem": "write a poem about {thing}",
        "translate": "translate {x} into {language}",
        "longer": "make {x} longer",
        "who": "who are you?",
        "times": "what is {a} times {b}?",
        "shorter": "make {x} shorter",
        "story": "tell me a story about {thing}",
        "your-name": "what is your name?",
        "thanks": "thank you!",
        "in-language": "what is {x} in {language}?",
        "count": "count the words in {x}",
        "spell": "spell {x} backwards",
        "explain": "explain {x}",
        "paraphrase": "paraphrase {x}",
        "repeat": "repeat {x}",
        "correct": "correct the spelling of {x}",
        "weather": "what is the weather like in {place}?",
        "author": "who wrote {book}?",
        "summarize": "summarize {x}",
        "how-are-you": "how are you today?",
        "any-verb": "{other} {x}",
    },
}
# The families that only the held-out file uses: each shares words with what training shows ("convert" asks
# for a question there, "what is the ... of" for a tense's name) but never its wording.
HELD_OUT = {
    "rewrite": {"convert", "express", "what-is"},
    "name": {"identify", "which-does"},
    "negative": {"give", "what-is", "form"},
    "question": {"change", "what-is"},
    "follow-up": {"what-about", "try", "and-negative", "and-question"},
    "off-task": {"weather", "author", "summarize", "how-are-you"},
}
FILL = {
    "greeting": ["hello", "hi", "hi there", "good morning", "hey"],
    "place": ["France", "Japan", "Brazil", "Canada", "Egypt", "Spain", "Kenya", "Peru"],
    "thing": ["cats", "the sea", "winter", "music", "robots", "the moon"],
    "language": ["French", "German", "Spanish", "Italian"],
    "book": ["Hamlet", "Don Quixote", "War and Peace", "Pride and Prejudice"],
    "a": [str(n) for n in range(2, 20)],
    "b": [str(n) for n in range(2, 20)],
    # verbs that any-verb frames lead with: the task is in the rest of the request ("in the past simple", "the
    # tense of", "as a question"), so the model learns to read that, not a list of verbs. No word of a held-out
    # family is among them.
    "recast": "recast, rephrase, reword, redo, render, present, cast, phrase, place, set, shift, move, transform, "
    "adapt, bring, reshape, send, read out, print, show".split(", "),
    "find": "find, state, spot, check, work out, figure out, recognize, classify, detect, report, confirm, point out, "
    "guess, look up, write down, note, reveal, tell, say, show me".split(", "),
    "other": "analyze, describe, memorize, illustrate, sing, shout, draw, copy, underline, highlight, reverse, sort, "
    "encrypt, review, rate, criticize, praise, whisper, post, sketch".split(", "),
}
# the follow-ups that ask for a form rather than a tense
FOLLOW_UP_FORMS = {f: "negative" for f in ("now-make-negative", "now-negate", "negative-please", "and-negative")}
FOLLOW_UP_FORMS.update(
    {f: "question" for f in ("now-question", "now-ask", "question-please", "now-make-question", "and-question")}
)
REFUSAL = "I can only rewrite, negate, question or name the tense of English sentences."
SYSTEM = "You rewrite English sentences exactly as asked."
# the tasks in the shares make_tense.py writes them (off-task replies are one in eleven)
TASK_CYCLE = ["rewrite", "name", "negative", "question", "two-turn"] * 2 + ["off-task"]
TASKS = list(dict.fromkeys(TASK_CYCLE))

# ----------------------------------------------------------------------------- styles

# where the sentence stands, and the words that point at it from the request
POINTERS = {
    "colon": ["this sentence", "this", "the following sentence"],
    "newline": ["this sentence", "the following sentence"],
    "before": ["it", "this sentence", "that"],
    "quoted": ['"{s}"'],
}
# imperatives only; "{}" is the frame. The ones that ask end in "?"
POLITE = [
    "{}",
    "please {}",
    "{}, please",
    "could you {}?",
    "can you {}?",
    "would you {}?",
    "will you {}?",
    "I'd like you to {}",
]
TENSE_WORDS = ["{tense}", "{tense} tense", "{Tense}"]


def wrappers(frame):
    """The politeness a frame takes: an imperative any of POLITE, a question, greeting or fragment none."""
    return ["{}"] if frame.endswith(("?", "!", ".")) else POLITE


def marks(frame, how):
    """The final marks a request may end with, each with how often random_style draws it."""
    if frame.endswith("?") or how.endswith("?"):
        return {"?": 0.85, "": 0.15}
    return {".": 0.75, "!": 0.1, "": 0.15}


def styles(frame):
    """Every style a frame can be dressed in: (placement, pointer, politeness, capital, tense words, mark)."""
    placements = list(POINTERS) if "{x}" in frame else [None]
    for placement, how, capital, tense_words in itertools.product(
        placements, wrappers(frame), (True, False), TENSE_WORDS
    ):
        for pointer in POINTERS[placement] if placement else [None]:
            for mark in marks(frame, how):
                yield placement, pointer, how, capital, tense_words, mark


def random_style(rng, frame):
    """One style, drawn with the common ones more often: a capital letter, a full stop, the plain tense name."""
    placement = rng.choice(list(POINTERS)) if "{x}" in frame else None
    pointer = rng.choice(POINTERS[placement]) if placement else None
    polite = wrappers(frame)
    how = "{}" if len(polite) == 1 or rng.random() < 0.5 else rng.choice(polite[1:])
    mark_weights = marks(frame, how)
    mark = rng.choices(list(mark_weights), list(mark_weights.values()))[0]
    tense_words = rng.choices(TENSE_WORDS, [0.6, 0.25, 0.15])[0]
    return placement, pointer, how, rng.random() < 0.85, tense_words, mark


def request(frame, style, s="", tense="", fill=None):
    """The text of a request: frame in style, about sentence s (with its final mark), asking for tense."""
    placement, pointer, how, capital, tense_words, mark = style
    words = tense_words.format(tense=tense, Tense=tense.title())
    body = frame.rstrip("?!.").format(x=(pointer or "").format(s=s), tense=words, **(fill or {}))
    body = how.format(body).rstrip("?")
    body = (body[0].upper() if capital else body[0].lower()) + body[1:]
    if placement == "colon":
        return f"{body}{mark if mark == '?' else ':'} {s}"
    if placement == "newline":
        return f"{body}{mark if mark == '?' else ':'}\n{s}"
    if placement == "before":
        return f"{s} {body}{mark}"
    return body + mark


# ----------------------------------------------------------------------------- conversations


def core_list():
    """Every (subject, person, verb, object) whose subject may do the verb: what a sentence is about."""
    return [
        (subject, person, verb, obj)
        for subject, person, kind in SUBJECTS
        for verb, objects, who in VERBS
        if kind in who
        for obj in objects
    ]


def is_val_core(core, seed, val_fraction):
    """Whether a core belongs to the held-out instructions: a seeded choice, the same in every tense."""
    return random.Random(f"{seed}:{core}").random() < val_fraction


def reads_as_one_tense(core, tense, form, time=""):
    """
    Whether the sentence reads as its tense only. "They read a book." is present and past simple: naming it, or
    making it negative, has two right answers. "They read a book yesterday." is past simple only.
    """
    return len(readings(core, form, time)[sentence(*core, tense, form, time)]) == 1


@functools.cache
def readings(core, form, time):
    """{sentence: the tenses it reads as} of a core in a form, with a time phrase (in the tenses it agrees with)."""
    found = {}
    for tense in TENSES:
        if not time or time in TIMES[tense]:
            found.setdefault(sentence(*core, tense, form, time), set()).add(tense)
    return found


def families(task, held_out):
    """The families of a task that the held-out file (held_out True) or the training file uses."""
    return sorted(f for f in FRAMES[task] if (f in HELD_OUT[task]) == held_out)


def conversation(rng, core, task, held_out=False):
    """
    One conversation of a task about a core, as {"messages", "task", "family", "phrasing"}: every answer the
    only right one. held_out: its wording comes from the held-out families.
    """
    subject, person, verb, obj = core

    def say(tense, form, time=""):
        return sentence(subject, person, verb, obj, tense, form, time)

    def ask(kind, allowed=lambda family: True, **slots):
        family = rng.choice([f for f in families(kind, held_out) if allowed(f)])
        frame = FRAMES[kind][family]
        fill = {key: rng.choice(values) for key, values in FILL.items()}
        return family, request(frame, random_style(rng, frame), fill=fill, **slots)

    # a sentence that reads as no other tense (tests/test_instructions.py walks them all)
    tense = rng.choice([t for t in TENSES if reads_as_one_tense(core, t, "affirmative")])
    if task == "off-task":
        family, text = ask("off-task", s=say(tense, "affirmative"))
        messages = [("user", text), ("assistant", REFUSAL)]
    elif task == "name":
        form = rng.choice(["affirmative", "negative", "question"])
        times = lambda t: TIMES[t] if with_time else [""]
        with_time = rng.random() < 0.5
        tense, time = rng.choice([(t, p) for t in TENSES for p in times(t) if reads_as_one_tense(core, t, form, p)])
        family, text = ask("name", s=say(tense, form, time))
        messages = [("user", text), ("assistant", tense)]
    elif task in ("negative", "question"):
        family, text = ask(task, s=say(tense, "affirmative"))
        messages = [("user", text), ("assistant", say(tense, task))]
    else:  # rewrite, and two-turn: a rewrite, then a second request about its answer
        form = rng.choice(["affirmative", "affirmative", "negative", "question"])
        target = rng.choice([t for t in TENSES if t != tense])
        family, text = ask("rewrite", s=say(tense, form), tense=target)
        messages = [("user", text), ("assistant", say(target, form))]
        if task == "two-turn":
            # another tense; or negative or a question, which only an affirmative answer can still become
            second = rng.choice([t for t in TENSES if t != target])
            another_tense = lambda family: (
                family not in FOLLOW_UP_FORMS or (form == "affirmative" and reads_as_one_tense(core, target, form))
            )
            follow, text = ask("follow-up", another_tense, tense=second)
            wants = FOLLOW_UP_FORMS.get(follow)
            messages += [("user", text), ("assistant", say(target, wants) if wants else say(second, form))]
            family = f"{family} + {follow}"
    if rng.random() < 0.2:
        messages = [("system", SYSTEM), *messages]
    return {
        "messages": [{"role": role, "content": content} for role, content in messages],
        "task": task,
        "family": family,
        "phrasing": "held-out" if held_out else "seen",
    }


def instructions(n, seed, val_fraction=0.1):
    """
    (train, val) conversations. No val core (subject, verb, object) is in train, in any tense, and no train
    conversation is worded by a held-out family; half of val is worded as training is, half by held-out families.
    """
    rng = random.Random(seed)
    cores = core_list()
    held_out = {c for c in cores if is_val_core(c, seed, val_fraction)}
    pools = {"train": [c for c in cores if c not in held_out], "val": sorted(held_out)}
    out = {"train": [], "val": []}
    for i in range(n):
        split = "val" if rng.random() < val_fraction else "train"
        unseen = split == "val" and len(out["val"]) % 2 == 1
        task = TASK_CYCLE[i % len(TASK_CYCLE)]
        out[split].append(conversation(rng, rng.choice(pools[split]), task, held_out=unseen))
    return out["train"], out["val"]


def held_out_frames():
    """{task: the frames of its held-out families}: what eval.py names as held out."""
    return {task: [FRAMES[task][f] for f in sorted(families)] for task, families in HELD_OUT.items()}


def family_pattern(task, family):
    """A regular expression that finds the family's wording in a request, whatever its style and sentence."""
    frame = FRAMES[task][family].rstrip("?!.")
    pointers = "|".join(re.escape(p) for p in sorted({p for ps in POINTERS.values() for p in ps} - {'"{s}"'}))
    tenses = "|".join(re.escape(t) for t in TENSES)
    slots = {"x": f'(?:{pointers}|"[^"]+")', "tense": f"(?:{tenses})(?: tense)?"}
    slots.update({key: "(?:" + "|".join(re.escape(v) for v in values) + ")" for key, values in FILL.items()})
    pieces = re.split(r"(\{\w+\})", frame)
    text = "".join(slots[p[1:-1]] if p.startswith("{") else re.escape(p) for p in pieces)
    return re.compile(r"(?<!\w)" + text + r"(?!\w)", re.IGNORECASE)


def tense_asked(messages, table):
    """The tense of the last answer a conversation asks for (for 'name', the tense it names); 'other' if none."""
    last = messages[-1]["content"]
    if last in TENSES:
        return last
    parsed = parse(last, table)
    return parsed["tense"] if parsed else "other"
