"""The prompt builder, with a whitespace tokenizer so token counts can be worked by hand."""

from __future__ import annotations

import re

from training.prompt import FIELDS, MAX_CHARS_PER_TOKEN, build_prompt, normalized_prefix, product_facets


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


def test_a_huge_field_costs_no_more_tokenizing_than_a_full_budget_one():
    tokenized: list[int] = []

    def counting_words(text: str) -> list[tuple[int, int]]:
        tokenized.append(len(text))
        return words(text)

    huge_title = "Acme gray wool sofa " * 500_000  # 10 MB
    prompt = build_prompt("gray sofa", huge_title, "sofa", {"color": "gray"}, "A soft sofa.", counting_words, 40)
    assert prompt.text == "query: gray sofa\ntitle: " + " ".join(["Acme gray wool sofa"] * 8) + "\ntype: sofa\nattributes: color=gray"
    assert prompt.n_tokens == 40 and prompt.truncated == ("title", "description")
    clip = 40 * MAX_CHARS_PER_TOKEN
    assert max(tokenized) <= len(FIELDS) * (clip + 20) and sum(tokenized) <= 10 * len(FIELDS) * (clip + 20)


def test_a_huge_query_is_clipped_and_marked():
    prompt = build_prompt("sofa " * 2_000_000, "t", "sofa", {}, None, words, 3)
    assert prompt.text == "query: " + ("sofa " * 2_000_000)[: 3 * MAX_CHARS_PER_TOKEN]
    assert prompt.truncated[0] == "query"


def test_normalized_prefix_equals_split_and_join_then_cut():
    for text in ("  a\tb\n\x1fc  ", "one", "", " ", "αβ  γ\u2003δ"):
        for max_chars in range(0, 12):
            assert normalized_prefix(text, max_chars) == " ".join(text.split())[:max_chars]
