"""Datasets of the local lm-evaluation-harness tasks, built from the corpora shipped with gam.

lm-eval loads this file through the ``custom_dataset: !function gam_tasks.<name>`` lines of the
task YAMLs next to it, so the tasks need no download (they run with HF_HUB_OFFLINE=1 and
HF_DATASETS_OFFLINE=1). Every builder is deterministic: the same items on every run.
"""

from __future__ import annotations

import random
import re

import datasets

from gam.corpus import load_corpus

_HEADING = re.compile(r"^ = [^=].* = $")  # a WikiText article title (" = Title = ")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# lm-eval needs each choice to fit the model's context: short sentences fit a 64-token one.
_MAX_CHOICE_CHARS = 100


def wikitext2_test(**_: object) -> datasets.DatasetDict:
    """The WikiText-2 test split (shipped copy), one document per article, as lm-eval's own
    ``wikitext`` task splits the hub's document-level copy: ``page`` is the article's rows, each
    ending in a newline."""
    rows = load_corpus("wikitext2", source="shipped", split_rows=None).test
    pages: list[list[str]] = []
    for row in rows:
        if _HEADING.match(row):
            pages.append([])
        if pages and row:
            pages[-1].append(row + "\n")
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": ["".join(p) for p in pages]})})


def rolling_results(doc: dict, results: list[float]) -> dict:
    """Word and byte perplexity of one document, as lm-eval's own wikitext task counts them:
    the words (whitespace-separated pieces) and UTF-8 bytes of the text the model scored."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    n_bytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}


def _story_sentences() -> list[list[str]]:
    stories = load_corpus("tinystories", source="shipped", split_rows=None).valid
    return [s for s in (_SENTENCE_END.split(" ".join(story.split())) for story in stories) if len(s) >= 4]


def tinystories_next_sentence(**_: object) -> datasets.DatasetDict:
    """Which sentence comes next in this story? The story's true 3rd, 4th or 5th sentence against
    the sentences at the same place in three other stories (TinyStories validation, shipped copy)."""
    rng = random.Random(0)
    stories = _story_sentences()
    items = {"context": [], "choices": [], "label": []}
    for i, sentences in enumerate(stories):
        if len(items["label"]) == 200:
            break
        k = rng.randrange(2, 4)  # every story has at least 4 sentences
        if len(sentences[k]) > _MAX_CHOICE_CHARS:
            continue
        others = [s for j, s in enumerate(stories)
                  if j != i and len(s[k]) <= _MAX_CHOICE_CHARS and s[k] != sentences[k]]
        choices = [sentences[k]] + [o[k] for o in rng.sample(others, 3)]
        rng.shuffle(choices)
        items["context"].append(" ".join(sentences[:k]))
        items["choices"].append(choices)
        items["label"].append(choices.index(sentences[k]))
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(items)})


def tinystories_continue(**_: object) -> datasets.DatasetDict:
    """Continue the story: the first two sentences, then the model writes the third (greedy,
    up to the first full stop); scored by exact match with the story's own third sentence."""
    stories = _story_sentences()[:100]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({
        "context": [" ".join(s[:2]) for s in stories],
        "target": [s[2].rstrip(".!?") for s in stories],
    })})
