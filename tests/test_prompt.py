"""Tests for lorakernels.prompt: A1111 `<lora:…>` grammar, mixtures, name resolution, errors."""

from __future__ import annotations

import random
import re
import warnings

import pytest

from lorakernels.prompt import (
    LoraTag,
    ParsedPrompt,
    UnknownLoraError,
    UnknownLoraWarning,
    parse_prompt,
    parse_prompts,
)

# ---------------------------------------------------------------------------------------------
# Grammar


@pytest.mark.parametrize(
    ("tag", "te", "unet", "dyn"),
    [
        ("<lora:style>", 1.0, 1.0, None),
        ("<lora:style:0.7>", 0.7, 0.7, None),
        ("<lora:style:0.7:0.3>", 0.7, 0.3, None),
        ("<lora:style:0.7:0.3:16>", 0.7, 0.3, 16),
        ("<lora:style:te=0.2>", 0.2, 0.2, None),  # UNet defaults to TE *after* the override
        ("<lora:style:0.9:te=0.2>", 0.2, 0.2, None),
        ("<lora:style:0.9:0.8:te=0.2>", 0.2, 0.8, None),
        ("<lora:style:unet=0.4>", 1.0, 0.4, None),
        ("<lora:style:0.5:0.6:8:unet=0.1:dyn=4>", 0.5, 0.1, 4),
        ("<lora:style:dyn=32:0.5>", 0.5, 0.5, 32),  # named items may come first
        ("<lora:style:unet=0.25:te=0.75>", 0.75, 0.25, None),
        ("<lora: style : 0.5 : te = 0.125 >", 0.125, 0.125, None),  # items are stripped
        ("<lyco:style:0.6>", 0.6, 0.6, None),
    ],
)
def test_tag_grammar(tag: str, te: float, unet: float, dyn: int | None) -> None:
    prompt = f"a photo, {tag}, of a cat"
    out = parse_prompt(prompt)
    assert out.text == "a photo, of a cat"
    (parsed,) = out.tags
    assert (parsed.name, parsed.adapter, parsed.te, parsed.unet, parsed.dyn) == (
        "style",
        "style",
        te,
        unet,
        dyn,
    )
    assert parsed.kind == tag[1:5]
    assert prompt[parsed.span[0] : parsed.span[1]] == tag
    assert out.unet == {"style": unet}
    assert out.text_encoder == {"style": te}


@pytest.mark.parametrize(
    ("weight", "value"),
    [
        ("-0.5", -0.5),
        ("1e-1", 0.1),
        ("1E+2", 100.0),
        ("-3e-2", -0.03),
        ("+.25", 0.25),
        ("2.", 2.0),
        ("007", 7.0),
    ],
)
def test_weight_notations(weight: str, value: float) -> None:
    out = parse_prompt(f"x <lora:a:{weight}> y")
    assert out.unet == {"a": value}
    assert out.text_encoder == {"a": value}


def test_negative_te_and_unet_independently() -> None:
    out = parse_prompt("<lora:a:-1:2.5>")
    assert out.text_encoder == {"a": -1.0}
    assert out.unet == {"a": 2.5}


def test_several_tags_keep_order_and_spans() -> None:
    prompt = "<lora:b:0.5> red <lyco:a:2> car <lora:c:1:0:8>"
    out = parse_prompt(prompt)
    assert [t.name for t in out.tags] == ["b", "a", "c"]
    assert [t.kind for t in out.tags] == ["lora", "lyco", "lora"]
    for t in out.tags:
        assert prompt[t.span[0] : t.span[1]].startswith(f"<{t.kind}:{t.name}")
    assert list(out.unet) == ["b", "a"]  # first-appearance order; c has UNet strength 0
    assert list(out.text_encoder) == ["b", "a", "c"]
    assert out.text == "red car"


def test_other_tag_types_and_case_are_left_untouched() -> None:
    prompt = "a <hypernet:h:0.5> b <LORA:x:1> c <loras:y> d <lora:z:0.5> e"
    out = parse_prompt(prompt)
    assert [t.name for t in out.tags] == ["z"]
    assert out.text == "a <hypernet:h:0.5> b <LORA:x:1> c <loras:y> d e"


def test_no_tags_returns_prompt_unchanged() -> None:
    prompt = "  a   strange,, prompt <with> angle: brackets  "
    out = parse_prompt(prompt)
    assert out == ParsedPrompt(text=prompt, tags=(), unet={}, text_encoder={})


# ---------------------------------------------------------------------------------------------
# Mixtures: stacking, zero strengths


def test_same_name_twice_stacks() -> None:
    out = parse_prompt("<lora:a:0.5> x <lora:a:0.25:1> <lyco:a:te=1:unet=-2>")
    assert out.text_encoder == {"a": 0.5 + 0.25 + 1.0}
    assert out.unet == {"a": 0.5 + 1.0 - 2.0}
    assert len(out.tags) == 3


def test_zero_strength_kept_in_tags_but_not_in_mixtures() -> None:
    out = parse_prompt("<lora:a:0> <lora:b:0:1> <lora:c:1:0> <lora:d:-0.0> <lora:e:0.5>")
    assert [t.name for t in out.tags] == ["a", "b", "c", "d", "e"]
    assert out.unet == {"b": 1.0, "e": 0.5}
    assert out.text_encoder == {"c": 1.0, "e": 0.5}


def test_strengths_that_cancel_are_left_out() -> None:
    out = parse_prompt("<lora:a:0.5> <lora:a:-0.5> <lora:b>")
    assert out.unet == {"b": 1.0}
    assert out.text_encoder == {"b": 1.0}


def test_random_prompts_against_ground_truth() -> None:
    # Build prompts from known strengths in every spelling the grammar allows, then compare the
    # parsed mixtures with sums accumulated while building.
    rng = random.Random(1234)
    words = ["cat", "dog", "(red:1.2)", "city", "night", "<hypernet:h:1>", "portrait"]
    names = ["alpha", "beta", "gamma_v2", "d e"]
    for _ in range(200):
        te_sum: dict[str, float] = {}
        unet_sum: dict[str, float] = {}
        pieces = []
        for _ in range(rng.randint(0, 8)):
            if rng.random() < 0.5:
                pieces.append(rng.choice(words))
                continue
            name = rng.choice(names)
            te = round(rng.uniform(-2, 2), 3)
            unet = round(rng.uniform(-2, 2), 3)
            kind = rng.choice(["lora", "lyco"])
            form = rng.randrange(4)
            if form == 0:
                tag, unet = f"<{kind}:{name}:{te!r}>", te
            elif form == 1:
                tag = f"<{kind}:{name}:{te!r}:{unet!r}>"
            elif form == 2:
                tag = f"<{kind}:{name}:{rng.random()}:{rng.random()}:te={te!r}:unet={unet!r}>"
            else:
                tag = f"<{kind}:{name}:unet={unet:e}:te={te:e}:dyn=4>"
            te_sum[name] = te_sum.get(name, 0.0) + te
            unet_sum[name] = unet_sum.get(name, 0.0) + unet
            pieces.append(tag)
        prompt = rng.choice([" ", ", ", ","]).join(pieces)
        out = parse_prompt(prompt, known=names)
        assert out.text_encoder == pytest.approx({k: v for k, v in te_sum.items() if v != 0})
        assert out.unet == pytest.approx({k: v for k, v in unet_sum.items() if v != 0})
        assert "<lora:" not in out.text and "<lyco:" not in out.text
        # Every non-tag word survives, in order.
        kept = [p for p in pieces if not p.startswith(("<lora:", "<lyco:"))]
        pos = 0
        for word in kept:
            pos = out.text.index(word, pos) + len(word)


# ---------------------------------------------------------------------------------------------
# Name resolution


def test_aliases_map_to_canonical_and_stack() -> None:
    known = {"myStyle_v3": "my_style", "my-style": "my_style", "other": "other"}
    out = parse_prompt("<lora:myStyle_v3:0.5> <lyco:my-style:0.25> <lora:other>", known=known)
    assert out.unet == {"my_style": 0.75, "other": 1.0}
    assert [(t.name, t.adapter) for t in out.tags] == [
        ("myStyle_v3", "my_style"),
        ("my-style", "my_style"),
        ("other", "other"),
    ]


@pytest.mark.parametrize("known", [{"a", "b"}, ["a", "b"], ("a", "b"), frozenset({"a", "b"})])
def test_plain_collection_maps_to_itself(known: object) -> None:
    out = parse_prompt("<lora:b:0.5>", known=known)  # type: ignore[arg-type]
    assert out.unet == {"b": 0.5}


def test_matching_is_exact() -> None:
    with pytest.raises(UnknownLoraError):
        parse_prompt("<lora:Style>", known=["style"])


def test_unknown_name_raises_listing_known_names() -> None:
    prompt = "a cat, <lora:styel:0.5>"
    with pytest.raises(UnknownLoraError) as info:
        parse_prompt(prompt, known={"style": "style", "style_alias": "style", "zeta": "z"})
    err = info.value
    message = str(err)
    assert isinstance(err, KeyError) and isinstance(err, ValueError)
    assert message.startswith("prompt: tag '<lora:styel:0.5>' at index 7: unknown LoRA 'styel'")
    assert "known: 'style', 'style_alias', 'zeta'" in message
    assert "did you mean 'style'" in message
    assert (err.name, err.span) == ("styel", (7, 23))


def test_unknown_name_with_nothing_known() -> None:
    with pytest.raises(UnknownLoraError, match="unknown LoRA 'a'; no LoRAs are known"):
        parse_prompt("<lora:a>", known={})


def test_unknown_name_error_truncates_long_lists() -> None:
    known = [f"lora_{i:03d}" for i in range(100)]
    with pytest.raises(UnknownLoraError) as info:
        parse_prompt("<lora:nope>", known=known)
    message = str(info.value)
    assert "'lora_000'" in message and "'lora_039'" in message and "'lora_040'" not in message
    assert "(60 more)" in message


def test_warn_mode_drops_unknown_and_continues() -> None:
    with pytest.warns(UnknownLoraWarning, match=r"unknown LoRA 'ghost'.*known: 'real'") as rec:
        out = parse_prompt(
            "x, <lora:ghost:0.5>, <lora:real:0.5>, y", known=["real"], on_unknown="warn"
        )
    assert len(rec) == 1
    assert rec[0].filename == __file__  # points at the caller
    assert out.text == "x, y"
    assert out.unet == {"real": 0.5}
    assert [(t.name, t.adapter, t.te) for t in out.tags] == [
        ("ghost", None, 0.5),
        ("real", "real", 0.5),
    ]


def test_ignore_mode_is_silent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = parse_prompt("<lora:ghost> a", known=["real"], on_unknown="ignore")
    assert out.text == "a"
    assert out.unet == {} and out.text_encoder == {}
    assert out.tags[0].adapter is None


def test_known_none_resolves_nothing() -> None:
    out = parse_prompt("<lora:anything at all:2>")
    assert out.unet == {"anything at all": 2.0}


# ---------------------------------------------------------------------------------------------
# Malformed tags: ValueError naming the tag text and its index


@pytest.mark.parametrize(
    ("tag", "reason"),
    [
        ("<lora:>", "empty adapter name"),
        ("<lora::1>", "empty adapter name"),
        ("<lyco:  :1>", "empty adapter name"),
        ("<lora:a:abc>", "weight 'abc' is not a finite decimal number"),
        ("<lora:a:>", "weight '' is not a finite decimal number"),
        ("<lora:a:nan>", "weight 'nan'"),
        ("<lora:a:inf>", "weight 'inf'"),
        ("<lora:a:1e999>", "weight '1e999'"),
        ("<lora:a:1_0>", "weight '1_0'"),
        ("<lora:a:0x1>", "weight '0x1'"),
        ("<lora:a:1:one>", "UNet weight 'one'"),
        ("<lora:a:te=x>", "te 'x'"),
        ("<lora:a:unet=>", "unet ''"),
        ("<lora:a:1:1:4.5>", "dyn '4.5' must be an integer >= 1"),
        ("<lora:a:1:1:0>", "dyn '0' must be an integer >= 1"),
        ("<lora:a:dyn=-2>", "dyn '-2' must be an integer >= 1"),
        ("<lora:a:1:1:8:9>", "too many items (5)"),
        ("<lora:a:1:strength=2>", "unknown named item 'strength'"),
        ("<lora:a:te=1:te=2>", "named item te= given twice"),
    ],
)
def test_malformed_tag(tag: str, reason: str) -> None:
    prompt = f"a cat, {tag} sitting"
    with pytest.raises(ValueError) as info:
        parse_prompt(prompt)
    assert not isinstance(info.value, UnknownLoraError)
    message = str(info.value)
    assert message.startswith(f"prompt: tag {tag!r} at index 7: ")
    assert reason in message


@pytest.mark.parametrize(
    ("prompt", "shown", "index", "before"),
    [
        ("a cat <lora:style:0.5", "<lora:style:0.5", 6, "the end of the prompt"),
        ("a <lora:style <lora:b:1>", "<lora:style ", 2, "'<'"),
        ("a <lyco:style:1\nb>", "<lyco:style:1", 2, "'\\n'"),
        ("<lora:", "<lora:", 0, "the end of the prompt"),
    ],
)
def test_unclosed_tag(prompt: str, shown: str, index: int, before: str) -> None:
    expected = f"prompt: unclosed tag {shown!r} at index {index} (no '>' before {before})"
    with pytest.raises(ValueError, match=re.escape(expected)):
        parse_prompt(prompt)


def test_unclosed_tag_of_other_type_is_ignored() -> None:
    assert parse_prompt("a <hypernet:h b <lora:x> c").text == "a <hypernet:h b c"


# ---------------------------------------------------------------------------------------------
# Text cleanup


@pytest.mark.parametrize(
    ("prompt", "text"),
    [
        ("a cat, <lora:x:1>, sitting", "a cat, sitting"),
        ("a cat <lora:x:1>, sitting", "a cat, sitting"),
        ("a cat,<lora:x:1> sitting", "a cat, sitting"),
        ("a cat <lora:x> sitting", "a cat sitting"),
        ("<lora:x>, a cat", "a cat"),
        ("a cat, <lora:x>", "a cat"),
        ("a cat,   <lora:x>  ,", "a cat"),
        ("<lora:x>", ""),
        ("  <lora:x> <lora:y>  ", ""),
        ("a, <lora:x>, <lyco:y:0.5>,b", "a, b"),
        ("a <lora:x> b <lora:y> c", "a b c"),
        ("cat<lora:x>dog", "catdog"),  # as A1111: nothing separated them
        ("a cat\n<lora:x>\nsitting", "a cat\nsitting"),
        ("a cat,\n<lora:x>\nsitting", "a cat,\nsitting"),
        ("(cat <lora:x>:1.2)", "(cat:1.2)"),
        ("(<lora:x> cat)", "(cat)"),
        ("[cat, <lora:x>]", "[cat]"),
        ("a <hypernet:h> <lora:x> b", "a <hypernet:h> b"),
    ],
)
def test_cleanup(prompt: str, text: str) -> None:
    assert parse_prompt(prompt).text == text


def test_cleanup_only_touches_removal_sites() -> None:
    prompt = "a  b,,c\t <lora:x> \td   e,, <hypernet:q>   f"
    assert parse_prompt(prompt).text == "a  b,,c d   e,, <hypernet:q>   f"


# ---------------------------------------------------------------------------------------------
# Batches and argument checks


def test_parse_prompts_per_prompt_mixtures() -> None:
    outs = parse_prompts(["<lora:a:0.5> x", "y", "z <lyco:b> <lora:a>"], known=["a", "b"])
    assert [o.unet for o in outs] == [{"a": 0.5}, {}, {"b": 1.0, "a": 1.0}]
    assert [o.text for o in outs] == ["x", "y", "z"]
    assert all(isinstance(t, LoraTag) for o in outs for t in o.tags)


def test_parse_prompts_errors_name_the_prompt() -> None:
    with pytest.raises(ValueError, match=r"^prompts\[1\]: tag '<lora:a:q>' at index 2"):
        parse_prompts(["ok", "x <lora:a:q>"])
    with pytest.raises(UnknownLoraError, match=r"^prompts\[2\]: tag '<lora:c>' at index 0"):
        parse_prompts(["<lora:a>", "", "<lora:c>"], known=["a"])
    with pytest.warns(UnknownLoraWarning, match=r"^prompts\[0\]"):
        parse_prompts(["<lora:c>"], known=["a"], on_unknown="warn")


@pytest.mark.parametrize(
    ("call", "exc", "pattern"),
    [
        (lambda: parse_prompt("x", on_unknown="skip"), ValueError, "^on_unknown: "),  # type: ignore[arg-type]
        (lambda: parse_prompt("x", known="abc"), TypeError, "^known: "),
        (lambda: parse_prompt("x", known=3), TypeError, "^known: "),  # type: ignore[arg-type]
        (lambda: parse_prompt("x", known={"a": 1}), TypeError, "^known: "),  # type: ignore[dict-item]
        (lambda: parse_prompt(b"x"), TypeError, "^prompt: expected str"),  # type: ignore[arg-type]
        (lambda: parse_prompts("abc"), TypeError, "^prompts: "),
        (lambda: parse_prompts(["x", None]), TypeError, r"^prompts\[1\]: "),  # type: ignore[list-item]
    ],
)
def test_argument_errors(call: object, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        call()  # type: ignore[operator]
