import random
import re

import tiktoken_ext.openai_public
from helpers import tense_lines

from tensegpt import tokenizer as tok


def test_gpt2_ids_match_known_values():
    enc = tok.gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("hello") == [31373]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode_ordinary("\n") == [198]
    assert enc.encode_ordinary("!") == [0]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    # encode_ordinary treats a typed special token as text
    assert tok.GPT2().encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]


def test_hashes_are_the_ones_tiktoken_expects():
    source = open(tiktoken_ext.openai_public.__file__).read()
    gpt2_body = source[source.index("def gpt2():") : source.index("def r50k_base")]
    assert re.findall(r'vocab_bpe_hash="([0-9a-f]+)"', gpt2_body) == [tok.VOCAB_BPE_SHA256]
    assert re.findall(r'encoder_json_hash="([0-9a-f]+)"', gpt2_body) == [tok.ENCODER_JSON_SHA256]


def test_single_byte_tokens_cover_every_byte():
    ids = tok.single_byte_ids()
    assert sorted(ids) == list(range(256))
    enc = tok.gpt2_encoding()
    assert all(enc.decode_single_token_bytes(i) == bytes([b]) for b, i in enumerate(ids))


def random_texts(n, seed=0):
    rng = random.Random(seed)
    alphabet = "abcXYZ  \n\t.,'!?0123456789éßж東京🙂\u200b"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def test_compact_round_trips_any_text_exactly():
    compact = tok.CompactGPT2.from_used_ids(tok.gpt2_encoding().encode_ordinary("The baby is sleeping."))
    texts = random_texts(200) + ["Zyzzyva xylophones quixotically", "<|endoftext|>", ""]
    for text in texts:
        ids = compact.encode(text)
        assert all(0 <= i < compact.vocab_size - 1 for i in ids)  # never end-of-text (the last id)
        assert compact.decode(ids) == text
    assert compact.eot == compact.vocab_size - 1 and compact.decode([compact.eot]) == "<|endoftext|>"


def test_compact_is_closed_under_merges_and_encodes_the_corpus_exactly_as_gpt2():
    gpt2 = tok.GPT2()
    corpus = tense_lines(3000)
    compact = tok.CompactGPT2.from_used_ids([i for line in corpus for i in gpt2.encode(line)])
    # "The baby is sleeping." alone: the 256 bytes, end-of-text, The, baby, is, sleeping, and the
    # tokens GPT-2's merges pass through to build them ("he" for "The", " sle" for " sleeping", ...)
    small = tok.CompactGPT2.from_used_ids(gpt2.encode("The baby is sleeping."))
    pieces = {gpt2.enc.decode_single_token_bytes(g) for g in small.gpt2_ids if g != tok.GPT2_EOT}
    assert {b"The", b" baby", b" is", b" sleeping", b"he", b" b", b"aby", b" sle", b" sleep"} <= pieces
    assert len(pieces) == 256 + 16
    # closed: every kept token's whole merge tree is kept
    ranks = gpt2.enc._mergeable_ranks
    kept = {gpt2.enc.decode_single_token_bytes(g) for g in compact.gpt2_ids if g != tok.GPT2_EOT}
    assert all(tok.merge_tree(t, ranks) <= kept for t in kept)
    # every line of the corpus: exactly GPT-2's tokens, renumbered
    for line in corpus:
        assert compact.encode(line) == [compact.to_compact[g] for g in gpt2.encode(line)]
    for text in random_texts(100, seed=1) + tense_lines(5000)[3000:]:
        assert compact.decode(compact.encode(text)) == text


def test_unseen_word_becomes_learned_pieces_not_bytes():
    gpt2 = tok.GPT2()
    corpus = "The grin was wide and the cat was planned."
    compact = tok.CompactGPT2.from_used_ids(gpt2.encode(corpus))
    pieces = lambda enc, text: [enc.decode([i]) for i in enc.encode(text)]
    assert pieces(gpt2, " grinned") == [" grinned"]  # one GPT-2 token, never seen in the corpus
    assert pieces(compact, " grinned") == [
        " grin",
        "n",
        "ed",
    ]  # " grin" is learned, "ed" is in " planned"'s tree
    legacy = tok.CompactGPT2(compact.gpt2_ids, fallback="bytes")
    assert pieces(legacy, " grinned") == list(" grinned")  # the old scheme: one byte each


def test_compact_meta_rebuilds_the_same_tokenizer_and_old_metas_keep_bytes():
    compact = tok.CompactGPT2.from_used_ids([464, 5156])
    again = tok.from_meta(compact.meta())
    assert again.gpt2_ids == compact.gpt2_ids and again.eot == compact.eot and again.fallback == "subwords"
    assert tok.from_meta({"tokenizer": "gpt2"}).encode("Hello world") == [15496, 995]
    # a meta.json or checkpoint from before the merge closure has no "fallback": bytes, as it was made
    old = tok.from_meta(
        {"tokenizer": "gpt2-compact", "gpt2_ids": sorted(set(tok.single_byte_ids()) | {464, 5156, 50256})}
    )
    assert old.fallback == "bytes"
    assert old.decode(old.encode("The baby zzz")) == "The baby zzz" and len(old.encode(" zzz")) == 4
