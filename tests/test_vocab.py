import pytest
import torch

from chameleon_lite.tokenization.vocab import Vocab


@pytest.fixture
def vocab():
    return Vocab(n_text=300, codebook_size=16, n_reserved=4)


def test_layout(vocab):
    assert vocab.n_special == 8
    assert vocab.image_offset == 308
    assert vocab.size == 324
    assert list(vocab.special_ids) == list(range(300, 308))
    assert (vocab.boi, vocab.eoi, vocab.eol, vocab.sep) == (300, 301, 302, 303)
    assert vocab.image_ids == range(308, 324)
    # the three ranges partition [0, size)
    ids = list(vocab.text_ids) + list(vocab.special_ids) + list(vocab.image_ids)
    assert ids == list(range(vocab.size))
    assert vocab.token_name(305) == "<reserved_1>" and vocab.token_name(309) == "<img_1>"


def test_predicates_ints_and_tensors(vocab):
    assert vocab.is_text(299) and not vocab.is_text(300)
    assert vocab.is_special(307) and not vocab.is_special(308)
    assert vocab.is_image(308) and vocab.is_image(323) and not vocab.is_image(324)
    t = torch.tensor([0, 299, 300, 307, 308, 323])
    assert vocab.is_image(t).tolist() == [False, False, False, False, True, True]
    assert vocab.is_text(t).tolist() == [True, True, False, False, False, False]


def test_masks(vocab):
    tm, im = vocab.text_mask(), vocab.image_mask()
    assert tm.shape == im.shape == (vocab.size,)
    assert tm.sum() == 300 and im.sum() == 16
    assert not (tm & im).any()
    assert im[vocab.image_offset:].all() and not im[: vocab.image_offset].any()
    m = vocab.mask(text=True, extra=[vocab.boi])
    assert m.sum() == 301 and m[vocab.boi] and not m[vocab.eoi]
    with pytest.raises(ValueError, match="999"):
        vocab.mask(extra=[999])


def test_image_ids_round_trip(vocab):
    codes = torch.arange(12).view(3, 4) % 16
    ids = vocab.image_to_ids(codes)
    assert ids.shape == (14,)
    assert ids[0] == vocab.boi and ids[-1] == vocab.eoi
    assert vocab.is_image(ids[1:-1]).all()
    assert ids[1:-1].tolist() == (codes.flatten() + vocab.image_offset).tolist()  # row-major
    assert torch.equal(vocab.ids_to_image(ids, (3, 4)), codes)
    assert torch.equal(vocab.ids_to_image(ids[1:-1], (3, 4)), codes)
    batch = torch.randint(0, 16, (2, 3, 4))
    assert vocab.image_to_ids(batch, wrap=False).shape == (2, 12)


def test_image_framing_with_end_of_line_tokens(vocab):
    """The one image framing (issue 16): ``<boi>`` codes with an ``<eol>`` ending each row ``<eoi>``."""
    codes = torch.tensor([[1, 2, 3], [4, 5, 6]])
    o = vocab.image_offset
    assert vocab.image_to_ids(codes, eol=True).tolist() == [
        vocab.boi, o + 1, o + 2, o + 3, vocab.eol, o + 4, o + 5, o + 6, vocab.eol, vocab.eoi]
    assert vocab.image_to_ids(torch.stack([codes, codes]), eol=True, wrap=False).shape == (2, 8)


def test_image_ids_errors(vocab):
    with pytest.raises(ValueError, match="16"):
        vocab.image_to_ids(torch.tensor([[0, 16]]))
    with pytest.raises(ValueError, match="expected 12"):
        vocab.ids_to_image(list(range(308, 318)), (3, 4))
    ids = vocab.image_to_ids(torch.zeros(3, 4, dtype=torch.long))
    ids[5] = 7  # a text id inside the image
    with pytest.raises(ValueError, match="id 7"):
        vocab.ids_to_image(ids, (3, 4))
    with pytest.raises(ValueError, match="integers"):
        vocab.image_to_ids(torch.zeros(2, 2))


def test_dict_round_trip_and_checks(vocab):
    d = vocab.to_dict()
    assert Vocab.from_dict(d) == vocab
    d["image_offset"] = 1
    with pytest.raises(ValueError, match="image_offset"):
        Vocab.from_dict(d)
    with pytest.raises(ValueError):
        Vocab(n_text=2, codebook_size=4)
    with pytest.raises(ValueError, match="<boi>"):
        Vocab(n_text=300, codebook_size=4, control_tokens=("<eoi>", "<eol>", "<sep>"))


def test_text_never_reaches_control_or_image_ids(text_tokenizer):
    """The literal names of special tokens are ordinary text: encoded, they round-trip exactly, stay in the text
    range, and never become the sentencepiece controls that only the document formats place (<bos>, <eos>, <pad>;
    token-shard validation refuses those inside text) nor a single piece of their own."""
    vocab = Vocab(n_text=text_tokenizer.vocab_size, codebook_size=64)
    placed = {vocab.bos, vocab.eos, vocab.pad}
    for s in ["<boi>", "<eoi>", "<img_3>", "<reserved_0>", "<sep> <eol>", "<s>", "</s>", "<pad>", "<unk>",
              "a <s> b </s> c", "é 漢字 \x00 \t"]:
        ids = text_tokenizer.encode(s)
        assert text_tokenizer.decode(ids) == s, s
        assert all(0 <= i < vocab.n_text for i in ids) and vocab.is_text(torch.tensor(ids)).all(), s
        assert not placed & set(ids), (s, ids)
        assert len(ids) > 1, (s, ids)  # spelled out, not one special piece
        assert vocab.boi not in ids and vocab.eoi not in ids and vocab.sep not in ids
