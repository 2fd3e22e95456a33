"""Schema of ``configs/compare/*.yaml`` (OmegaConf structured: typed, unknown keys rejected)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from chameleon_lite.safe_io import load_plain_yaml

__all__ = ["CompareConfig", "CompareConfigError", "DataSpec", "NativeArm", "BaselineArm", "EvalSpec", "PreferenceStage",
           "load_compare_config"]


class CompareConfigError(ValueError):
    """A comparison that cannot run as configured on this data, found before anything is trained."""


@dataclass
class DataSpec:
    """Where both arms read from. ``raw``: a shapes-world-layout directory (``train``/``val``/``test`` raw shards
    and ``world.yaml``); ``tokens``: its pre-tokenized ``train``/``val`` (native arm)."""

    raw: str = "data/shapes"
    tokens: str = "data/tokens"
    tokenizer: str = "tokenizers/shapes-64"


@dataclass
class NativeArm:
    recipe: str = "configs/native/tiny.yaml"
    model_dir: str | None = None  # load this model directory instead of training
    overrides: list[str] = field(default_factory=list)  # extra `fit` arguments, e.g. "--trainer.accelerator=gpu"


@dataclass
class BaselineArm:
    encoder_recipe: str = "configs/baseline/encoder_tiny.yaml"
    stage1_recipe: str = "configs/baseline/stage1_tiny.yaml"
    stage2_recipe: str = "configs/baseline/stage2_tiny.yaml"
    stage1_fraction: float = 0.1  # share of the sample budget spent in stage 1
    encoder_samples: int = 9600  # contrastive pretraining samples (not charged to the budget)
    model_dir: str | None = None
    encoder_overrides: list[str] = field(default_factory=list)
    stage1_overrides: list[str] = field(default_factory=list)
    stage2_overrides: list[str] = field(default_factory=list)


@dataclass
class EvalSpec:
    qa_questions: int = 500  # from the test split's QA shards, in shard order
    captions: int = 100
    text_to_image: int = 32
    cfg_scale: float = 3.0
    image_temperature: float = 1.0  # sampling temperature of image codes (0 = greedy)
    batch_size: int = 32
    device: str = "auto"  # where the trained models are evaluated: "auto" = cuda when available, else cpu
    # how generated images are judged: "parser" (a shapes world's scene parser, GenEval-style), "r_precision" (a
    # contrastive image-text model trained on the same training data: does the image retrieve its own caption among
    # r), or "auto" (the parser when data.raw holds a world.yaml, else r_precision)
    text_to_image_scorer: str = "auto"
    r_precision_r: int = 100  # captions ranked per image (capped at the distinct captions of the test split)
    r_precision_key: str | None = None  # a json field of the pairs that groups captions (e.g. "extra.label"): a
    #                                     caption of the same group is never a distractor; None = the caption text
    scorer_dir: str | None = None  # a trained scorer (ExportContrastiveScorer); None = the baseline's ViT pretraining

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"eval.device={self.device!r} must be 'auto', 'cpu' or 'cuda[:N]'")
        if self.text_to_image_scorer not in ("auto", "parser", "r_precision"):
            raise ValueError(f"eval.text_to_image_scorer={self.text_to_image_scorer!r} must be 'auto', 'parser' or "
                             "'r_precision'")
        if self.r_precision_r < 2:
            raise ValueError(f"eval.r_precision_r={self.r_precision_r} must be >= 2")

    def resolved_device(self) -> str:
        """The device the models are evaluated on (``auto``: ``cuda`` when a GPU is visible, else ``cpu``)."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


@dataclass
class PreferenceStage:
    """Optional stage 3 for both arms: DPO (``chameleon_lite.training.lit_preference``) on preference pairs from the
    training split (``data.preference_pairs``), each arm from its own trained model, under the same pair budget;
    the report shows every QA category and POPE before and after."""

    pairs: int = 0  # preference pairs each arm trains on (one epoch); 0 = no stage 3
    val_pairs: int = 64  # more pairs, held out for the fit's validation reward accuracy (training scenes too)
    native_recipe: str = "configs/native/dpo_tiny.yaml"
    baseline_recipe: str = "configs/baseline/dpo_tiny.yaml"
    on_policy: bool = True  # the arm's own wrong greedy answers are the rejected side of non-yes/no questions
    # per scene, this many more existence questions asked of its ground truth (couples of a present and an absent
    # combo of the negative_types), each followed by its negated twin when negated_twins; None = the pair builder's
    # shipped recipe (world.preference_pairs.EXTRA_EXISTENCE, EXTRA_NEGATIVE_TYPES: 2, adversarial)
    extra_existence: int | None = None
    negative_types: list[str] | None = None
    negated_twins: bool = False
    overrides: list[str] = field(default_factory=list)  # `fit` arguments for both arms (same beta, lr: fair)

    def __post_init__(self) -> None:
        if self.pairs < 0 or self.val_pairs < 0 or (self.extra_existence or 0) < 0:
            raise ValueError(f"stage3.pairs={self.pairs}, stage3.val_pairs={self.val_pairs} and "
                             f"stage3.extra_existence={self.extra_existence} must be >= 0")
        if (self.extra_existence or 0) % 2:
            raise ValueError(f"stage3.extra_existence={self.extra_existence} must be even (couples of a present and "
                             "an absent combo)")

    def pair_options(self) -> dict[str, Any]:
        """The keyword arguments of ``build_preference_pairs`` this stage sets (None fields keep its defaults)."""
        options = {"extra_existence": self.extra_existence, "negative_types": self.negative_types,
                   "negated_twins": self.negated_twins}
        return {k: v for k, v in options.items() if v is not None}


@dataclass
class CompareConfig:
    """A comparison: data, the sample budget both arms get, both arms' recipes, the evaluation, the seeds."""

    name: str = MISSING
    train_samples: int = MISSING  # training samples (documents / rows) each arm sees
    seeds: list[int] = field(default_factory=lambda: [0])
    # trainer precision of every stage of both arms: "auto" = the recipes' own on a GPU and, on a CPU, the one
    # this CPU trains fastest in (perf.fastest_cpu_precision: bf16-mixed with AMX, else 32-true); or any
    # Lightning precision string, e.g. "32-true"
    precision: str = "auto"
    data: DataSpec = field(default_factory=DataSpec)
    native: NativeArm = field(default_factory=NativeArm)
    baseline: BaselineArm = field(default_factory=BaselineArm)
    eval: EvalSpec = field(default_factory=EvalSpec)
    stage3: PreferenceStage = field(default_factory=PreferenceStage)

    def __post_init__(self) -> None:
        if self.train_samples != MISSING and self.train_samples < 1:
            raise ValueError(f"train_samples={self.train_samples} must be >= 1")
        if not isinstance(self.precision, str) or not self.precision:
            raise ValueError(f"precision={self.precision!r} must be 'auto' or a Lightning precision string")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} must be a non-empty list without repeats")


def load_compare_config(path: str | Path, overrides: list[str] = ()) -> CompareConfig:
    """Parse and validate a compare YAML; ``overrides`` are OmegaConf dotlist entries (``eval.captions=10``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compare config not found: {path}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(CompareConfig), OmegaConf.create(load_plain_yaml(path)),
                                 OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as err:
        raise CompareConfigError(f"{path} is malformed: {err}") from err
