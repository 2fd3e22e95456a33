"""Token datamodule: task formats and loss masks, packing invariants, determinism, exact resume, rank split."""

import random
from collections import Counter

import numpy as np
import pytest
import torch

from chameleon_lite.data.pretokenize import _write_record
from chameleon_lite.data.shards import write_shards
from chameleon_lite.data.token_datamodule import TokenDataModule
from chameleon_lite.data.token_documents import _json_members, _json_members_tarfile, load_token_documents
from chameleon_lite.tokenization.bundle import TokenizerBundle, load_bundle, save_bundle
from chameleon_lite.tokenization.vocab import Vocab

IGNORE = -100
GRID = (2, 2)  # 4 codes per image, 6 ids with <boi>/<eoi>
BATCH_KEYS = ("input_ids", "targets", "weights", "target_is_image", "position_ids", "document_ids")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, text_tokenizer):
    """A tiny bundle: the test sentencepiece model, 16 codes, a 2x2 grid, no VQ weights (not needed here)."""
    vocab = Vocab(n_text=text_tokenizer.vocab_size, codebook_size=16)
    path = tmp_path_factory.mktemp("bundle") / "tiny"
    save_bundle(TokenizerBundle(name="tiny", text=text_tokenizer, vocab=vocab, image_grid=GRID), path)
    return path


@pytest.fixture(scope="module")
def vocab(bundle_dir):
    return load_bundle(bundle_dir, load_image_tokenizer=False).vocab


def pair(key, image, caption):
    return {"__key__": key, "json": {"kind": "pair", "tokens": [{"image": image}, {"text": caption}]}}


def qa(key, image, question, answer):
    return {"__key__": key, "json": {"kind": "qa", "tokens": [{"image": image}], "question": question,
                                     "answer": answer, "category": "count"}}


def doc(key, *segments):
    return {"__key__": key, "json": {"kind": "doc", "tokens": list(segments)}}


def write_tokens(out, samples, bundle_dir, record_bundle=None):
    """Token shards as ``chameleon-lite tokenize`` writes them (tokens.yaml from the real writer)."""
    _write_record(record_bundle or load_bundle(bundle_dir, load_image_tokenizer=False), out)
    prefix = {"pair": "pairs", "qa": "qa", "doc": "docs"}
    for kind in prefix:
        chosen = [s for s in samples if s["json"]["kind"] == kind]
        if chosen:
            write_shards(chosen, out, prefix=prefix[kind], max_count=7, progress=False, overwrite=True)
    return out


def random_samples(n_scenes=12, seed=0, long_docs=0):
    """Per scene a pair, 3 QA and an interleaved document; every image and text unique; ``long_docs`` too long."""
    rng = random.Random(seed)

    def text(lo, hi):
        return [rng.randrange(4, 300) for _ in range(rng.randint(lo, hi))]

    samples = []
    for i in range(n_scenes):
        image = [i % 16, i // 16, (i * 5 + 1) % 16, 7]
        samples.append(pair(f"s{i:03d}", image, text(2, 9)))
        for q in range(3):
            samples.append(qa(f"s{i:03d}-q{q}", image, text(3, 7), text(1, 2)))
        edited = [(c + 1) % 16 for c in image]
        samples.append(doc(f"d{i:03d}", {"text": text(2, 6)}, {"image": image}, {"text": text(1, 5)},
                           {"image": edited}))
    for i in range(long_docs):
        samples.append(doc(f"long{i}", {"text": text(60, 70)}, {"image": [1, 2, 3, 4]}))
    return samples


@pytest.fixture(scope="module")
def token_dirs(tmp_path_factory, bundle_dir):
    root = tmp_path_factory.mktemp("tokens")
    train = write_tokens(root / "train", random_samples(12, seed=0, long_docs=2), bundle_dir)
    val = write_tokens(root / "val", random_samples(5, seed=1), bundle_dir)
    return train, val


def make_dm(token_dirs, bundle_dir, **kw):
    args = {"seq_len": 48, "batch_size": 3, "seed": 0, "cache": False, **kw}
    return TokenDataModule(str(token_dirs[0]), str(token_dirs[1]), tokenizer=str(bundle_dir), **args)


def one_row(tmp_path, bundle_dir, sample, **kw):
    """The single packed row of a one-sample token set."""
    d = write_tokens(tmp_path / "one", [sample], bundle_dir)
    dm = TokenDataModule(str(d), None, tokenizer=str(bundle_dir), seq_len=24, batch_size=1, cache=False, **kw)
    batch = next(iter(dm.train_dataloader()))
    return {k: v[0] for k, v in batch.items()}, dm.vocab


def image_ids(vocab, codes):
    return [vocab.boi, *(vocab.image_offset + c for c in codes), vocab.eoi]


IMAGE = [0, 5, 9, 15]
CAPTION = [40, 41, 42]


# ------------------------------------------------------------------------------------------- task formats


def check_row(row, vocab, ids, targets):
    """``ids`` then padding; ``targets`` given per document position; padding predicts nothing."""
    n, T = len(ids), row["input_ids"].shape[0]
    assert row["input_ids"].tolist() == ids + [vocab.pad] * (T - n)
    assert row["targets"].tolist() == targets + [IGNORE] * (T - n)
    assert row["position_ids"].tolist() == list(range(n)) + list(range(T - n))
    assert row["document_ids"].tolist() == [0] * n + [1] * (T - n)
    assert torch.equal(row["target_is_image"], vocab.is_image(row["targets"]))
    assert torch.equal(row["weights"] > 0, row["targets"] != IGNORE)


def test_caption_format(tmp_path, bundle_dir):
    row, v = one_row(tmp_path, bundle_dir, pair("p", IMAGE, CAPTION), caption_prob=1.0)
    ids = [v.bos, *image_ids(v, IMAGE), *CAPTION, v.eos]
    # loss on the caption and <eos> only: the token before each predicts it
    check_row(row, v, ids, [IGNORE] * 6 + [40, 41, 42, v.eos, IGNORE])


def test_generation_format_with_and_without_caption(tmp_path, bundle_dir):
    row, v = one_row(tmp_path, bundle_dir, pair("p", IMAGE, CAPTION), caption_prob=0.0, cfg_dropout=0.0)
    img = image_ids(v, IMAGE)
    ids = [v.bos, *CAPTION, *img, v.eos]
    # loss on the codes and <eoi>; <boi> is part of the prompt, the final <eos> is not taught (see module doc)
    check_row(row, v, ids, [IGNORE] * 4 + img[1:] + [IGNORE, IGNORE])
    row, v = one_row(tmp_path / "drop", bundle_dir, pair("p", IMAGE, CAPTION), caption_prob=0.0, cfg_dropout=1.0)
    check_row(row, v, [v.bos, *img, v.eos], [IGNORE] + img[1:] + [IGNORE, IGNORE])


def test_qa_format(tmp_path, bundle_dir):
    row, v = one_row(tmp_path, bundle_dir, qa("q", IMAGE, [50, 51], [60]))
    ids = [v.bos, *image_ids(v, IMAGE), 50, 51, v.sep, 60, v.eos]
    check_row(row, v, ids, [IGNORE] * 9 + [60, v.eos, IGNORE])


def test_doc_format(tmp_path, bundle_dir):
    second = [1, 1, 2, 3]
    sample = doc("d", {"text": [70, 71]}, {"image": IMAGE}, {"text": [72]}, {"image": second})
    row, v = one_row(tmp_path, bundle_dir, sample)
    ids = [v.bos, 70, 71, *image_ids(v, IMAGE), 72, *image_ids(v, second), v.eos]
    check_row(row, v, ids, ids[1:] + [IGNORE])  # loss on everything after <bos>


def test_qa_per_image_chains_the_questions_about_one_image(tmp_path, bundle_dir):
    # interleaved, as pre-tokenization with several workers writes them: grouping goes by image, not position
    samples = [qa("s-q0", IMAGE, [50, 51], [60]), qa("t-q0", [1, 2, 3, 4], [53], [63]),
               qa("s-q1", IMAGE, [52], [61, 62])]
    d = write_tokens(tmp_path / "qa", samples, bundle_dir)
    dm = TokenDataModule(str(d), None, tokenizer=str(bundle_dir), seq_len=32, batch_size=2, cache=False,
                         qa_per_image=True)
    packer = dm._packer("train")
    plan = packer.plan(0)
    assert sorted(packer.docs.doc_samples[plan.order].tolist()) == [1, 2]  # 3 questions, 2 images
    assert packer.stats(0)["samples"] == 3
    v = dm.vocab
    first = packer.docs.sample_formats[0, 1]
    start, n = packer.docs.doc_start[first], packer.docs.doc_len[first]
    ids = packer.docs.ids[start:start + n].tolist()
    assert ids == [v.bos, *image_ids(v, IMAGE), 50, 51, v.sep, 60, v.eos, 52, v.sep, 61, 62, v.eos]
    loss = packer.docs.loss[start:start + n].tolist()
    assert [t for t, on in zip(ids, loss) if on] == [60, v.eos, 61, 62, v.eos]  # answers and their <eos> only
    # the single-question documents (the evaluation format) are still there, and used by default
    plain = TokenDataModule(str(d), None, tokenizer=str(bundle_dir), seq_len=32, batch_size=2, cache=False)
    assert plain._packer("train").stats(0)["documents"] == 3


def test_per_modality_weights(tmp_path, bundle_dir):
    row, v = one_row(tmp_path, bundle_dir, pair("p", IMAGE, CAPTION), caption_prob=0.0, cfg_dropout=0.0,
                     text_loss_weight=0.5, image_loss_weight=2.0)
    targets, weights = row["targets"], row["weights"]
    assert weights.dtype == torch.float32
    assert (weights[row["target_is_image"]] == 2.0).all() and int(row["target_is_image"].sum()) == 4
    assert weights[targets == v.eoi].tolist() == [0.5]  # control tokens count as text
    assert (weights[targets == IGNORE] == 0).all()


def test_context_loss_weight_covers_the_prompt_only(tmp_path, bundle_dir):
    # QA: the image and question become targets at weight 0.25 (times the modality weight); the answer keeps 1
    row, v = one_row(tmp_path, bundle_dir, qa("q", IMAGE, [50, 51], [60]), context_loss_weight=0.25,
                     image_loss_weight=2.0)
    ids = [v.bos, *image_ids(v, IMAGE), 50, 51, v.sep, 60, v.eos]
    check_row(row, v, ids, ids[1:] + [IGNORE])
    weights = row["weights"][: len(ids) - 1].tolist()
    assert weights == [0.25, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 1.0, 1.0]
    # generation: the caption and <boi> are context; the trailing <eos> after the targets is not taught
    row, v = one_row(tmp_path / "gen", bundle_dir, pair("p", IMAGE, CAPTION), caption_prob=0.0, cfg_dropout=0.0,
                     context_loss_weight=0.5)
    img = image_ids(v, IMAGE)
    check_row(row, v, [v.bos, *CAPTION, *img, v.eos], [*CAPTION, *img, IGNORE, IGNORE])
    assert row["weights"][:9].tolist() == [0.5] * 4 + [1.0] * 5


def test_context_loss_is_not_used_in_validation(token_dirs, bundle_dir):
    dm = make_dm(token_dirs, bundle_dir, context_loss_weight=0.5)
    dm.setup("fit")
    plain = make_dm(token_dirs, bundle_dir)
    plain.setup("fit")
    assert same(list(dm.val_dataloader()), list(plain.val_dataloader()))
    trained = next(iter(dm.train_dataloader()))
    assert (trained["weights"] == 0.5).any()


# ---------------------------------------------------------------------------------------------- packing


def epoch_rows(dm, epoch=0):
    packer = dm._packer("train")
    return packer, packer.batch([(epoch, j) for j in range(packer.plan(epoch).n_rows)])


def test_packing_invariants_and_nothing_lost(token_dirs, bundle_dir, vocab):
    dm = make_dm(token_dirs, bundle_dir, cfg_dropout=0.0)
    packer, rows = epoch_rows(dm)
    ids, tg, pos, docs = (rows[k] for k in ("input_ids", "targets", "position_ids", "document_ids"))
    assert all(rows[k].shape == ids.shape and ids.shape[1] == 48 for k in BATCH_KEYS)
    assert [rows[k].dtype for k in BATCH_KEYS] == [torch.int64, torch.int64, torch.float32, torch.bool,
                                                   torch.int64, torch.int64]
    # document ids count up from 0 by steps of 1; positions restart at each new document
    steps = docs[:, 1:] - docs[:, :-1]
    assert (docs[:, 0] == 0).all() and ((steps == 0) | (steps == 1)).all()
    assert torch.equal(pos[:, 1:] == 0, steps == 1) and (pos[:, 0] == 0).all()
    assert torch.equal(pos[:, 1:][steps == 0], pos[:, :-1][steps == 0] + 1)
    # a target is the next input of the same document; the last token of a document predicts nothing
    counted = tg[:, :-1] != IGNORE
    assert (tg[:, -1] == IGNORE).all() and (steps[counted] == 0).all()
    assert torch.equal(tg[:, :-1][counted], ids[:, 1:][counted])
    assert torch.equal(rows["target_is_image"], vocab.is_image(tg))
    # padding: only at row ends, in its own document, predicting nothing
    pad_doc = (ids == vocab.pad) & (docs == docs.max(dim=1, keepdim=True).values)
    assert (tg[pad_doc] == IGNORE).all() and (rows["weights"][pad_doc] == 0).all()
    # nothing lost: each usable sample exactly once, as one whole document
    samples = random_samples(12, seed=0, long_docs=2)
    usable = [s for s in samples if not s["__key__"].startswith("long")]
    found = Counter()
    for r in range(ids.shape[0]):
        for d in docs[r].unique().tolist():
            seq = ids[r][docs[r] == d].tolist()
            if seq[0] == vocab.bos:
                found[(seq[-1] == vocab.eos, tuple(c for c in seq if vocab.is_image(c)))] += 1
    want = Counter()
    for s in usable:
        images = [seg["image"] for seg in s["json"]["tokens"] if "image" in seg]
        want[(True, tuple(vocab.image_offset + c for im in images for c in im))] += 1
    assert found == want
    n_tokens = int((ids != vocab.pad).sum())
    assert n_tokens == packer.stats(0)["tokens"] == sum(_expected_len(s) for s in usable)
    assert dm.tokens_per_epoch == n_tokens
    assert dm.skipped_too_long["train"] == {"pair": 0, "qa": 0, "doc": 2}


def _expected_len(sample):
    j = sample["json"]
    body = sum(len(seg.get("text", [])) + (6 if "image" in seg else 0) for seg in j["tokens"])
    return 2 + body + (len(j["question"]) + 1 + len(j["answer"]) if j["kind"] == "qa" else 0)


def test_caption_prob_and_dropout_rates(tmp_path, bundle_dir, vocab):
    samples = [pair(f"p{i:03d}", [i % 16, 1, 2, 3], [40 + i % 50, 41]) for i in range(400)]
    d = write_tokens(tmp_path / "pairs", samples, bundle_dir)
    dm = TokenDataModule(str(d), None, tokenizer=str(bundle_dir), seq_len=16, batch_size=4, cache=False,
                         caption_prob=0.5, cfg_dropout=0.2)
    packer = dm._packer("train")
    fmt = Counter()
    for e in range(2):
        for dd in packer.documents(e).tolist():
            fmt[int(np.flatnonzero(packer.docs.sample_formats == dd)[0] % 3)] += 1
    assert 320 < fmt[0] < 480 and 55 < fmt[2] < 110 and sum(fmt.values()) == 800  # caption, generation w/o caption
    both = TokenDataModule(str(d), None, tokenizer=str(bundle_dir), seq_len=16, batch_size=4, cache=False,
                           pair_formats="both", kind_repeats={"pair": 0.5})
    assert len(both._packer("train").documents(0)) == 2 * 200


# ------------------------------------------------------------------------------------- determinism, resume


def batches(loader, n_epochs):
    return [b for _ in range(n_epochs) for b in loader]  # one iter() per epoch, as Lightning does


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in BATCH_KEYS)


def test_deterministic_and_epochs_differ(token_dirs, bundle_dir):
    a = batches(make_dm(token_dirs, bundle_dir).train_dataloader(), 2)
    b = batches(make_dm(token_dirs, bundle_dir).train_dataloader(), 2)
    assert same(a, b)
    assert not same(a, batches(make_dm(token_dirs, bundle_dir, seed=1).train_dataloader(), 2))
    packer = make_dm(token_dirs, bundle_dir)._packer("train")
    assert not np.array_equal(packer.plan(0).order, packer.plan(1).order)
    assert sorted(packer.plan(0).order.tolist()) != sorted(packer.plan(1).order.tolist())  # formats redrawn too


@pytest.mark.parametrize("where", ["mid first epoch", "first epoch end", "mid second epoch", "mid third epoch"])
def test_resume_continues_exactly(token_dirs, bundle_dir, tmp_path, where):
    full_loader = make_dm(token_dirs, bundle_dir).train_dataloader()
    n = len(full_loader)
    assert n >= 4
    stop = {"mid first epoch": n // 2, "first epoch end": n, "mid second epoch": n + 2,
            "mid third epoch": 2 * n + 1}[where]
    full = batches(full_loader, 3)
    first = make_dm(token_dirs, bundle_dir).train_dataloader()
    taken = []
    for _ in range(3):
        for batch in first:
            taken.append(batch)
            if len(taken) == stop:
                break
        if len(taken) == stop:
            break
    torch.save(first.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # plain Python types only
    resumed = make_dm(token_dirs, bundle_dir).train_dataloader()
    resumed.load_state_dict(state)
    rest = [b for b in resumed]  # the rest of the interrupted epoch (a whole epoch after an epoch end)
    rest += batches(resumed, 3 - (stop + len(rest)) // n)
    assert same(taken + rest, full)


def test_resume_refuses_another_configuration(token_dirs, bundle_dir):
    loader = make_dm(token_dirs, bundle_dir).train_dataloader()
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        make_dm(token_dirs, bundle_dir, seed=3).train_dataloader().load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        make_dm(token_dirs, bundle_dir, batch_size=2).train_dataloader().load_state_dict(state)


def test_rank_split_disjoint_and_equal(token_dirs, bundle_dir):
    dm = make_dm(token_dirs, bundle_dir)
    r0, r1 = dm.train_dataloader(rank=0, world_size=2), make_dm(token_dirs, bundle_dir).train_dataloader(1, 2)
    assert len(r0) == len(r1) >= 2 and len(list(r0)) == len(list(r1)) == len(r0)
    rows0 = [r for g in range(3 * len(r0)) for r in r0.rows(g)]
    rows1 = [r for g in range(3 * len(r1)) for r in r1.rows(g)]
    assert not set(rows0) & set(rows1) and len(set(rows0)) == len(rows0)
    stream = sorted(rows0 + rows1)  # together: the stream's first rows, each once, across data epochs
    packer = dm._packer("train")
    flat = [(e, j) for e in range(4) for j in range(packer.plan(e).n_rows)][: len(stream)]
    assert stream == flat
    single = make_dm(token_dirs, bundle_dir).train_dataloader(0, 1)
    assert len(single) == packer.plan(0).n_rows // 3
    v0, v1 = dm.val_dataloader(0, 2), dm.val_dataloader(1, 2)
    assert len(v0) == len(v1) > 0 and not set(v0.rows) & set(v1.rows)


def test_validation_is_fixed_and_undropped(token_dirs, bundle_dir, vocab):
    dm = make_dm(token_dirs, bundle_dir, cfg_dropout=1.0, caption_prob=0.0)
    a, b = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert same(a, b)
    # training drops every caption; validation none: only the 15 QA documents start with <bos> <boi>
    starts_with_image = sum(int(((x["input_ids"] == vocab.boi) & (x["position_ids"] == 1)).sum()) for x in a)
    assert starts_with_image == 15
    train = dm._packer("train")
    assert (train.docs.sample_formats[:, 2] >= 0).sum() == 12  # (train: 12 pairs, all without caption)
    limited = make_dm(token_dirs, bundle_dir, val_max_documents=10)
    assert len(limited._packer("val").plan(0).order) == 10


# ---------------------------------------------------------------------------------------------- bad input


def test_shards_from_another_bundle_are_refused(tmp_path, bundle_dir, text_tokenizer):
    for field, other in (("codebook_size", Vocab(n_text=text_tokenizer.vocab_size, codebook_size=32)),
                         ("image_grid", None), ("bundle", None)):
        bundle = load_bundle(bundle_dir, load_image_tokenizer=False)
        if field == "codebook_size":
            bundle.vocab = other
        elif field == "image_grid":
            bundle.image_grid = (4, 4)
        else:
            bundle.name = "another"
        d = write_tokens(tmp_path / field, [pair("p", IMAGE, CAPTION)], bundle_dir, record_bundle=bundle)
        dm = TokenDataModule(str(d), None, tokenizer=str(bundle_dir), cache=False)
        with pytest.raises(ValueError, match=field):
            dm.setup("fit")


@pytest.mark.parametrize("sample, match", [
    (pair("bad-code", [0, 1, 16, 2], CAPTION), "'bad-code'.*image code 16 is outside the codebook"),
    (qa("short-image", [0, 1, 2], [50], [60]), "'short-image'.*3 codes"),
    (doc("bad-text", {"text": [70, 5000]}), "'bad-text'.*text id 5000"),
    (pair("float-code", [0, 1, 2.5, 2], CAPTION), "'float-code'.*integers"),
    (pair("eos-in-caption", IMAGE, [40, 2, 41]), r"pairs-\d+\.tar: sample 'eos-in-caption': text id 2 is <eos>"),
    (qa("bos-in-answer", IMAGE, [50], [1]), r"qa-\d+\.tar: sample 'bos-in-answer': text id 1 is <bos>"),
    (qa("pad-in-question", IMAGE, [50, 3], [60]), r"qa-\d+\.tar: sample 'pad-in-question': text id 3 is <pad>"),
    (doc("pad-in-doc", {"text": [70, 3]}, {"image": IMAGE}), r"docs-\d+\.tar: sample 'pad-in-doc': text id 3 is <pad>"),
])
def test_bad_samples_are_named(tmp_path, bundle_dir, sample, match):
    good = [pair(f"ok{i}", IMAGE, CAPTION) for i in range(3)]
    d = write_tokens(tmp_path / "t", [*good, sample], bundle_dir)
    with pytest.raises(ValueError, match=match):
        TokenDataModule(str(d), None, tokenizer=str(bundle_dir), cache=False).setup("fit")


def test_missing_token_dir_names_the_commands(tmp_path, bundle_dir):
    dm = TokenDataModule(str(tmp_path / "nope" / "train"), None, tokenizer=str(bundle_dir))
    with pytest.raises(FileNotFoundError, match="chameleon-lite tokenize .*chameleon-lite data shapes"):
        dm.setup("fit")


# -------------------------------------------------------------------------------------- reading and cache


def test_cache_and_fast_tar_reader_agree(token_dirs, bundle_dir, tmp_path):
    bundle = load_bundle(bundle_dir, load_image_tokenizer=False)
    for shard in sorted(token_dirs[1].glob("*.tar")):
        assert list(_json_members(str(shard))) == list(_json_members_tarfile(str(shard)))
    d = write_tokens(tmp_path / "c", random_samples(3), bundle_dir)
    cache_dir = tmp_path / "cache"
    parsed = load_token_documents(d, bundle, cache=True, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("documents-*.npz"))) == 1
    cached = load_token_documents(d, bundle, cache=True, cache_dir=cache_dir)
    for name in ("ids", "loss", "doc_start", "doc_len", "sample_kind", "sample_key", "sample_formats"):
        assert np.array_equal(getattr(parsed, name), getattr(cached, name)), name
    write_tokens(d, random_samples(4), bundle_dir)  # new shards: the stale cache is not used, and replaced
    assert len(load_token_documents(d, bundle, cache=True, cache_dir=cache_dir)) == 4 * 5
    assert len(list(cache_dir.glob("documents-*.npz"))) == 1


def test_the_document_cache_writes_only_in_its_own_directory(token_dirs, bundle_dir, tmp_path):
    """Issue 14: the cache went beside the shards (TOKEN_DIR/.cache) and replacing it deleted every other
    documents-*.npz there. Now the token directory is left as it was, and a replace touches only this package's
    earlier cache of the same token directory."""
    bundle = load_bundle(bundle_dir, load_image_tokenizer=False)
    d = write_tokens(tmp_path / "tokens", random_samples(3), bundle_dir)
    (d / ".cache").mkdir()
    theirs = [d / ".cache" / "documents-0123456789abcdef.npz", d / ".cache" / "notes.txt"]
    for path in theirs:
        path.write_bytes(b"a user's file")
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    cache_dir = tmp_path / "cache"
    load_token_documents(d, bundle, cache_dir=cache_dir)
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*")} == before  # nothing written, nothing removed
    assert (cache_dir / "CACHEDIR.TAG").is_file()
    other = write_tokens(tmp_path / "other", random_samples(2, seed=3), bundle_dir)
    load_token_documents(other, bundle, cache_dir=cache_dir)  # another token directory: its own entry
    assert len(list(cache_dir.glob("documents-*.npz"))) == 2
    stranger = cache_dir / "documents-ffffffffffff-0123456789abcdef.npz.keep"
    stranger.write_bytes(b"x")
    write_tokens(d, random_samples(4), bundle_dir)  # d's shards change: only d's earlier cache is replaced
    assert len(load_token_documents(d, bundle, cache_dir=cache_dir)) == 4 * 5
    assert len(list(cache_dir.glob("documents-*.npz"))) == 2 and stranger.is_file()
    assert all(p.read_bytes() == b"a user's file" for p in theirs)
    # a caller's own directory that already held files is used but never pruned
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    load_token_documents(d, bundle, cache_dir=mine)
    write_tokens(d, random_samples(5), bundle_dir)
    load_token_documents(d, bundle, cache_dir=mine)
    assert len(list(mine.glob("documents-*.npz"))) == 2 and not (mine / "CACHEDIR.TAG").exists()


# ------------------------------------------------------------------------------------------------ Lightning


def test_lightning_resume_sees_the_same_batches(token_dirs, bundle_dir, tmp_path):
    """Through Trainer.fit: a run resumed from a mid-epoch checkpoint trains on the uninterrupted run's batches."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.global_step, batch["input_ids"].clone()))
            return (self.w * batch["weights"].sum()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(run, ckpt=None):
        model = Recorder()
        trainer = L.Trainer(accelerator="cpu", max_steps=16, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=run,
                            callbacks=[ModelCheckpoint(dirpath=run, every_n_train_steps=2, save_top_k=-1)])
        trainer.fit(model, datamodule=make_dm(token_dirs, bundle_dir), ckpt_path=ckpt)
        return dict(model.seen)

    full = fit(tmp_path / "full")
    assert sorted(full) == list(range(16))  # 16 steps over 7-batch epochs: crosses two epoch boundaries
    for step in (6, 14):  # mid-epoch, and exactly at the end of the second epoch
        (ckpt,) = (tmp_path / "full").glob(f"*step={step}.ckpt")
        resumed = fit(tmp_path / f"resumed{step}", str(ckpt))
        assert sorted(resumed) == list(range(step, 16))
        assert all(torch.equal(resumed[s], full[s]) for s in resumed)
