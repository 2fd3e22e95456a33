"""Task formats, defined once: each format's training document (with its loss mask) and both arms' prompts.

::

    from chameleon_lite.data import task_formats as tf
    tf.document_pieces(tf.FORMATS["qa"], {"image": I, "question": q, "answer": a}, tf.control_ids(vocab))
    # -> [([bos], False), (I, False), (q, False), ([sep], False), (a, True), ([eos], True)]
    tf.prompt_ids("qa", {"image": I, "question": q}, vocab)          # -> [bos, *I, *q, sep]: the generation prompt

A format is data: its parts in order, each a field of the sample or a control token, each in the loss or not
(``I`` is an image, the loss covers the parts in ``[...]``)::

    kind  format             document                                             prompt (generation time)
    pair  caption            <bos> I [caption <eos>]                              <bos> I
          generation         <bos> caption <boi> [codes <eoi>] <eos>              <bos> caption <boi>
          generation_uncond  <bos> <boi> [codes <eoi>] <eos>                      <bos> <boi>   (CFG's other stream)
    qa    qa                 <bos> I question <sep> [answer <eos>]                <bos> I question <sep>
          qa_per_image       <bos> I (question <sep> [answer <eos>])*             <bos> I question <sep>
    doc   doc                <bos> [segment segment .. <eos>]                     <bos> segment ..

The field ``image`` is whatever stands for one image in the arm's sequence: the native arm's
``Vocab.image_to_ids`` (``<boi> c_0 .. c_{h*w-1} <eoi>``, with the bundle's ``use_eol`` an ``<eol>`` after each
row: the one place the framing is written), the baseline's single ``Vocab.image_placeholder``. ``image_codes`` is
``image`` without its ``<boi>`` (the generation formats put the ``<boi>`` in the prompt).

**The prompt is the document's prefix before its response**: the parts up to the first loss-bearing part the
caller did not supply (``prompt_ids``). A question's prompt stops before the answer, a caption's before the
caption; a document's prompt is its supplied segments (the model continues the document). ``tests/
test_task_formats.py`` checks this for every format, both arms, against the datamodules' real documents.

Users: ``data.token_documents`` (native training documents), ``data.token_datamodule`` (format columns),
``data.baseline_data`` (baseline rows), ``generation.build_prompt_ids`` and
``baseline_generation.build_baseline_prompt`` (prompts, through ``generation_prompt``) and
``lit_preference.response_rows`` (the scored response). Adding a format means adding it here (and to
``SAMPLE_FORMATS`` if the token documents should hold it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CONTROLS", "TaskFormat", "FORMATS", "SAMPLE_FORMATS", "PAIR_FORMATS", "QA_FORMATS", "column",
           "control_ids", "document_pieces", "prompt_ids", "image_prefix", "image_response", "generation_prompt"]

CONTROLS = ("bos", "eos", "sep", "boi")
"""Part names that are control tokens (``Vocab`` attributes of the same name); every other part is a field."""


@dataclass(frozen=True)
class TaskFormat:
    """One task format.

    Args:
        name: the format's name (a key of ``FORMATS``).
        kind: the sample kind it is built from (``data.pretokenize.KINDS``: ``pair``, ``qa``, ``doc``).
        parts: ``(part, in_loss)`` in order; a part is a control token (``CONTROLS``) or a field of the sample
            (``segments`` is a list of id sequences, every one a part).
        repeated: parts that follow ``parts`` once per item (``qa_per_image``: per question about the image); a
            format without them takes exactly one item.
    """

    name: str
    kind: str
    parts: tuple[tuple[str, bool], ...]
    repeated: tuple[tuple[str, bool], ...] = ()

    def all_parts(self) -> tuple[tuple[str, bool], ...]:
        return self.parts + self.repeated


_QA_ITEM = (("question", False), ("sep", False), ("answer", True), ("eos", True))
FORMATS: dict[str, TaskFormat] = {f.name: f for f in (
    TaskFormat("caption", "pair", (("bos", False), ("image", False), ("caption", True), ("eos", True))),
    # no loss on the final <eos>: without its caption, <bos> I <eos> would share a caption document's prefix
    TaskFormat("generation", "pair", (("bos", False), ("caption", False), ("boi", False), ("image_codes", True),
                                      ("eos", False))),
    TaskFormat("generation_uncond", "pair", (("bos", False), ("boi", False), ("image_codes", True),
                                             ("eos", False))),
    TaskFormat("qa", "qa", (("bos", False), ("image", False), *_QA_ITEM)),
    TaskFormat("qa_per_image", "qa", (("bos", False), ("image", False)), _QA_ITEM),
    TaskFormat("doc", "doc", (("bos", False), ("segments", True), ("eos", True))),
)}

SAMPLE_FORMATS: dict[str, tuple[str, ...]] = {
    "pair": ("caption", "generation", "generation_uncond"),
    "qa": ("qa", "qa_per_image"),  # qa_per_image only for the first question about an image
    "doc": ("doc",),
}
"""The formats the token documents hold for each sample kind, in the order of ``TokenDocuments.sample_formats``'
columns."""
PAIR_FORMATS = SAMPLE_FORMATS["pair"]
QA_FORMATS = SAMPLE_FORMATS["qa"]


def column(name: str) -> int:
    """The ``TokenDocuments.sample_formats`` column of format ``name`` (within its kind's columns)."""
    return SAMPLE_FORMATS[FORMATS[name].kind].index(name)


def control_ids(vocab: Any) -> dict[str, list[int]]:
    """``CONTROLS`` -> ``[id]`` for ``vocab``."""
    return {name: [getattr(vocab, name)] for name in CONTROLS}


def _field(fields: Mapping[str, Any], part: str, fmt: TaskFormat) -> Any:
    if part == "image_codes" and "image_codes" not in fields and "image" in fields:
        return fields["image"][1:]  # the framed image after its <boi>
    if part not in fields:
        raise KeyError(f"format {fmt.name!r} needs the field {part!r} (got {sorted(fields)})")
    return fields[part]


def document_pieces(fmt: TaskFormat, fields: Mapping[str, Any], controls: Mapping[str, Sequence[int]],
                    items: Sequence[Mapping[str, Any]] | None = None) -> list[tuple[Sequence[int], bool]]:
    """The training document of ``fmt`` as ``(ids, in_loss)`` pieces, in order.

    ``fields``: the sample's parts (id sequences; ``segments`` a list of them); ``controls``: ``control_ids`` or
    the same as arrays; ``items``: the fields of each repetition of ``fmt.repeated`` (default: ``[fields]``).
    """
    out: list[tuple[Sequence[int], bool]] = []

    def add(parts: tuple[tuple[str, bool], ...], values: Mapping[str, Any]) -> None:
        for part, in_loss in parts:
            if part in controls:
                out.append((controls[part], in_loss))
            elif part == "segments":
                out.extend((seg, in_loss) for seg in _field(values, part, fmt))
            else:
                out.append((_field(values, part, fmt), in_loss))

    add(fmt.parts, fields)
    if fmt.repeated:
        for item in [fields] if items is None else items:
            add(fmt.repeated, item)
    elif items is not None and len(items) != 1:
        raise ValueError(f"format {fmt.name!r} takes one item, got {len(items)}")
    return out


def prompt_ids(fmt: TaskFormat | str, fields: Mapping[str, Any], vocab: Any) -> list[int]:
    """The generation prompt of ``fmt``: the document's parts up to the first loss-bearing part not in ``fields``
    (control tokens are never supplied), i.e. the training document's prefix before its response."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    controls = control_ids(vocab)
    ids: list[int] = []
    for part, in_loss in fmt.all_parts():
        if in_loss and (part in controls or part not in fields):
            break
        if part in controls:
            ids += controls[part]
        elif part == "segments":
            ids += [int(i) for seg in fields[part] for i in seg]
        else:
            ids += [int(i) for i in _field(fields, part, fmt)]
    return ids


def image_response(fmt: TaskFormat | str, fields: Mapping[str, Any], vocab: Any) -> tuple[list[int], list[int]]:
    """``(context, response)``: one item's ids after the image, split where the loss begins (a question and its
    ``<sep>``, then the answer and ``<eos>``; a caption has no context). The baseline stores these per sample."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    parts = fmt.all_parts()
    names = [p for p, _ in parts]
    if "image" not in names:
        raise ValueError(f"format {fmt.name!r} has no image part")
    after = parts[names.index("image") + 1:]
    ids = [(list(control_ids(vocab).get(p) or _field(fields, p, fmt)), in_loss) for p, in_loss in after]
    first = next((k for k, (_, in_loss) in enumerate(ids) if in_loss), len(ids))
    if not all(in_loss for _, in_loss in ids[first:]):
        raise ValueError(f"format {fmt.name!r}: its loss-bearing parts after the image are not one response")
    return ([int(i) for seg, _ in ids[:first] for i in seg], [int(i) for seg, _ in ids[first:] for i in seg])


def image_prefix(fmt: TaskFormat | str, fields: Mapping[str, Any], vocab: Any) -> list[int]:
    """The ids up to and including the image (``<bos> I``): a row's start before ``image_response``'s items."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    names = [p for p, _ in fmt.parts]
    head = TaskFormat(fmt.name, fmt.kind, fmt.parts[:names.index("image") + 1])
    return prompt_ids(head, fields, vocab)


def generation_prompt(mode: str, segments: Sequence[Any], vocab: Any, encode: Callable[[str], list[int]],
                      image_ids: Callable[[Any], Sequence[int]]) -> list[int]:
    """A generation prompt from checked segments (``str``, anything else an image), in the format of ``mode``.

    ``encode``: text -> ids; ``image_ids``: image -> the arm's ids for it (called once per image, in order).

    - ``"text"``, one image and some text: ``qa`` (the image first whatever the order; the texts, stripped, joined
      with a space form the question); one image alone: ``caption``; anything else: ``doc`` (the segments in order).
    - ``"image"``: ``generation``, its caption being all segments in order (a text, or text and images).
    - ``"interleaved"``: ``doc``.
    """
    images = [s for s in segments if not isinstance(s, str)]
    texts = [s.strip() for s in segments if isinstance(s, str)]
    if mode == "text" and len(images) == 1 and texts:
        return prompt_ids("qa", {"image": image_ids(images[0]), "question": encode(" ".join(texts))}, vocab)
    encoded = [encode(s.strip()) if isinstance(s, str) else list(image_ids(s)) for s in segments]
    if mode == "text" and len(images) == 1:
        return prompt_ids("caption", {"image": encoded[0]}, vocab)
    if mode == "image":
        return prompt_ids("generation", {"caption": [i for seg in encoded for i in seg]}, vocab)
    return prompt_ids("doc", {"segments": encoded}, vocab)
