import random
import warnings

import pytest

from chameleon_lite.tokenization.text_tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TextTokenizer

HARD_STRINGS = [
    "",
    " ",
    "  two  spaces \t tab\nnewline\r\n",
    "emoji 😀👍🏽 family 👨‍👩‍👧 CJK 漢字かなカナ 한국어 RTL שלום مرحبا",
    "NUL\x00byte and \x01\x7f controls",
    "literal meta space ▁ and ▁▁ double",
    "<boi><eoi><eol><sep></s><s><unk><pad><0x41>",
    "\u200b\u200d\ufeff zero-widths",
    "combining e\u0301 vs é, fullwidth ＡＢＣ (not normalised)",
    "\U0010ffff max code point",
]


def random_unicode(rng: random.Random, n: int) -> str:
    chars = []
    while len(chars) < n:
        cp = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0, 0x110000)])
        if 0xD800 <= cp <= 0xDFFF:  # surrogates are not unicode scalar values
            continue
        chars.append(chr(cp))
    return "".join(chars)


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_round_trip_hard_strings(text_tokenizer, text):
    ids = text_tokenizer.encode(text)
    assert text_tokenizer.decode(ids) == text


def test_round_trip_random_unicode(text_tokenizer):
    rng = random.Random(1)
    for _ in range(300):
        s = random_unicode(rng, rng.randrange(0, 40))
        assert text_tokenizer.decode(text_tokenizer.encode(s)) == s, repr(s)


def test_round_trip_one_megabyte(text_tokenizer):
    text = ("a red circle 😀 漢字 ▁ " * 60_000)[:1_000_000]
    assert text_tokenizer.decode(text_tokenizer.encode(text)) == text


def test_no_control_ids_from_text(text_tokenizer):
    """bos/eos/pad/unk never come out of encoding text, whatever the text says."""
    controls = {BOS_ID, EOS_ID, PAD_ID, UNK_ID}
    rng = random.Random(2)
    texts = HARD_STRINGS + [random_unicode(rng, 30) for _ in range(200)]
    for t in texts:
        assert not controls & set(text_tokenizer.encode(t)), repr(t)
    assert text_tokenizer.encode("hi", bos=True, eos=True)[0] == BOS_ID
    assert text_tokenizer.encode("hi", bos=True, eos=True)[-1] == EOS_ID


def test_bad_ids_raise_naming_the_id(text_tokenizer):
    n = text_tokenizer.vocab_size
    with pytest.raises(ValueError, match=str(n)):
        text_tokenizer.decode([5, n])
    with pytest.raises(ValueError, match="-1"):
        text_tokenizer.decode([-1])


def test_lone_surrogate_is_a_clear_error(text_tokenizer):
    with pytest.raises(ValueError, match="surrogate"):
        text_tokenizer.encode("bad \ud800")


def test_vocab_too_large_is_capped_with_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = TextTokenizer.train(["tiny corpus", "tiny"], vocab_size=8000)
    assert any("capped" in str(w.message) for w in caught)
    assert 261 <= tok.vocab_size < 8000
    assert tok.decode(tok.encode("tiny corpus 😀")) == "tiny corpus 😀"


def test_empty_corpus_raises():
    with pytest.raises(ValueError, match="empty"):
        TextTokenizer.train(["", "  "], vocab_size=300)


def test_train_from_files_save_load(tmp_path, text_corpus):
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(text_corpus), encoding="utf-8")
    a = TextTokenizer.train([f], vocab_size=300)
    b = TextTokenizer.train(text_corpus, vocab_size=300)
    assert a.vocab_size == b.vocab_size
    assert a.encode("a red circle") == b.encode("a red circle")  # same corpus, same model
    a.save(tmp_path / "t.model")
    c = TextTokenizer.load(tmp_path / "t.model")
    assert c.encode_batch(["two green", "x"]) == a.encode_batch(["two green", "x"])
    assert c.decode_batch(c.encode_batch(["two green", ""])) == ["two green", ""]
    assert len(c.encode("a red circle left of")) < len("a red circle left of")  # it learned merges


def test_load_malformed_model(tmp_path):
    bad = tmp_path / "text.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="text.model"):
        TextTokenizer.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        TextTokenizer.load(tmp_path / "missing.model")
