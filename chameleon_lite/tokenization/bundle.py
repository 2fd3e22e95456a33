"""Tokenizer bundles: the directory that fixes how text and images become ids.

A bundle directory (``tokenizers/<name>/``) holds::

    tokenizer.yaml                  layout of the vocabulary, image grid, VQ settings (schema: BundleConfig)
    text.model                      sentencepiece model
    image_tokenizer.safetensors     VQ weights (once an image tokenizer is trained)
    README.md                       how it was made and its measured quality

    manifest.json                   the files ``save_bundle`` wrote (``chameleon_lite.safe_io``; optional on load)

``tokenizer.yaml`` is validated against OmegaConf structured dataclasses: wrong types and unknown keys fail on
load with the file named. It is read as plain data: a ``${...}`` interpolation is refused, never resolved
(``safe_io.load_plain_yaml``). Weights are safetensors only; nothing here unpickles anything. ``save_bundle``
writes through ``safe_io.write_dir``: it replaces only files it wrote before and refuses a non-empty directory
it did not write (bundles shipped before manifests existed still load, but are not written over).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import MISSING
from safetensors import SafetensorError

from chameleon_lite.safe_io import load_structured_yaml, save_structured_yaml, write_dir
from chameleon_lite.tokenization.image_tokenizer import WEIGHTS_NAME, VQImageTokenizer
from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig
from chameleon_lite.tokenization.text_tokenizer import TextTokenizer
from chameleon_lite.tokenization.vocab import CONTROL_TOKENS, Vocab

CONFIG_FILE = "tokenizer.yaml"
TEXT_FILE = "text.model"
IMAGE_WEIGHTS_FILE = WEIGHTS_NAME  # "image_tokenizer.safetensors"
README_FILE = "README.md"
FORMAT_VERSION = 1


@dataclass
class VocabSpec:
    """The vocabulary layout as written in ``tokenizer.yaml`` (derived fields are checked on load)."""

    n_text: int = MISSING
    codebook_size: int = MISSING
    n_reserved: int = 4
    control_tokens: list[str] = field(default_factory=lambda: list(CONTROL_TOKENS))
    image_offset: int = MISSING
    size: int = MISSING


@dataclass
class BundleConfig:
    """Schema of ``tokenizer.yaml``."""

    name: str = MISSING
    format_version: int = FORMAT_VERSION
    vocab: VocabSpec = field(default_factory=VocabSpec)
    image_grid: list[int] = field(default_factory=lambda: [8, 8])  # (h, w) codes per image
    image_tokenizer: ImageTokenizerConfig | None = None  # VQ model settings; None until one is trained
    use_eol: bool = False  # whether images carry an <eol> token after each row of codes
    notes: str = ""


@dataclass
class TokenizerBundle:
    """Everything that turns text and images into ids of one vocabulary, and back."""

    name: str
    text: TextTokenizer
    vocab: Vocab
    image_grid: tuple[int, int] = (8, 8)
    image_tokenizer: VQImageTokenizer | None = None  # once one is trained
    use_eol: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        if self.text.vocab_size != self.vocab.n_text:
            raise ValueError(
                f"vocab.n_text={self.vocab.n_text} but the text tokenizer has {self.text.vocab_size} pieces"
            )
        if len(self.image_grid) != 2:
            raise ValueError(f"image_grid must be two positive ints [h, w], got {list(self.image_grid)}")
        try:
            h, w = (int(x) for x in self.image_grid)
        except (TypeError, ValueError, OverflowError) as err:
            raise ValueError(f"image_grid must be two positive ints [h, w], got {list(self.image_grid)}") from err
        if h < 1 or w < 1:
            raise ValueError(f"image_grid must be two positive ints, got {self.image_grid}")
        self.image_grid = (h, w)

    @property
    def image_tokens(self) -> int:
        """Ids one image takes in a sequence, ``<boi>`` and ``<eoi>`` included."""
        h, w = self.image_grid
        return h * w + (h if self.use_eol else 0) + 2

    def config(self) -> BundleConfig:
        return BundleConfig(
            name=self.name,
            vocab=VocabSpec(**self.vocab.to_dict()),
            image_grid=list(self.image_grid),
            image_tokenizer=self.image_tokenizer.config if self.image_tokenizer is not None else None,
            use_eol=self.use_eol,
            notes=self.notes,
        )


def save_bundle(
    bundle: TokenizerBundle,
    path: str | Path,
    readme: str | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Write ``bundle`` to the directory ``path`` and return it.

    Args:
        bundle: the bundle to write.
        path: an absent or empty directory, or one an earlier ``save_bundle`` wrote (its ``manifest.json``
            files are replaced, other files are left alone); any other non-empty directory raises
            ``FileExistsError``.
        readme: text of ``README.md`` (None: keep the README written before, else a generated one).
        extra_files: more files to write with the bundle, name -> text or bytes (e.g. measured quality).

    A string holding ``${`` (an interpolation) is refused with ``ValueError``; nothing is written then.
    """
    path = Path(path)
    if readme is None and (path / README_FILE).is_file():
        readme = (path / README_FILE).read_text(encoding="utf-8")  # kept (replaced only if ours: write_dir)

    def build(out: Path) -> None:
        save_structured_yaml(bundle.config(), out / CONFIG_FILE)
        bundle.text.save(out / TEXT_FILE)
        if bundle.image_tokenizer is not None:
            bundle.image_tokenizer.save_weights(out / IMAGE_WEIGHTS_FILE)
        (out / README_FILE).write_text(readme if readme is not None else _default_readme(bundle), encoding="utf-8")
        for name, content in (extra_files or {}).items():
            target = out / name
            if target.exists() or Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"extra file {name!r} is not a new plain name inside the bundle directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")

    return write_dir(path, build, kind="tokenizer_bundle")


def load_bundle(path: str | Path, *, load_image_tokenizer: bool = True) -> TokenizerBundle:
    """Load and validate a bundle directory. Errors name the file that is missing or malformed."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer bundle directory not found: {path}")
    cfg = load_bundle_config(path / CONFIG_FILE)
    if cfg.format_version != FORMAT_VERSION:
        raise ValueError(
            f"{path / CONFIG_FILE}: format_version {cfg.format_version} is not supported (only {FORMAT_VERSION})"
        )
    try:
        vocab = Vocab.from_dict(asdict(cfg.vocab))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path / CONFIG_FILE}: bad vocab section: {err}") from err
    text = TextTokenizer.load(path / TEXT_FILE)
    image_tokenizer = None
    if cfg.image_tokenizer is not None and load_image_tokenizer:
        weights = path / IMAGE_WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{path / CONFIG_FILE} describes an image tokenizer but {weights} is missing")
        try:
            image_tokenizer = VQImageTokenizer.load(weights, config=cfg.image_tokenizer).eval()
        except (SafetensorError, OSError) as err:  # truncated or not a safetensors file at all
            raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {err}") from err
        except ValueError as err:
            raise ValueError(f"{weights} does not match {path / CONFIG_FILE}: {err}") from err
        _check_image_tokenizer(image_tokenizer, vocab, tuple(cfg.image_grid), path / CONFIG_FILE)
    try:
        return TokenizerBundle(
            name=cfg.name,
            text=text,
            vocab=vocab,
            image_grid=tuple(cfg.image_grid),
            image_tokenizer=image_tokenizer,
            use_eol=cfg.use_eol,
            notes=cfg.notes,
        )
    except ValueError as err:
        raise ValueError(f"{path / CONFIG_FILE}: {err}") from err


def load_bundle_config(file: str | Path) -> BundleConfig:
    """Parse ``tokenizer.yaml`` against :class:`BundleConfig` (typed, unknown keys rejected, never interpolated)."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"bundle config not found: {file}")
    return load_structured_yaml(file, BundleConfig)


def _check_image_tokenizer(model: VQImageTokenizer, vocab: Vocab, grid: tuple[int, int], file: Path) -> None:
    if model.codebook_size != vocab.codebook_size:
        raise ValueError(
            f"{file}: vocab.codebook_size={vocab.codebook_size} but the image tokenizer has {model.codebook_size} codes"
        )
    if tuple(model.grid) != tuple(grid):
        raise ValueError(f"{file}: image_grid={list(grid)} but the image tokenizer produces {list(model.grid)}")


def _default_readme(bundle: TokenizerBundle) -> str:
    v = bundle.vocab
    h, w = bundle.image_grid
    return (
        f"# Tokenizer bundle `{bundle.name}`\n\n"
        f"- text pieces: {v.n_text} (sentencepiece BPE, byte fallback)\n"
        f"- control tokens: {', '.join(v.control_tokens)} + {v.n_reserved} reserved"
        f" (ids {v.n_text}..{v.image_offset - 1})\n"
        f"- image codes: {v.codebook_size} at ids {v.image_offset}..{v.size - 1}; {h}x{w} = {h * w} codes per image\n"
        f"- image tokenizer: {'included' if bundle.image_tokenizer is not None else 'not trained yet'}\n"
    )
