"""AUTOMATIC1111's ``<lora:…>`` prompt syntax: prompts → per-prompt LoRA mixtures (stdlib only).

Grammar (A1111's extra-network tags; ``lyco`` is an alias of ``lora``):

====================================== ===========================================================
``<lora:NAME>``                        text encoder and UNet strength 1
``<lora:NAME:W>``                      text encoder and UNet strength ``W``
``<lora:NAME:TE:UNET>``                separate strengths
``<lora:NAME:TE:UNET:DYN>``            a 4th positional item is DyLoRA's ``dyn`` rank (an int)
``<lora:NAME:…:te=X:unet=Y:dyn=R>``    named items override the positional ones, in any order
``<lora:NAME:0.2@0,1@0.5>``            a UNet strength schedule: keyframes ``W@P`` (see below)
``<lora:NAME:W:start=P:stop=Q>``       the UNet strength only from step ``P`` until step ``Q``
====================================== ===========================================================

A tag is ``<`` + its type (``\\w+``) + ``:`` + items split on ``:`` + ``>``. Only the types ``lora``
and ``lyco`` are parsed (case-sensitive, as in A1111); every other tag (``<hypernet:…>``) is left in
the text untouched. The first item is always ``NAME`` (even if it contains ``=``); among the others,
an item with ``=`` is named (``key=value``, split on the first ``=``), the rest are positional.
Whitespace around each item is stripped. As in A1111, an omitted UNet strength defaults to the text
encoder strength *after* a ``te=`` override, so ``<lora:x:te=0.5>`` gives both 0.5.

Weights are decimal numbers: sign, digits, optional exponent (``-0.5``, ``1e-1``, ``+.25``);
``nan``/``inf`` and Python's ``1_0`` are rejected. ``dyn`` must be an integer >= 1.

Strength schedules (as sd-webui-loractl and LoRA Block Weight's ``start=``/``stop=`` offer; the
rules are :mod:`lorakernels.schedule`'s): a UNet strength may be a comma list of keyframes
``W@P`` (``W`` a strength, ``P < 1`` a fraction of the run, ``P >= 1`` a 0-based step index),
interpolated linearly between keyframes; ``start=P``/``stop=P`` switch the UNet strength off
before ``P`` and from ``P`` on. The text encoder runs once per prompt, so its strength cannot
be scheduled: a single schedule item gives the text encoder the schedule's value at step 0 of
a one-step run (positions ``P < 1`` resolve to step 0 there); a schedule in the ``te`` place
next to a separate UNet strength, or in ``te=``, is an error.

Semantics of the result (:class:`ParsedPrompt`):

- ``tags``: every ``lora``/``lyco`` tag in order, strength 0 and unresolved ones included.
- ``unet`` / ``text_encoder``: the mixtures the rest of the package consumes
  (``dict[canonical name, strength]``, empty dict = base model). A name used twice gets the *sum*
  of its strengths (stacked, as A1111 applies both). Entries whose (summed) strength is exactly 0
  are left out. Keys are in order of first appearance.
- ``unet_schedule``: ``{canonical name: schedule}`` for adapters with a scheduled tag (summed
  with the adapter's other tags, :class:`lorakernels.schedule.Summed`); their ``unet`` entry
  holds the value at step 0 and stays in the mixture even when that is 0, so a consumer that
  holds the mixture's adapters for a run holds these. A consumer that does not run schedules
  must refuse a prompt with a non-empty ``unet_schedule`` rather than use ``unet`` alone.
- ``dyn`` is parsed and kept on each :class:`LoraTag` only; lorakernels does not implement DyLoRA
  rank truncation yet, so the mixtures ignore it (a consumer should refuse or warn when it is set).

Name resolution: ``known`` maps every accepted spelling (file stem, ``ss_output_name`` alias) to the
canonical adapter name; a plain collection of names maps each name to itself; ``None`` resolves
nothing (the name as written is the adapter name). Matching is exact (case-sensitive). An unknown
name raises :class:`UnknownLoraError` listing the known names (``on_unknown="raise"``), or emits an
:class:`UnknownLoraWarning` (``"warn"``) or nothing (``"ignore"``) and leaves the tag out of the
mixtures; its text is removed from the prompt in every mode.

Text cleanup (A1111 itself just cuts the tag out). Only the separator run around each removed tag
is rewritten; all other text is kept byte for byte. Tags separated only by whitespace/commas count
as one removal site. At each site the whitespace and commas on both sides are replaced by:

- nothing at the start or end of the prompt, after an opening ``( [ {`` or before a closing
  ``) ] }`` or ``:`` (so ``(cat <lora:x>:1.2)`` → ``(cat:1.2)``);
- otherwise ``", "`` if there was a comma on either side, ``" "`` if there was only whitespace
  (``"\\n"`` instead of the space if that whitespace held a newline), and nothing if the tag touched
  words on both sides (``cat<lora:x>dog`` → ``catdog``, as in A1111).

So ``"a cat, <lora:x:1>, sitting"`` → ``"a cat, sitting"`` and ``"<lora:x> a cat"`` → ``"a cat"``.
Each tag's ``span`` indexes the *original* prompt, for callers that want another cleanup.

Malformed tags (unclosed ``<lora:``, empty name, non-numeric or non-finite weight, a bad ``dyn``,
more than 4 positional items, an unknown or repeated named item, a keyframe that is not ``W@P``, a
negative position, a scheduled text-encoder strength) raise ``ValueError`` naming the
tag text and its 0-based character index in the prompt.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .schedule import Keyframes, Schedule, Summed

__all__ = [
    "LoraTag",
    "ParsedPrompt",
    "UnknownLoraError",
    "UnknownLoraWarning",
    "parse_prompt",
    "parse_prompts",
]

OnUnknown = Literal["raise", "warn", "ignore"]
_ON_UNKNOWN = ("raise", "warn", "ignore")
_KINDS = ("lora", "lyco")
_NAMED = ("te", "unet", "dyn", "start", "stop")

# Any extra-network tag opener; the kind is checked afterwards so other types are skipped whole.
_OPEN = re.compile(r"<(\w+):")
# Arguments run to the first '>'; a '<' or newline first means the tag was never closed (A1111's
# `[^>]+` would swallow the next tag or line into the name instead).
_ARGS = re.compile(r"[^<>\n]*")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INT = re.compile(r"[+-]?\d+")
_SEP = " \t\r\n\f\v,"
_OPENERS = "([{"
_CLOSERS = ")]}:"
_MAX_LISTED = 40  # known names shown in an error message


@dataclass(frozen=True)
class LoraTag:
    """One parsed ``<lora:…>``/``<lyco:…>`` tag.

    ``name`` is the name as written; ``adapter`` the canonical adapter it resolved to (``None`` if
    unknown and ``on_unknown`` was ``"warn"``/``"ignore"``). ``span`` is ``(start, end)`` of the tag
    text in the original prompt. ``dyn`` is DyLoRA's rank (not applied by lorakernels yet).
    """

    name: str
    adapter: str | None
    te: float
    unet: float
    dyn: int | None
    span: tuple[int, int]
    kind: str  # 'lora' | 'lyco'
    schedule: Keyframes | None = None


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt with its LoRA tags removed, the tags, and the summed per-component mixtures."""

    text: str
    tags: tuple[LoraTag, ...]
    unet: dict[str, float]
    text_encoder: dict[str, float]
    unet_schedule: dict[str, Schedule] = field(default_factory=dict)


class UnknownLoraError(KeyError, ValueError):
    """A tag names an adapter that ``known`` does not contain.

    Catchable as ``KeyError`` or ``ValueError``."""

    def __init__(self, message: str, name: str, span: tuple[int, int]) -> None:
        super().__init__(message)
        self.message = message
        self.name = name
        self.span = span

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and escapes included
        return self.message


class UnknownLoraWarning(UserWarning):
    """Emitted for an unknown adapter name when ``on_unknown="warn"``."""


def parse_prompt(
    prompt: str,
    known: Mapping[str, str] | Collection[str] | None = None,
    on_unknown: OnUnknown = "raise",
) -> ParsedPrompt:
    """Parse one prompt's ``<lora:…>`` tags; see the module docstring for grammar and semantics."""
    return _parse(prompt, _resolver(known), _check_on_unknown(on_unknown), "prompt")


def parse_prompts(
    prompts: Sequence[str],
    known: Mapping[str, str] | Collection[str] | None = None,
    on_unknown: OnUnknown = "raise",
) -> list[ParsedPrompt]:
    """:func:`parse_prompt` for each prompt of a batch; errors name ``prompts[i]``."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts: expected a sequence of str, got {type(prompts).__name__}")
    table = _resolver(known)
    mode = _check_on_unknown(on_unknown)
    return [_parse(p, table, mode, f"prompts[{i}]") for i, p in enumerate(prompts)]


def _check_on_unknown(on_unknown: str) -> str:
    if on_unknown not in _ON_UNKNOWN:
        raise ValueError(f"on_unknown: expected one of {_ON_UNKNOWN}, got {on_unknown!r}")
    return on_unknown


def _resolver(known: Mapping[str, str] | Collection[str] | None) -> dict[str, str] | None:
    if known is None:
        return None
    # A str is itself a Collection[str]; taking it as a set of one-letter names is never meant.
    if isinstance(known, (str, bytes)):
        raise TypeError("known: expected a mapping or a collection of names, got a single string")
    if isinstance(known, Mapping):
        table = dict(known.items())
    elif isinstance(known, Collection):
        table = {name: name for name in known}
    else:
        raise TypeError(f"known: expected a mapping or a collection, got {type(known).__name__}")
    for spelling, canonical in table.items():
        if not isinstance(spelling, str) or not isinstance(canonical, str):
            raise TypeError(f"known: names must be str, got {spelling!r} -> {canonical!r}")
    return table


def _parse(prompt: str, table: dict[str, str] | None, on_unknown: str, label: str) -> ParsedPrompt:
    if not isinstance(prompt, str):
        raise TypeError(f"{label}: expected str, got {type(prompt).__name__}")
    tags: list[LoraTag] = []
    pos = 0
    while (m := _OPEN.search(prompt, pos)) is not None:
        kind = m.group(1)
        if kind not in _KINDS:
            pos = m.end()  # another extension's tag: leave it in the text
            continue
        start = m.start()
        stop = _ARGS.match(prompt, m.end()).end()  # type: ignore[union-attr]  # `*` always matches
        if prompt[stop : stop + 1] != ">":
            found = "the end of the prompt" if stop == len(prompt) else repr(prompt[stop])
            raise ValueError(
                f"{label}: unclosed tag {prompt[start:stop]!r} at index {start} "
                f"(no '>' before {found})"
            )
        end = stop + 1
        tags.append(_parse_tag(prompt[start:end], kind, (start, end), table, on_unknown, label))
        pos = end

    unet: dict[str, float] = {}
    text_encoder: dict[str, float] = {}
    terms: dict[str, list[Schedule]] = {}  # every tag's UNet strength, per adapter
    for tag in tags:
        if tag.adapter is None:
            continue
        unet[tag.adapter] = unet.get(tag.adapter, 0.0) + tag.unet
        text_encoder[tag.adapter] = text_encoder.get(tag.adapter, 0.0) + tag.te
        terms.setdefault(tag.adapter, []).append(tag.schedule or tag.unet)
    schedules: dict[str, Schedule] = {}
    for name, parts in terms.items():
        if any(isinstance(p, Keyframes) for p in parts):
            schedules[name] = parts[0] if len(parts) == 1 else Summed(tuple(parts))
    return ParsedPrompt(
        text=_remove_spans(prompt, [t.span for t in tags]),
        tags=tuple(tags),
        unet={k: v for k, v in unet.items() if v != 0.0 or k in schedules},
        text_encoder={k: v for k, v in text_encoder.items() if v != 0.0},
        unet_schedule=schedules,
    )


def _parse_tag(
    text: str,
    kind: str,
    span: tuple[int, int],
    table: dict[str, str] | None,
    on_unknown: str,
    label: str,
) -> LoraTag:
    where = f"{label}: tag {text!r} at index {span[0]}"
    items = [item.strip() for item in text[len(kind) + 2 : -1].split(":")]
    name = items[0]
    if not name:
        raise ValueError(f"{where}: empty adapter name")
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items[1:]:
        key, eq, value = item.partition("=")
        if not eq:
            positional.append(item)
            continue
        key, value = key.strip(), value.strip()
        if key not in _NAMED:
            raise ValueError(
                f"{where}: unknown named item {key!r} (expected te=, unet=, dyn=, start=, stop=)"
            )
        if key in named:
            raise ValueError(f"{where}: named item {key}= given twice")
        named[key] = value
    if len(positional) > 3:
        raise ValueError(
            f"{where}: too many items ({len(positional) + 1}); expected at most NAME:TE:UNET:DYN"
        )

    te: float | Keyframes = _strength(positional[0], "weight", where) if positional else 1.0
    if "te" in named:
        if "@" in named["te"]:
            raise ValueError(
                f"{where}: te= cannot be scheduled (the text encoder runs once per prompt); "
                "schedule the UNet strength instead"
            )
        te = _weight(named["te"], "te", where)
    unet = _strength(positional[1], "UNet weight", where) if len(positional) > 1 else te
    if "unet" in named:
        unet = _strength(named["unet"], "unet", where)
    if isinstance(te, Keyframes):
        if unet is not te:
            raise ValueError(
                f"{where}: the text-encoder strength cannot be scheduled (the text encoder "
                "runs once per prompt); schedule the UNet strength instead"
            )
        te = te.at(0, 1)
    window = {k: _position(named[k], k, where) for k in ("start", "stop") if k in named}
    schedule = None
    if isinstance(unet, Keyframes) or window:
        points = unet.points if isinstance(unet, Keyframes) else ((0.0, unet),)
        schedule = Keyframes(points, window.get("start"), window.get("stop"))
        unet = schedule.at(0, 1)
    dyn = _dyn(positional[2], where) if len(positional) > 2 else None
    if "dyn" in named:
        dyn = _dyn(named["dyn"], where)

    adapter: str | None = name
    if table is not None:
        adapter = table.get(name)
        if adapter is None:
            message = f"{where}: unknown LoRA {name!r}; {_describe_known(name, table)}"
            if on_unknown == "raise":
                raise UnknownLoraError(message, name, span)
            if on_unknown == "warn":
                # stacklevel 4: parse_prompt(s) -> _parse -> _parse_tag -> here
                warnings.warn(message + "; tag ignored", UnknownLoraWarning, stacklevel=4)
    return LoraTag(
        name=name,
        adapter=adapter,
        te=te,
        unet=unet,
        dyn=dyn,
        span=span,
        kind=kind,
        schedule=schedule,
    )


def _weight(value: str, what: str, where: str) -> float:
    if _FLOAT.fullmatch(value) is None:
        raise ValueError(f"{where}: {what} {value!r} is not a finite decimal number")
    out = float(value)
    if not math.isfinite(out):  # the regex admits '1e999', which overflows to inf
        raise ValueError(f"{where}: {what} {value!r} is not a finite decimal number")
    return out


def _strength(value: str, what: str, where: str) -> float | Keyframes:
    """A strength, or keyframes ``W@P,W@P,...`` (a schedule) when the item has an ``@``."""
    if "@" not in value:
        return _weight(value, what, where)
    points = []
    for part in value.split(","):
        w, at, p = part.partition("@")
        if not at:
            raise ValueError(f"{where}: keyframe {part.strip()!r} in {what} is not W@P")
        points.append(
            (_position(p.strip(), "keyframe position", where), _weight(w.strip(), what, where))
        )
    return Keyframes(tuple(points))


def _position(value: str, what: str, where: str) -> float:
    if _FLOAT.fullmatch(value) is None or float(value) < 0 or not math.isfinite(float(value)):
        raise ValueError(f"{where}: {what} {value!r} must be a finite number >= 0")
    return float(value)


def _dyn(value: str, where: str) -> int:
    if _INT.fullmatch(value) is None or int(value) < 1:
        raise ValueError(f"{where}: dyn {value!r} must be an integer >= 1")
    return int(value)


def _describe_known(name: str, table: dict[str, str]) -> str:
    if not table:
        return "no LoRAs are known"
    names = sorted(table)
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f", … ({len(names) - _MAX_LISTED} more)"
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"known: {shown}{hint}"


def _remove_spans(prompt: str, spans: list[tuple[int, int]]) -> str:
    # Removal sites: runs of tags separated only by whitespace/commas, with those inner separators.
    sites: list[tuple[int, int, str]] = []
    for start, end in spans:
        between = prompt[sites[-1][1] : start] if sites else None
        if between is not None and between.strip(_SEP) == "":
            first, _, inner = sites.pop()
            sites.append((first, end, inner + between))
        else:
            sites.append((start, end, ""))

    out: list[str] = []
    tail = ""  # last character emitted so far
    cursor = 0  # start of the text not yet emitted
    for i, (start, end, inner) in enumerate(sites):
        left = prompt[cursor:start]
        right = prompt[end : sites[i + 1][0] if i + 1 < len(sites) else len(prompt)]
        left_core = left.rstrip(_SEP)
        right_core = right.lstrip(_SEP)
        right_sep = right[: len(right) - len(right_core)]
        gap = left[len(left_core) :] + inner + right_sep
        tail = left_core[-1:] or tail
        if not tail or not right_core or tail in _OPENERS or right_core[0] in _CLOSERS:
            joiner = ""  # prompt edge or bracket: no separator is needed there
        else:
            blank = gap.replace(",", "")
            space = "\n" if "\n" in blank else (" " if blank else "")
            joiner = "," + (space or " ") if "," in gap else space
        out.append(left_core + joiner)
        tail = joiner[-1:] or tail
        cursor = end + len(right_sep)
    out.append(prompt[cursor:])
    return "".join(out)
