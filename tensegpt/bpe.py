"""
Byte-level BPE learned from your own text (prepare.py --tokenizer=bpe --vocab_size=N), the
way GPT-2's merges were learned from web text: cut the text into pieces with a split
pattern (GPT-2's by default: words with their leading space, numbers, punctuation, white
space), start every piece as its UTF-8 bytes (256 tokens that spell any text), then again
and again join the pair of neighbouring tokens that occurs most often into a new token,
until the vocabulary has N tokens (end-of-text included, which is never learned: it is a
special token, kept apart).

train() is the lesson. It counts each distinct piece once, with how often it occurs, and
keeps the count of every pair across all of them; a merge then rewrites only the pieces
that hold the pair and moves only their pairs' counts, instead of counting the whole text
again (what makes it fast enough: reference() below recounts, for the tests). Ties between
equally frequent pairs go to the pair whose ids are smallest, (left, right) compared as a
tuple, so a given text always learns the same merges.

Encoding goes through tiktoken built from the learned ranks (a token's rank is its id), as
GPT-2's does: it joins the neighbouring pair whose bytes make the lowest-ranked token, the
same order the merges were learned in.
"""

import collections
import heapq

import regex
from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN  # GPT-2's split pattern

# a pair seen fewer times than this is not merged: a token for one occurrence only memorises it
MIN_PAIR_COUNT = 2


def pieces(texts, pattern=GPT2_PATTERN):
    """How often each piece of the texts occurs, as UTF-8 bytes: what the merges are learned from."""
    split = regex.compile(pattern)
    counts = collections.Counter()
    for text in texts:
        counts.update(split.findall(text))
    return {piece.encode("utf-8", "surrogatepass"): n for piece, n in counts.items()}


def train(piece_counts, n_merges):
    """
    The merges [(left id, right id)] that build up to n_merges new tokens (ids 256, 257, ...) from single bytes,
    the most frequent pair of neighbours first, until no pair occurs MIN_PAIR_COUNT times. piece_counts: {piece as
    bytes: occurrences}.
    """
    words = [list(piece) for piece in piece_counts]  # each distinct piece as token ids, rewritten as merges come
    freq = list(piece_counts.values())
    pair_count = collections.Counter()  # (left, right) -> occurrences across all pieces
    holders = collections.defaultdict(set)  # (left, right) -> the pieces it occurs in
    for w, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_count[pair] += freq[w]
            holders[pair].add(w)
    # the most frequent pair on top: (-count, pair), entries left stale by later counts are skipped when popped
    heap = [(-n, pair) for pair, n in pair_count.items()]
    heapq.heapify(heap)
    merges, made = [], {bytes([b]): b for b in range(256)}
    spelled = [bytes([b]) for b in range(256)]
    while len(merges) < n_merges and heap:
        count, pair = heapq.heappop(heap)
        if -count != pair_count.get(pair, 0):
            continue
        if -count < MIN_PAIR_COUNT:
            break
        if spelled[pair[0]] + spelled[pair[1]] in made:
            # the bytes of a token learned already, by other parts ("a" + "bc" after "ab" + "c"): a token's bytes are
            # its name in tiktoken's table, so the pair is passed over, and never counted again
            pair_count[pair] = 0
            continue
        new = 256 + len(merges)
        spelled.append(spelled[pair[0]] + spelled[pair[1]])
        made[spelled[new]] = new
        merges.append(pair)
        changed = set()
        for w in holders.pop(pair):
            word, n = words[w], freq[w]
            # this piece's pairs leave the counts, the piece is rewritten, its new pairs come in
            for p in zip(word, word[1:]):
                pair_count[p] -= n
                changed.add(p)
            words[w] = word = merge(word, pair, new)
            for p in zip(word, word[1:]):
                pair_count[p] += n
                holders[p].add(w)
                changed.add(p)
        del pair_count[pair]
        for p in changed - {pair}:
            if pair_count[p] > 0 and spelled[p[0]] + spelled[p[1]] not in made:
                heapq.heappush(heap, (-pair_count[p], p))
    return merges


def merge(word, pair, new):
    """word (token ids) with every occurrence of pair, left to right, replaced by new."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def reference(piece_counts, n_merges):
    """The same merges, every pair counted again before each one: the plain algorithm the tests hold train() to."""
    words = [(list(piece), n) for piece, n in piece_counts.items()]
    merges, spelled = [], [bytes([b]) for b in range(256)]
    for _ in range(n_merges):
        counts = collections.Counter()
        for word, n in words:
            for pair in zip(word, word[1:]):
                if spelled[pair[0]] + spelled[pair[1]] not in spelled:
                    counts[pair] += n
        pair = min(counts, key=lambda p: (-counts[p], p), default=None)
        if pair is None or counts[pair] < MIN_PAIR_COUNT:
            break
        merges.append(pair)
        spelled.append(spelled[pair[0]] + spelled[pair[1]])
        words = [(merge(word, pair, 255 + len(merges)), n) for word, n in words]
    return merges


def token_bytes(merges):
    """Each token's bytes, in id order: the 256 single bytes, then what each merge made."""
    tokens = [bytes([b]) for b in range(256)]
    for left, right in merges:
        tokens.append(tokens[left] + tokens[right])
    return tokens
