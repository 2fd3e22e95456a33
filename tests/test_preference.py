"""Stage 3 (DPO, issue 18): the loss against a hand-computed case, response-only scoring, a frozen reference,
and preference pairs that come from the training split only."""

from __future__ import annotations

import json
import math
import random
import tarfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from chameleon_lite.model.decoder import IGNORE_INDEX
from chameleon_lite.training.lit_preference import (
    dpo_loss,
    response_lengths,
    response_logps,
    response_rows,
    sequence_logps,
)
from chameleon_lite.world.preference_pairs import (
    build_preference_pairs,
    perturb_scene,
    read_preference_pairs,
    write_preference_shards,
)
from chameleon_lite.world.scenes import Scene, SceneObject

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "tokenizers" / "shapes-32"
pytestmark = pytest.mark.skipif(not BUNDLE.is_dir(), reason="needs the shipped shapes-32 bundle")


# ---------------------------------------------------------------------------------------------- the loss
def test_dpo_loss_matches_a_hand_computed_case():
    # pair 1: policy gains 0.5 nats on chosen and loses 0.5 on rejected vs the reference: logit 0.5 * 1.0 = 0.5
    # pair 2: the opposite: logit -0.5
    out = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -1.5]),
                   torch.tensor([-1.5, -1.5]), beta=0.5)
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5))) / 2
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
    assert out["accuracy"].item() == pytest.approx(0.5)
    assert out["margin"].item() == pytest.approx(0.0, abs=1e-7)
    # the policy equal to the reference: log 2 whatever the sequences' probabilities
    same = dpo_loss(torch.tensor([-3.0]), torch.tensor([-7.0]), torch.tensor([-3.0]), torch.tensor([-7.0]), beta=0.1)
    assert same["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.0)


def test_response_logps_sums_only_the_response_targets():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))  # (1, 3, 3)
    targets = torch.tensor([[IGNORE_INDEX, 1, 2]])  # the prompt position is not scored
    assert response_logps(logits, targets).item() == pytest.approx(math.log(0.8) + math.log(0.6), abs=1e-6)


# ---------------------------------------------------------------------------------------------- tiny arms
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from chameleon_lite.comparison.demo import DEMO_WORLD
    from chameleon_lite.world.scenes import WorldConfig
    from chameleon_lite.world.shapes_world import ShapesWorldSpec, write_shapes_world

    root = tmp_path_factory.mktemp("prefs") / "raw"
    write_shapes_world(ShapesWorldSpec(train=16, val=4, test=4, seed=5, world=WorldConfig(**DEMO_WORLD["world"])),
                       root, progress=False)
    return root


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    from chameleon_lite.baseline.projectors import ProjectorConfig
    from chameleon_lite.baseline.vision_encoder import ViTConfig
    from chameleon_lite.baseline.vlm import BaselineConfig, BaselineVLM, write_baseline_dir
    from chameleon_lite.model.config import DecoderConfig
    from chameleon_lite.model.decoder import Decoder
    from chameleon_lite.native.chameleon import export_model_dir
    from chameleon_lite.tokenization.bundle import load_bundle
    root = tmp_path_factory.mktemp("models")
    bundle = load_bundle(BUNDLE, load_image_tokenizer=False)
    decoder = DecoderConfig(vocab_size=bundle.vocab.size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            max_seq_len=160)
    torch.manual_seed(0)
    export_model_dir(Decoder(decoder), BUNDLE, root / "native")
    config = BaselineConfig(vit=ViTConfig(image_size=32, patch_size=8, d_model=32, n_layers=2, n_heads=2),
                            projector=ProjectorConfig(kind="mlp"), decoder=decoder)
    write_baseline_dir(BaselineVLM(config, bundle.vocab), BUNDLE, root / "baseline")
    return {"native": root / "native", "baseline": root / "baseline"}


# ---------------------------------------------------------------------------------------------- pairs
def test_pairs_come_from_training_scenes_only_and_are_true_against_false(world):
    pairs, summary = build_preference_pairs(world, pairs=60, seed=0)
    assert summary["pairs"] == len(pairs) == 60
    assert set(summary["by_kind"]) == {"yes_no", "answer", "caption"} and all(summary["by_kind"].values())
    train_keys = {p.name.split(".")[0] for s in (world / "train").glob("pairs-*.tar")
                  for p in map(Path, tarfile.open(s).getnames())}
    for split in ("val", "test"):
        other = {p.name.split(".")[0] for s in (world / split).glob("pairs-*.tar")
                 for p in map(Path, tarfile.open(s).getnames())}
        assert not {p.scene_key for p in pairs} & other
    assert {p.scene_key for p in pairs} <= train_keys
    for p in pairs:
        assert p.chosen != p.rejected
        if p.kind == "yes_no":
            assert {p.chosen, p.rejected} == {"yes", "no"}
        if p.kind == "caption":
            assert p.prompt == "" and p.source in ("added_object", "swapped_colors", "changed_shape")
    # seeded: the same pairs again
    again, _ = build_preference_pairs(world, pairs=60, seed=0)
    assert [(p.prompt, p.chosen, p.rejected) for p in again] == [(p.prompt, p.chosen, p.rejected) for p in pairs]


def test_kinds_restrict_the_pairs_and_fill_the_budget(world):
    only, summary = build_preference_pairs(world, pairs=30, seed=0, kinds=["yes_no"])
    assert len(only) == 30 and {p.kind for p in only} == {"yes_no"} and summary["by_kind"]["caption"] == 0
    mixed, _ = build_preference_pairs(world, pairs=30, seed=0)
    assert {p.kind for p in mixed} == {"yes_no", "answer", "caption"}
    no_yes_no, _ = build_preference_pairs(world, pairs=30, seed=0, kinds=("answer", "caption"))
    assert {p.kind for p in no_yes_no} == {"answer", "caption"}
    with pytest.raises(ValueError, match="kinds"):
        build_preference_pairs(world, pairs=5, kinds=["yes_no", "typo"])
    with pytest.raises(ValueError, match="kinds"):
        build_preference_pairs(world, pairs=5, kinds=[])


def test_balanced_yes_no_pairs_choose_yes_and_no_equally_often(world):
    pairs, summary = build_preference_pairs(world, pairs=40, seed=0, kinds=["yes_no"], balance_yes_no=True,
                                            extra_existence=0)
    chosen = [p.chosen for p in pairs]
    assert abs(chosen.count("yes") - chosen.count("no")) <= 1
    assert summary["chosen_yes_no"] == {"yes": chosen.count("yes"), "no": chosen.count("no")}
    unbalanced, summary = build_preference_pairs(world, pairs=40, seed=0, kinds=["yes_no"], extra_existence=0)
    assert summary["chosen_yes_no"]["yes"] + summary["chosen_yes_no"]["no"] == len(unbalanced) == 40
    assert abs(summary["chosen_yes_no"]["yes"] - summary["chosen_yes_no"]["no"]) > 1  # this world leans "yes"


def test_extra_existence_pairs_are_true_balanced_and_of_the_asked_type(world):
    from chameleon_lite.world.shapes_world import load_world_spec

    spec = load_world_spec(world)
    held_out = set(spec.split().held_out)
    pairs, summary = build_preference_pairs(world, pairs=200, seed=0, extra_existence=4,
                                            negative_types=["adversarial"])
    scenes = {}
    for s in (world / "train").glob("pairs-*.tar"):
        with tarfile.open(s) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    scenes[m.name.split(".")[0]] = Scene.from_dict(json.load(tar.extractfile(m))["scene"])
    asked = [p for p in pairs if p.source == "asked"]
    assert asked and summary["by_source"]["asked"] == len(asked)
    assert sum(p.chosen == "yes" for p in asked) == sum(p.chosen == "no" for p in asked)  # couples
    for p in asked:
        scene = scenes[p.scene_key]
        color, shape = next((c, s) for c in spec.world.colors for s in spec.world.shapes
                            if f" {c} {s}" in p.prompt)
        present = (color, shape) in scene.combos()
        assert p.kind == "yes_no" and p.category == "existence" and (color, shape) not in held_out
        assert p.chosen == ("yes" if present else "no") and p.rejected != p.chosen
        if not present:  # adversarial: shares a colour or a shape with an object in the scene
            assert any(o.color == color or o.shape == shape for o in scene.objects)
    twins, _ = build_preference_pairs(world, pairs=200, seed=0, extra_existence=2, negated_twins=True)
    asked = [p for p in twins if p.source == "asked"]
    assert [p.category for p in asked[:4]] == ["existence", "negation"] * 2
    for question, twin in zip(asked[::2], asked[1::2]):  # the twin asks about the same combo, answered the other way
        assert "there is no" in twin.prompt or "has no" in twin.prompt
        combo = question.prompt.replace(" in the image", "").rstrip("?").split()[-2:]
        assert twin.prompt.rstrip("?").split()[-2:] == combo
        assert twin.chosen == question.rejected and twin.scene_key == question.scene_key
    plain, _ = build_preference_pairs(world, pairs=200, seed=0, extra_existence=0)  # the split's questions only
    assert not any(p.source == "asked" for p in plain)
    shipped, _ = build_preference_pairs(world, pairs=200, seed=0)  # the defaults: the recipe chosen on validation
    two, _ = build_preference_pairs(world, pairs=200, seed=0, extra_existence=2, negative_types=["adversarial"])
    assert [(p.prompt, p.chosen) for p in shipped] == [(p.prompt, p.chosen) for p in two]
    assert sum(p.source == "asked" for p in shipped) < len(asked)  # one couple per scene instead of two
    with pytest.raises(ValueError, match="negative_types"):
        build_preference_pairs(world, pairs=5, extra_existence=2, negative_types=["positive"])
    with pytest.raises(ValueError, match="must be even"):  # an odd count would silently ask one fewer
        build_preference_pairs(world, pairs=5, extra_existence=3)


def test_a_test_scene_among_the_training_shards_is_refused(world, tmp_path):
    import shutil

    copy = tmp_path / "raw"
    shutil.copytree(world, copy)
    for shard in (copy / "train").glob("*.tar"):
        shard.unlink()
    for shard in (world / "test").glob("pairs-*.tar"):  # test scenes where the training split should be
        shutil.copy(shard, copy / "train" / shard.name)
    with pytest.raises(ValueError, match="split 'test'"):
        build_preference_pairs(copy, pairs=10)


def test_on_policy_answers_become_the_rejected_side_when_wrong(world):
    calls = []

    def answer_fn(images, questions):
        calls.append(len(questions))
        return ["purple"] * len(questions)  # always wrong

    pairs, summary = build_preference_pairs(world, pairs=40, seed=1, answer_fn=answer_fn)
    answers = [p for p in pairs if p.kind == "answer"]
    assert answers and sum(calls) == len(answers)
    assert all(p.rejected == "purple" and p.source == "model" for p in answers)
    assert summary["by_source"]["model"] == len(answers)


def test_perturbed_scene_differs_in_one_fact():
    scene = Scene((SceneObject("circle", "red", "large", 0, 0), SceneObject("square", "blue", "small", 1, 1)), grid=2)
    seen = set()
    for seed in range(40):
        changed, how = perturb_scene(scene, random.Random(seed), ("circle", "square", "star"), ("red", "blue", "green"))
        seen.add(how)
        if how == "added_object":
            assert len(changed) == 3 and set(scene.objects) < set(changed.objects)
        elif how == "swapped_colors":
            assert [o.color for o in changed.objects] == ["blue", "red"]
            assert [o.shape for o in changed.objects] == ["circle", "square"]
        else:
            assert len(set(scene.objects) ^ set(changed.objects)) == 2  # one object replaced
            assert [o.color for o in changed.objects] == ["red", "blue"]
    assert seen == {"added_object", "swapped_colors", "changed_shape"}


def test_pairs_round_trip_through_shards(world, tmp_path):
    pairs, _ = build_preference_pairs(world, pairs=20, seed=0)
    write_preference_shards(pairs, tmp_path / "prefs", max_count=8)
    back = read_preference_pairs(str(tmp_path / "prefs" / "prefs-*.tar"))
    assert [p.meta() for p in back] == [p.meta() for p in pairs]
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(back, pairs))
    with pytest.raises(FileExistsError):  # a shard this package did not write is never replaced
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "prefs-000000.tar").write_bytes(b"mine")
        write_preference_shards(pairs, tmp_path / "other", overwrite=True)
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:  # a json without its image
        data = json.dumps(pairs[0].meta()).encode()
        info = tarfile.TarInfo("0000000.json")
        info.size = len(data)
        import io

        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="lacks its png"):
        read_preference_pairs(str(tmp_path / "bad.tar"))


# ---------------------------------------------------------------------------------------------- scoring and training
@pytest.mark.parametrize("arm", ["native", "baseline"])
def test_rows_score_the_response_after_the_generation_prompt(arm, world, model_dirs):
    from chameleon_lite.training.lit_preference import load_policy, policy_arm

    model = load_policy(model_dirs[arm]).eval()
    assert policy_arm(model) == arm
    pairs, _ = build_preference_pairs(world, pairs=6, seed=0)
    with pytest.raises(TypeError, match="BaselineVLM or a ChameleonLite"):
        response_rows(torch.nn.Linear(2, 2), pairs, "chosen")
    rows = response_rows(model, pairs, "chosen")
    text = model.bundle.text
    expected = sum(len(text.encode(p.chosen)) + 1 for p in pairs)  # the response and its <eos>
    mask = rows["loss_mask"] if arm == "baseline" else rows["targets"] != IGNORE_INDEX
    assert int(mask.sum()) == expected
    lengths = [len(text.encode(p.chosen)) + 1 for p in pairs]
    assert response_lengths(rows).tolist() == lengths
    logps = sequence_logps(model, rows)
    assert logps.shape == (len(pairs),) and bool((logps < 0).all())
    # the same logits the arm's own forward gives, one pair at a time (padding changes nothing)
    one = sequence_logps(model, response_rows(model, pairs[:1], "chosen"))
    assert one.item() == pytest.approx(logps[0].item(), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("arm", ["native", "baseline"])
def test_dpo_fit_moves_the_policy_and_never_the_reference(arm, world, model_dirs, tmp_path, monkeypatch):
    from chameleon_lite.training.lightning_cli import run_lightning_cli

    monkeypatch.chdir(REPO)
    pairs, _ = build_preference_pairs(world, pairs=48, seed=0)
    write_preference_shards(pairs, tmp_path / "prefs")
    out = tmp_path / "run"
    cli = run_lightning_cli([
        "fit", "--config", f"configs/{arm}/dpo_tiny.yaml", f"--model.init_args.init_from={model_dirs[arm]}",
        f"--data.init_args.train_pairs={tmp_path / 'prefs'}/prefs-*.tar", "--data.init_args.val_pairs=8",
        "--data.init_args.batch_size=8", "--trainer.max_steps=4", "--trainer.val_check_interval=4",
        "--model.init_args.lr=1e-3", "--model.init_args.warmup_steps=0", f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}", "--trainer.enable_progress_bar=false",
        f"--trainer.callbacks.init_args.out_dir={out / 'model'}"])
    module = cli.model
    from chameleon_lite.training.lit_preference import load_policy

    fresh = load_policy(model_dirs[arm]).state_dict()
    ref = module.reference.state_dict()
    assert all(torch.equal(ref[k], fresh[k]) for k in fresh), "the reference moved"
    assert all(not p.requires_grad for p in module.reference.parameters())
    policy = module.policy.state_dict()
    moved = [k for k in fresh if "decoder" in k and not torch.equal(policy[k], fresh[k])]
    assert moved, "DPO did not change the decoder"
    frozen = "encoder." if arm == "baseline" else "image_tokenizer."
    assert all(torch.equal(policy[k], fresh[k]) for k in fresh if k.startswith(frozen))
    exported = load_policy(out / "model").state_dict()  # the tuned policy, as a model directory of its arm
    assert all(torch.equal(exported[k], policy[k]) for k in moved)
    logged = next((out / "logs").rglob("metrics.csv")).read_text()
    assert "val/reward_accuracy" in logged and "val/chosen_nll" in logged


def test_shipped_dpo_recipes_match_between_the_arms():
    native = OmegaConf.load(REPO / "configs/native/dpo_tiny.yaml")
    baseline = OmegaConf.load(REPO / "configs/baseline/dpo_tiny.yaml")
    for key in ("model.init_args.beta", "model.init_args.lr", "model.init_args.warmup_steps",
                "model.init_args.sft_weight", "trainer.max_steps",
                "data.init_args.batch_size", "trainer.gradient_clip_val"):
        assert OmegaConf.select(native, key) == OmegaConf.select(baseline, key), key


def test_cli_writes_pairs_and_refuses_an_odd_extra_existence_before_reading(world, tmp_path, capsys):
    from chameleon_lite.cli import main

    out = tmp_path / "prefs"
    assert main(["data", "preference-pairs", "--raw", str(world), "--pairs", "20", "--out", str(out)]) == 0
    assert "20 preference pairs" in capsys.readouterr().out
    assert len(read_preference_pairs(str(out / "prefs-*.tar"))) == 20
    with pytest.raises(SystemExit, match="must be even"):
        main(["data", "preference-pairs", "--raw", str(world), "--pairs", "20", "--out", str(tmp_path / "odd"),
              "--extra-existence", "3", "--model", str(tmp_path / "no-such-model")])
    assert not (tmp_path / "odd").exists()


# ---------------------------------------------------------------------------------------------- POPE as a ranking
def _pope_records(world: Path) -> list[dict]:
    """Records as ``evaluate_qa`` writes them, for every test question (answers are not needed for the ranking)."""
    from chameleon_lite.data.readers import qa_dataset

    return [{"key": s["key"], "answer": s["answer"], "pope_type": s["meta"].get("pope_type"),
             "held_out": bool(s["meta"].get("held_out"))} for s in qa_dataset(str(world / "test" / "qa-*.tar"))]


def test_pope_ranking_scores_exactly_the_pope_questions_by_scene(world, monkeypatch):
    """The ranking reads the POPE questions among the records, in order, and groups them by scene; margins faked:
    a perfect ranking on scenes of seen combos, none on scenes with a held-out combo."""
    import chameleon_lite.comparison.evaluate as evaluate

    records = _pope_records(world)
    pope = [r for r in records if r["pope_type"] is not None]
    assert {(r["held_out"], r["answer"]) for r in pope} == {(h, a) for h in (False, True) for a in ("yes", "no")}
    seen_keys = []

    def fake_margins(model, samples, batch_size=32):
        seen_keys.extend(s["key"] for s in samples)
        truth = {r["key"]: r for r in pope}
        return torch.tensor([0.0 if truth[s["key"]]["held_out"] else (1.0 if s["answer"] == "yes" else -1.0)
                             for s in samples])

    monkeypatch.setattr(evaluate, "pope_margins", fake_margins)
    ranked = evaluate.evaluate_pope_ranking(None, str(world / "test" / "qa-*.tar"), records)
    assert seen_keys == [r["key"] for r in pope]
    assert ranked["seen"]["auc"] == 1.0 and ranked["held_out"]["auc"] == 0.5
    assert {k: ranked[k]["total"] for k in ranked} == {"all": len(pope), "seen": sum(not r["held_out"] for r in pope),
                                                       "held_out": sum(r["held_out"] for r in pope)}
    assert ranked["all"]["present"] == sum(r["answer"] == "yes" for r in pope)
    assert evaluate.evaluate_pope_ranking(None, str(world / "test" / "qa-*.tar"),
                                          [r for r in records if r["pope_type"] is None]) == {}


@pytest.mark.parametrize("arm", ["native", "baseline"])
def test_pope_margins_are_the_same_batched_or_one_by_one_and_keep_the_mode(world, model_dirs, arm):
    """log p("yes") - log p("no") of either arm: batching (right-padded rows) changes no margin, and the model
    comes back in the mode it was given in."""
    from chameleon_lite.comparison.evaluate import pope_margins
    from chameleon_lite.data.readers import qa_dataset
    from chameleon_lite.training.lit_preference import load_policy

    samples = [s for s in qa_dataset(str(world / "test" / "qa-*.tar")) if s["meta"].get("pope_type")]
    model = load_policy(model_dirs[arm]).train()
    batched = pope_margins(model, samples, batch_size=8)
    assert model.training
    alone = torch.cat([pope_margins(model, [s]) for s in samples])
    assert batched.shape == (len(samples),) and torch.isfinite(batched).all()
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    assert batched.std() > 0  # the margins depend on the question and image
