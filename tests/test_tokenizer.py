import os
import random
import re

import tiktoken_ext.openai_public

import tokenizer as tok


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
    gpt2_body = source[source.index("def gpt2():"):source.index("def r50k_base")]
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
    # the 256 bytes, end-of-text, and "The", " baby", " is", " sleeping" ("." is a single byte)
    assert compact.vocab_size == 256 + 1 + 4
    texts = random_texts(200) + ["Zyzzyva xylophones quixotically", "<|endoftext|>", ""]
    for text in texts:
        ids = compact.encode(text)
        assert all(0 <= i < compact.vocab_size for i in ids)
        assert compact.decode(ids) == text
    # a seen word is one token, an unseen word is spelled in single bytes
    assert len(compact.encode(" baby")) == 1
    assert len(compact.encode(" xylophone")) == len(" xylophone".encode())


def test_compact_meta_rebuilds_the_same_tokenizer():
    compact = tok.CompactGPT2.from_used_ids([464, 5156])
    again = tok.from_meta(compact.meta())
    assert again.gpt2_ids == compact.gpt2_ids and again.eot == compact.eot
    assert tok.from_meta({"tokenizer": "gpt2"}).encode("Hello world") == [15496, 995]
