"""Undo WikiText-103's tokenization, so the model reads text the way its training data was written.

WikiText's raw files are word-tokenized: every punctuation mark stands between spaces, number separators are
escaped (`1 @,@ 000`, `3 @.@ 5`, `well @-@ known`) and headings are spaced out (`= = Title = =`). A model
trained on ordinary text would pay a perplexity penalty for that spacing, so the zero-shot protocol (paper
Table 3, Megatron-LM's `wikitext_detokenizer`) first puts the text back into normal form. The rules below are
this project's own formulation of the ones the protocol lists; each is a small step with its own test.
"""

from __future__ import annotations

import re

# `1 @,@ 000` -> `1,000`, `3 @.@ 5` -> `3.5`, `well @-@ known` -> `well-known`.
_NUMBER_SEPARATOR = re.compile(r" @([-,.])@ ")
# A space before closing punctuation goes: `word .` -> `word.`, `a , b` -> `a, b`.
_SPACE_BEFORE_PUNCT = re.compile(r" ([.,:;?!])(?=\s|$)")
# No space just inside brackets: `( a b )` -> `(a b)`.
_OPENING_SPACE = re.compile(r"([(\[{]) ")
_CLOSING_SPACE = re.compile(r" ([)\]}])")
# No space just inside a pair of double quotes on one line: `" a b "` -> `"a b"`.
_QUOTED = re.compile(r'"[ ]*([^"\n]*?)[ ]*"')
# Heading markers lose their inner spaces: `= = = Title = = =` -> `=== Title ===`.
_HEADING_GAP = re.compile(r"(?<==) (?==)")


def join_number_separators(text: str) -> str:
    return _NUMBER_SEPARATOR.sub(r"\1", text)


def fix_possessives(text: str) -> str:
    """`John 's` -> `John's`, and the plural form `players '` -> `players'`."""
    return text.replace(" 's", "'s").replace("s ' ", "s' ")


def tighten_punctuation(text: str) -> str:
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def tighten_brackets_and_quotes(text: str) -> str:
    text = _CLOSING_SPACE.sub(r"\1", _OPENING_SPACE.sub(r"\1", text))
    return _QUOTED.sub(r'"\1"', text)


def join_heading_markers(text: str) -> str:
    return _HEADING_GAP.sub("", text)


def trim_line_edges(text: str) -> str:
    """The space WikiText puts before each newline and at the start of each line goes."""
    return re.sub(r" *\n *", "\n", text)


def wikitext_detokenize(text: str) -> str:
    """All rules, in an order where none undoes another (separators before punctuation: `3 @.@ 5`)."""
    for rule in (join_number_separators, fix_possessives, tighten_punctuation, tighten_brackets_and_quotes,
                 join_heading_markers, trim_line_edges):
        text = rule(text)
    return text


def original_token_count(raw_text: str) -> int:
    """WikiText's own word count, the adjusted perplexity's denominator: the raw text split on single spaces
    (the protocol's `len(text.strip().split(" "))`; 245,566 for the WikiText-103 test set)."""
    return len(raw_text.strip().split(" "))
