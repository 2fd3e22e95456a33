"""The generation engine: batched, KV-cached decoding of text and image codes from one decoder.

:func:`iter_generate_ids` yields one token per row per step; :func:`generate_ids` collects them. Both are
re-exported by :mod:`chameleon_lite.generation.native`, which builds prompts from strings and images on top. The logits
processors and the modality constraint live in :mod:`chameleon_lite.generation.sampling`, the decode step (the
decoder's own
forward on one token per row) in :mod:`chameleon_lite.generation.fast_decode`.

Notable features:

- One KV cache preallocated for ``rows x (longest prompt + max_new_tokens)``, LEFT padded: pad slots carry their
  own document id (real tokens never attend to them) and positions start at 0 at each prompt's first real token.
- One prefill forward for all prompts: rows of different lengths are packed back to back as documents of a single
  row (no compute on pad slots, e.g. the short unconditional prompt of guidance) and their keys/values are copied
  into the padded cache. ``prompt_embeds`` prefills from the caller's input embeddings instead of the ids (the
  encoder-projector baseline).
- One token per step for the whole batch through ``Decoder.forward`` itself (``fast_decode.DecodeStep``; the cache
  carries per-call copies of the concatenated block weights, ``Decoder.new_cache(prepare_weights=True)``),
  computing only the logit columns the step can use (text, or image codes). ``decode_step="static"`` runs the same
  forward on a static cache, ``"cuda_graph"`` replays it as CUDA graphs
  (:mod:`chameleon_lite.generation.static_decode`).
- A row finishes on ``<eos>`` or a stop id (outside images), or after ``<eoi>`` in ``"image"`` mode; finished rows
  keep being fed a pad token (the batch stays static, their output is frozen); the loop ends when all are done.
- Randomness from a ``torch.Generator`` seeded per call; a sampler whose draw can never be used (greedy-only
  calls) is skipped, which never changes what a seed produces.
- Classifier-free guidance: the conditional and unconditional streams are the two halves of one ``2B``-row batch
  (one forward per step); image-code logits are ``uncond + cfg_scale * (cond - uncond)``; the sampled token is fed
  to both halves.
- On CPU, small models decode single-threaded (:func:`~chameleon_lite.generation.fast_decode.decode_threads`); the
  caller's
  thread setting is restored whenever control returns to it between steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chameleon_lite.generation.config import DECODE_STEPS
from chameleon_lite.generation.fast_decode import DecodeStep, IntraOpThreads, decode_threads
from chameleon_lite.generation.sampling import (
    MODES,
    ModalityConstraint,
    SamplingParams,
    apply_processors,
    check_generation_args,
)
from chameleon_lite.generation.static_decode import CUDAGraphDecodeStep
from chameleon_lite.model.decoder import Decoder
from chameleon_lite.tokenization.vocab import Vocab

DEFAULT_MAX_NEW_TEXT_TOKENS = 64

__all__ = ["DEFAULT_MAX_NEW_TEXT_TOKENS", "generate_ids", "iter_generate_ids"]


@dataclass
class _Batch:
    ids: torch.Tensor  # (R, L) left-padded prompt ids
    document_ids: torch.Tensor  # (R, L) 1 on pad slots, 0 on real tokens
    position_ids: torch.Tensor  # (R, L) 0.. from each prompt's first real token
    lengths: torch.Tensor  # (R,) real prompt lengths


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> _Batch:
    longest = max(len(p) for p in prompts)
    rows = len(prompts)
    ids = torch.full((rows, longest), pad_id, dtype=torch.long)
    document_ids = torch.ones(rows, longest, dtype=torch.long)
    position_ids = torch.zeros(rows, longest, dtype=torch.long)
    for r, prompt in enumerate(prompts):
        n = len(prompt)
        ids[r, longest - n :] = torch.tensor(list(prompt), dtype=torch.long)
        document_ids[r, longest - n :] = 0
        position_ids[r, longest - n :] = torch.arange(n)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return _Batch(ids.to(device), document_ids.to(device), position_ids.to(device), lengths.to(device))


def _check_prompt_ids(prompts: Any, vocab: Vocab, what: str) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"{what} must be a non-empty list of id lists")
    checked = []
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        if not ids:
            raise ValueError(f"{what}[{i}] is empty")
        bad = [t for t in ids if not 0 <= t < vocab.size]
        if bad:
            raise ValueError(f"{what}[{i}] has id {bad[0]} outside the vocabulary [0, {vocab.size})")
        checked.append(ids)
    return checked


def _check_prompt_embeds(prompt_embeds: Any, prompts: list[list[int]], decoder: torch.nn.Module) -> list[torch.Tensor]:
    if isinstance(prompt_embeds, torch.Tensor) and prompt_embeds.dim() == 3:
        prompt_embeds = list(prompt_embeds.unbind(0))  # one (T, d) tensor per prompt
    if isinstance(prompt_embeds, torch.Tensor) or not isinstance(prompt_embeds, Sequence):
        raise ValueError(f"prompt_embeds must be a list of (T_i, d_model) tensors, got {type(prompt_embeds).__name__}")
    if len(prompt_embeds) != len(prompts):
        raise ValueError(f"prompt_embeds has {len(prompt_embeds)} tensors, prompts has {len(prompts)}")
    weight = decoder.embed_tokens.weight
    d_model = weight.shape[-1]
    checked = []
    for i, (embeds, prompt) in enumerate(zip(prompt_embeds, prompts)):
        if not isinstance(embeds, torch.Tensor):
            raise ValueError(f"prompt_embeds[{i}] must be a tensor, got {type(embeds).__name__}")
        if embeds.shape != (len(prompt), d_model):
            raise ValueError(f"prompt_embeds[{i}] has shape {tuple(embeds.shape)}, expected {(len(prompt), d_model)} "
                             f"(len(prompts[{i}]), d_model)")
        if embeds.dtype != weight.dtype:
            raise ValueError(f"prompt_embeds[{i}] has dtype {embeds.dtype}, the decoder computes in {weight.dtype} "
                             f"(cast it with .to({weight.dtype}))")
        checked.append(embeds.to(weight.device))
    return checked


def iter_generate_ids(
    decoder: torch.nn.Module,
    vocab: Vocab,
    grid: tuple[int, int],
    prompts: Sequence[Sequence[int]],
    *,
    mode: str = "text",
    max_new_tokens: int = DEFAULT_MAX_NEW_TEXT_TOKENS,
    sampling: SamplingParams | None = None,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    cfg_scale: float = 1.0,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    use_eol: bool = False,
    prompt_embeds: Sequence[torch.Tensor] | None = None,
    decode_step: str = "auto",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Decode step by step; yields ``(tokens (B,), emitted (B,) bool)`` once per step.

    ``emitted[b]`` is False for rows that had already finished (their ``tokens`` entry is meaningless). All
    arguments are validated before anything runs (see :func:`generate_ids` for their meaning).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    if decode_step not in DECODE_STEPS:
        raise ValueError(f"decode_step={decode_step!r} must be one of {DECODE_STEPS}")
    if decode_step == "cuda_graph" and decoder.training and decoder.config.dropout > 0:
        raise ValueError("decode_step='cuda_graph' needs the decoder in eval mode (or with dropout=0)")
    if decode_step == "cuda_graph" and decoder.embed_tokens.weight.device.type != "cuda":
        raise ValueError(f"decode_step='cuda_graph' needs the decoder on a CUDA device, it is on "
                         f"{decoder.embed_tokens.weight.device}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    seed, stop, cfg_scale = check_generation_args(vocab, sampling=sampling, seed=seed, stop_ids=stop_ids,
                                                  cfg_scale=cfg_scale)
    sampling = sampling if sampling is not None else SamplingParams()
    prompts = _check_prompt_ids(prompts, vocab, "prompts")
    stop = set(stop) | {vocab.eos}
    constraint = ModalityConstraint(vocab, grid, mode, use_eol)
    for i, prompt in enumerate(prompts):
        in_image, count = constraint.scan(prompt)
        if mode == "text" and in_image:
            raise ValueError(f"prompts[{i}] ends inside an image (after <boi>) but mode='text' cannot write codes")
        if mode == "image":
            if not in_image:
                raise ValueError(f"prompts[{i}] must end inside an image (with <boi>) in mode='image'")
            needed = constraint.body_len - count + 1
            if max_new_tokens < needed:
                raise ValueError(f"max_new_tokens={max_new_tokens} is too small: prompts[{i}] needs {needed} more "
                                 f"tokens to finish its image (codes and <eoi>)")
    use_cfg = cfg_scale != 1 or uncond_prompts is not None
    if use_cfg:
        if mode != "image":
            raise ValueError(f"classifier-free guidance (cfg_scale={cfg_scale}) needs mode='image', got {mode!r}")
        if prompt_embeds is not None:
            raise ValueError("prompt_embeds cannot be combined with classifier-free guidance (cfg_scale != 1 or "
                             "uncond_prompts given): the unconditional stream has no embeddings")
        if uncond_prompts is None:
            uncond_prompts = [[vocab.bos, vocab.boi]] * len(prompts)
        uncond_prompts = _check_prompt_ids(uncond_prompts, vocab, "uncond_prompts")
        if len(uncond_prompts) != len(prompts):
            raise ValueError(f"uncond_prompts has {len(uncond_prompts)} prompts, prompts has {len(prompts)}")
        for i, prompt in enumerate(uncond_prompts):
            if constraint.scan(prompt) != constraint.scan(prompts[i]):
                raise ValueError(f"uncond_prompts[{i}] must end at the same point of an image as prompts[{i}]")
    if prompt_embeds is not None:
        prompt_embeds = _check_prompt_embeds(prompt_embeds, prompts, decoder)
    all_prompts = list(prompts) + (list(uncond_prompts) if use_cfg else [])
    longest = max(len(p) for p in all_prompts)
    max_seq_len = decoder.config.max_seq_len
    if longest + max_new_tokens > max_seq_len:
        raise ValueError(f"longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"max_seq_len={max_seq_len}")
    request = _Request(vocab, constraint, prompts, all_prompts, max_new_tokens, sampling, seed, stop,
                       float(cfg_scale), use_cfg, mode, prompt_embeds, decode_step)
    return _decode_loop(decoder, request)


def _span(mask: torch.Tensor) -> tuple[int, int]:
    """``(first, last + 1)`` of the True entries of a boolean ``(V,)`` mask."""
    where = torch.nonzero(mask).flatten()
    return int(where[0]), int(where[-1]) + 1


def _prefill(decoder: torch.nn.Module, batch: _Batch, cache: Any, prompt_embeds: list[torch.Tensor] | None):
    """Run the prompts (ids, or the given embeddings) through the decoder into ``cache``; returns each row's
    last-token logits ``(R, V_padded)``.

    Left-padded rows that differ in length are packed back to back into ONE row of documents (no compute on pad
    slots, e.g. the short unconditional prompt of guidance) and their keys/values are then copied into the
    left-padded cache, when that is cheaper (``N <= R * L``, packed attention ``N^2 <= R * L^2``) and fits
    ``max_seq_len``. Otherwise (or for a decoder other than ``Decoder``) the padded batch goes through one
    forward, pad slots holding the pad id's embedding.
    """
    R, L = batch.ids.shape
    lengths = batch.lengths.tolist()
    N = sum(lengths)
    # packing pays when the padded batch wastes compute and the packed row's attention (N^2) is not dearer
    if (isinstance(decoder, Decoder) and R > 1 and N < R * L and N * N <= R * L * L
            and N <= decoder.config.max_seq_len and cache.length == 0):
        real = batch.document_ids == 0  # (R, L)
        document_ids = torch.repeat_interleave(torch.arange(R, device=real.device), batch.lengths)[None]  # (1, N)
        packed = decoder.new_cache(1, N)
        kwargs = dict(position_ids=batch.position_ids[real][None], document_ids=document_ids, cache=packed)
        if prompt_embeds is None:
            logits = decoder(batch.ids[real][None], **kwargs)  # (1, N, V_padded)
        else:
            logits = decoder(inputs_embeds=torch.cat(prompt_embeds)[None], **kwargs)
        start = 0
        for r, n in enumerate(lengths):  # document r -> the last n slots of row r
            cache.k[:, r, :, L - n : L] = packed.k[:, 0, :, start : start + n]
            cache.v[:, r, :, L - n : L] = packed.v[:, 0, :, start : start + n]
            start += n
        cache.append_document_ids(batch.document_ids, L)
        cache.advance(L)
        return logits[0, torch.cumsum(batch.lengths, 0) - 1]  # (R, V_padded)
    kwargs = dict(position_ids=batch.position_ids, document_ids=batch.document_ids, cache=cache)
    if prompt_embeds is None:
        return decoder(batch.ids, **kwargs)[:, -1]
    embed = decoder.embed if hasattr(decoder, "embed") else decoder.embed_tokens
    embeds = embed(batch.ids)  # (R, L, d): pad slots keep the pad id's embedding
    for r, row in enumerate(prompt_embeds):
        embeds[r, L - row.shape[0] :] = row
    return decoder(inputs_embeds=embeds, **kwargs)[:, -1]


@dataclass
class _Request:
    """One validated call of :func:`iter_generate_ids` (what :func:`_decode_steps` runs)."""

    vocab: Vocab
    constraint: ModalityConstraint
    prompts: list[list[int]]  # the B conditional prompts
    all_prompts: list[list[int]]  # R rows: the prompts, then (guidance) the unconditional ones
    max_new_tokens: int
    sampling: SamplingParams
    seed: int
    stop: set[int]
    cfg_scale: float
    use_cfg: bool
    mode: str
    prompt_embeds: list[torch.Tensor] | None
    decode_step: str


def _decode_loop(decoder: torch.nn.Module, request: _Request) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Run :func:`_decode_steps`, each resumption with the intra-op thread count picked by ``decode_threads``
    (the caller's code between steps keeps its own setting)."""
    threads = IntraOpThreads(decode_threads(decoder))
    steps = _decode_steps(decoder, request)
    while True:
        with threads:
            item = next(steps, None)
        if item is None:
            return
        yield item


@torch.inference_mode()
def _decode_steps(decoder: torch.nn.Module, request: _Request) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    r = request
    vocab, constraint, prompts, all_prompts = r.vocab, r.constraint, r.prompts, r.all_prompts
    max_new_tokens, sampling, seed, stop, mode = r.max_new_tokens, r.sampling, r.seed, r.stop, r.mode
    cfg_scale, use_cfg, prompt_embeds, decode_step = r.cfg_scale, r.use_cfg, r.prompt_embeds, r.decode_step
    device = decoder.embed_tokens.weight.device
    B, R = len(prompts), len(all_prompts)  # R = 2B with guidance
    V = vocab.size
    batch = _left_pad(all_prompts, vocab.pad, device)
    longest = batch.ids.shape[1]
    # the cache carries inference copies of the block weights for this call (see Decoder.new_cache)
    cache = decoder.new_cache(R, longest + max_new_tokens, device=device, prepare_weights=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    constraint.reset(prompts, device)
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    pad = torch.tensor(vocab.pad, device=device)
    text_chain, image_chain = sampling.processors(image=False), sampling.processors(image=True)
    greedy_text, greedy_image = sampling.greedy(image=False), sampling.greedy(image=True)
    text_only = mode == "text"  # no row can ever be inside an image: the constraint is one constant mask
    text_banned = ~constraint.text_allowed  # (V,)
    # which token pickers can decide a token: skipping an unused sampler never changes what a seed produces
    use_argmax = greedy_text if text_only else (greedy_text or greedy_image)
    use_sampler = not greedy_text if text_only else not (greedy_text and greedy_image)
    if use_argmax and use_sampler:  # mixed: per-row choice by modality
        greedy_by_modality = torch.tensor([greedy_text, greedy_image], device=device)  # index: in_image

    # the logit columns a step can need (the rest is masked anyway): lets the fast step skip most of the output
    # head while every active row is inside an image (codes only), and a little of it in text
    text_columns = _span(constraint.text_allowed)
    image_allowed = constraint.code_allowed | constraint.eoi_only | (constraint.eol_only & constraint.use_eol)
    image_columns = _span(image_allowed)
    columns = text_columns if text_only else image_columns if mode == "image" else None

    logits = _prefill(decoder, batch, cache, prompt_embeds)[:, :V].float()  # (R, V)
    step_fn = _make_step(decoder, cache, V, decode_step)
    next_positions = batch.lengths.clone()  # (R,)
    active = torch.ones(B, dtype=torch.bool, device=device)
    all_active = True
    for step in range(max_new_tokens):
        if text_only:
            logits = apply_processors(logits.masked_fill(text_banned, float("-inf")), text_chain)  # (B, V)
            in_image = None
        else:
            in_image = constraint.in_image.clone()  # (B,) modality of the token about to be sampled
            if use_cfg:  # mode "image": every active row is inside its image, so every row is guided
                logits = torch.lerp(logits[B:], logits[:B], cfg_scale)  # uncond + cfg_scale * (cond - uncond)
            logits = constraint(logits)  # (B, V)
            if text_chain or image_chain:
                logits = torch.where(in_image[:, None], apply_processors(logits, image_chain),
                                     apply_processors(logits, text_chain))
        if use_sampler:
            probs = logits.softmax(dim=-1)  # (B, V)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        if use_argmax:
            argmax = logits.argmax(dim=-1)  # (B,)
            if use_sampler:
                greedy_rows = greedy_by_modality[in_image.long()]  # (B,)
                tokens = torch.where(greedy_rows, argmax, tokens)
            else:
                tokens = argmax
        if not all_active:
            tokens = torch.where(active, tokens, pad)
        yield tokens, active

        if text_only:  # host-side check (the loop syncs once per step anyway)
            hits = [t in stop for t in tokens.tolist()]
            finished = torch.tensor(hits, device=device) if any(hits) else None
        else:
            constraint.advance(tokens)
            finished = ~in_image & torch.isin(tokens, stop_ids)
            if mode == "image":
                finished |= in_image & (tokens == vocab.eoi)
        if finished is not None and bool(finished.any()):
            active = active & ~finished
            all_active = False
            if not bool(active.any()):
                return
        if step == max_new_tokens - 1:
            return
        feed = torch.cat((tokens, tokens)) if use_cfg else tokens  # (R,)
        if mode == "interleaved":  # the columns the active rows can use: text, image, or (mixed) all
            states = {i for i, a in zip(constraint.in_image.tolist(), active.tolist()) if a}
            columns = None if len(states) > 1 else image_columns if True in states else text_columns
        logits = step_fn(feed, next_positions, columns)  # (R, V)
        next_positions += 1


def _make_step(decoder, cache, V: int, decode_step: str):
    """The per-step callable ``(tokens (R,), positions (R,), columns) -> logits (R, V)``: the decoder's own forward
    on one token per row, eager (``"static"``: with the cache in static mode) or replayed as a CUDA graph."""
    if decode_step == "cuda_graph":
        return CUDAGraphDecodeStep(decoder, cache, vocab_size=V)
    return DecodeStep(decoder, cache, vocab_size=V, static=decode_step == "static")


def generate_ids(
    decoder: torch.nn.Module,
    vocab: Vocab,
    grid: tuple[int, int],
    prompts: Sequence[Sequence[int]],
    *,
    mode: str = "text",
    max_new_tokens: int = DEFAULT_MAX_NEW_TEXT_TOKENS,
    sampling: SamplingParams | None = None,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    cfg_scale: float = 1.0,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    use_eol: bool = False,
    prompt_embeds: Sequence[torch.Tensor] | None = None,
    decode_step: str = "auto",
) -> list[list[int]]:
    """Generate continuations of id prompts; returns the new ids of each prompt (its stop token included).

    Args:
        decoder: a ``Decoder`` (put it in eval mode: dropout is not switched off here).
        vocab: the unified vocabulary (named ids, ranges).
        grid: ``(h, w)`` codes per image.
        prompts: one list of ids per row, any lengths (left padded internally).
        mode: ``"text"`` (image codes and ``<boi>`` banned), ``"image"`` (each prompt must end inside an image,
            i.e. with ``<boi>``; exactly ``h*w`` codes then ``<eoi>``, then the row stops) or ``"interleaved"``.
        max_new_tokens: new tokens per row at most.
        sampling: text and image temperature / top-k / top-p (default: plain sampling at temperature 1).
        seed: seeds the ``torch.Generator`` of this call (same seed, same inputs -> same output); an int in
            ``[0, 2**64 - 1]``.
        stop_ids: ids that end a row when emitted outside an image (``<eos>`` always does); ints inside the
            vocabulary.
        cfg_scale: classifier-free guidance weight (``>= 1``; mode ``"image"`` only).
        uncond_prompts: the unconditional stream's prompts (default ``<bos> <boi>`` each); passing them turns the
            guided path on even at ``cfg_scale == 1``.
        use_eol: images carry ``<eol>`` after each row of codes.
        prompt_embeds: optional input embeddings for the prefill: one ``(len(prompts[i]), d_model)`` tensor per
            prompt (or one ``(N, T, d_model)`` tensor for equal lengths) in the decoder's dtype, e.g.
            ``decoder.embed(ids)`` with projected image features spliced in (the encoder-projector baseline). The
            prompt forward then reads these instead of embedding the ids (pad slots get the pad id's embedding);
            the ids still define the lengths and the modality state, and generated tokens are embedded as usual.
            Not allowed with guidance.
        decode_step: how each step runs (see ``GenerationConfig.decode_step``): ``"fast"`` / ``"auto"`` (the
            decoder's forward, eager), ``"static"`` (the same forward on a static cache, eager: for checking) or
            ``"cuda_graph"`` (that static forward captured as CUDA graphs and replayed; CUDA only).

    Raises:
        ValueError: a bad parameter (named; :func:`~chameleon_lite.generation.sampling.check_generation_args`), an
            empty or out-of-vocabulary prompt, or a prompt + budget longer than ``max_seq_len``. TypeError: a parameter
            of the wrong type (a float seed, a bool temperature, a string stop id). Everything is checked before any
            forward runs.
    """
    steps = iter_generate_ids(decoder, vocab, grid, prompts, mode=mode, max_new_tokens=max_new_tokens,
                              sampling=sampling, seed=seed, stop_ids=stop_ids, cfg_scale=cfg_scale,
                              uncond_prompts=uncond_prompts, use_eol=use_eol, prompt_embeds=prompt_embeds,
                              decode_step=decode_step)
    outputs: list[list[int]] = [[] for _ in prompts]
    for tokens, emitted in steps:
        for out, token, keep in zip(outputs, tokens.tolist(), emitted.tolist()):
            if keep:
                out.append(token)
    return outputs
