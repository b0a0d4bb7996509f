"""The prompt builder, with a whitespace tokenizer so token counts can be worked by hand."""

from __future__ import annotations

import re

from training.prompt import build_prompt, product_facets


def words(text: str) -> list[tuple[int, int]]:
    return [match.span() for match in re.finditer(r"\S+", text)]


ARGS = ("gray sofa", "Acme gray wool sofa", "sofa", {"material": "wool", "color": "gray"}, "A soft sofa for a big room.")


def test_fits_budget_unchanged():
    prompt = build_prompt(*ARGS, words, 100)
    assert prompt.text == (
        "query: gray sofa\ntitle: Acme gray wool sofa\ntype: sofa\n"
        "attributes: color=gray; material=wool\ndescription: A soft sofa for a big room."
    )
    assert prompt.n_tokens == 21 and prompt.truncated == ()


def test_description_is_cut_first():
    prompt = build_prompt(*ARGS, words, 19)  # 21 words: drop the last 2 description words
    assert prompt.text.endswith("description: A soft sofa for a")
    assert prompt.n_tokens == 19 and prompt.truncated == ("description",)


def test_then_title_and_attributes_go_but_never_the_query():
    # query 3 + title 5 + type 2 + attributes 3 = 13 words once the description is gone: title loses 3
    prompt = build_prompt(*ARGS, words, 10)
    assert prompt.text == "query: gray sofa\ntitle: Acme\ntype: sofa\nattributes: color=gray; material=wool"
    assert prompt.n_tokens == 10 and prompt.truncated == ("description", "title")
    # 8 words without the title: the attributes lose one word, type and query stay whole
    prompt = build_prompt(*ARGS, words, 7)
    assert prompt.text == "query: gray sofa\ntype: sofa\nattributes: color=gray;" and prompt.n_tokens == 7
    assert prompt.truncated == ("description", "title", "attributes")
    tiny = build_prompt("a very long query about sofas", "t", "sofa", {}, None, words, 2)
    assert tiny.text == "query: a very long query about sofas" and tiny.n_tokens == 7


def test_product_facets_add_the_brand():
    assert product_facets({"attributes": [("color", "gray")], "brand": "Acme"}) == {"color": "gray", "brand": "Acme"}
    assert product_facets({"attributes": [("color", "gray")], "brand": None}) == {"color": "gray"}
    assert product_facets({"attributes": [("brand", "Own")], "brand": "Acme"}) == {"brand": "Own"}
