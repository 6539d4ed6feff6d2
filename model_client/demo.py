"""The first-run demo: a word memory on a 2-shard store, searched with misspelled words.

Entries are words from the docstrings of Python's standard library (on every
machine, no download); each key is a hashed character-trigram embedding of
the word (dim 64), and each token is the word's index. Searching for
misspelled words finds the words they were meant to be.
"""

from __future__ import annotations

import collections
import pydoc
import re
import time

import numpy as np

from model_client.client import MemoryClient

DIM = 64
NAMESPACE = "demo-words"
_MODULES = ("collections", "json", "os", "pathlib", "re", "string", "textwrap", "threading", "typing",
            "argparse", "logging", "itertools", "functools", "subprocess", "shutil", "socket", "email", "http")
QUERIES = ("threding", "dictionry", "sequnce", "subproces", "argumnt", "iterater", "charactr", "excption")


def stdlib_words(min_len: int = 4) -> list[str]:
    """Distinct lower-case words from standard-library docstrings, most frequent first."""
    counts: collections.Counter = collections.Counter()
    for name in _MODULES:
        try:
            text = pydoc.render_doc(name, renderer=pydoc.plaintext)
        except Exception:  # noqa: BLE001 - a module missing from this Python is skipped
            continue
        counts.update(w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= min_len)
    return [w for w, _ in counts.most_common()]


def embed(words: list[str]) -> np.ndarray:
    """float32 [N, DIM]: unit-norm bag of hashed character trigrams (with word boundaries)."""
    out = np.zeros((len(words), DIM), np.float32)
    for row, word in enumerate(words):
        padded = f"^{word}$"
        for i in range(len(padded) - 2):
            h = 0
            for ch in padded[i : i + 3]:
                h = (h * 131 + ord(ch)) % 1_000_003
            out[row, h % DIM] += 1.0
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def run_demo(address: str, shards: int) -> None:
    words = stdlib_words()
    print(f"monim demo: {len(words)} words from the standard library's docstrings -> a {shards}-shard store at {address}")
    with MemoryClient(address) as client:
        if NAMESPACE in {c.name for c in client.list_namespaces()}:
            client.drop_namespace(NAMESPACE)
        client.create_namespace(NAMESPACE, dim=DIM, metric="l2", index="flat")
        started = time.perf_counter()
        ids = client.add(NAMESPACE, embed(words), np.arange(len(words)), source="stdlib-docstrings")
        add_s = time.perf_counter() - started
        description = client.describe_namespace(NAMESPACE)
        per_shard = ", ".join(f"shard {s['shard']}: {s['rows']}" for s in description.shards)
        print(f"added {len(ids)} entries in {add_s * 1000:.0f} ms ({per_shard})")

        started = time.perf_counter()
        result = client.search(NAMESPACE, embed(list(QUERIES)), k=3)
        search_ms = (time.perf_counter() - started) * 1000
        print(f"\nsearched {len(QUERIES)} misspelled words, k=3, in {search_ms:.1f} ms:")
        print(f"  {'query':<12} {'nearest entries (word, squared L2 distance)'}")
        for query, tokens, distances in zip(QUERIES, result.tokens, result.distances):
            found = ", ".join(f"{words[t]} ({d:.2f})" for t, d in zip(tokens, distances))
            print(f"  {query:<12} {found}")
        rows = client.get(NAMESPACE, result.ids[0, :1])
        print(f"\nentry {int(rows.ids[0])}: token {int(rows.tokens[0])} ({words[rows.tokens[0]]!r}), "
              f"weight {rows.weights[0]:.1f}, source {rows.sources[0]!r}")
        client.drop_namespace(NAMESPACE)
