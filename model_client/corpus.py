"""Day-by-day text for the continual-learning demo.

Default: docstrings and comments of the Python standard library, which is on every
machine with Python, grouped into days by package (day 0 is general-purpose code,
then one domain a day). ``--corpus DIR`` takes the user's own text instead: one
sub-folder per day, in sorted order, each holding text files.
Each day's text is split into a training part and a held-out tail.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import pathlib
import sysconfig
import tokenize

from monim.protos.errors import InvalidArgument

# Day 0 first, then one package family a day.
STDLIB_DAYS = (
    ("day0-general", ("logging", "unittest", "json", "argparse.py", "collections", "functools.py", "pathlib",
                      "inspect.py", "typing.py", "dataclasses.py", "enum.py", "datetime.py", "re")),
    ("day1-email", ("email",)),
    ("day2-http", ("http", "urllib")),
    ("day3-xml", ("xml",)),
    ("day4-asyncio", ("asyncio",)),
    ("day5-importlib", ("importlib",)),
)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")


@dataclasses.dataclass
class Day:
    name: str
    train: str
    held_out: str


def docstrings_and_comments(source: str) -> str:
    """The docstrings and comments of one Python file, in order of appearance."""
    parts = []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(doc)
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT and len(token.string) > 3:
                parts.append(token.string.lstrip("# "))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return "\n".join(parts)


def _stdlib_text(names) -> str:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in names:
        path = root / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
        for file in files:
            if "test" in file.parts or "tests" in file.parts:
                continue
            texts.append(docstrings_and_comments(file.read_text(encoding="utf-8", errors="replace")))
    return "\n".join(t for t in texts if t)


def split_day(name: str, text: str, train_chars: int, held_out_chars: int) -> Day:
    """The held-out part is the text's tail; training takes what precedes it (at most train_chars)."""
    text = text.strip()
    held_out_chars = min(held_out_chars, len(text) // 5)
    held_out = text[len(text) - held_out_chars:]
    train = text[: len(text) - held_out_chars][-train_chars:]
    return Day(name, train, held_out)


def stdlib_days(days: int, train_chars: int, held_out_chars: int, day0_train_chars: int | None = None) -> list[Day]:
    """Day 0 (with up to day0_train_chars of training text) plus ``days`` new days from the standard library."""
    if not 1 <= days < len(STDLIB_DAYS):
        raise InvalidArgument(f"--days must be in [1, {len(STDLIB_DAYS) - 1}] for the built-in corpus, got {days}")
    return [split_day(name, _stdlib_text(names), day0_train_chars or train_chars if i == 0 else train_chars,
                      held_out_chars) for i, (name, names) in enumerate(STDLIB_DAYS[: days + 1])]


def folder_days(corpus: str, days: int | None, train_chars: int, held_out_chars: int,
                day0_train_chars: int | None = None) -> list[Day]:
    """Days from --corpus DIR (one sub-folder per day). InvalidArgument says what to fix."""
    root = pathlib.Path(corpus)
    if not root.is_dir():
        raise InvalidArgument(f"--corpus {corpus}: no such folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if len(folders) < 2:
        raise InvalidArgument(f"--corpus {corpus}: needs at least two day folders (day 0 and one new day), "
                              f"found {len(folders)}")
    if days is not None:
        folders = folders[: days + 1]
    out = []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files).strip()
        if len(text) < 2000:
            raise InvalidArgument(f"--corpus {corpus}: day folder {folder.name!r} has {len(text)} characters of text "
                                  f"(in {', '.join(TEXT_SUFFIXES)} files); each day needs at least 2000")
        limit = day0_train_chars or train_chars if not out else train_chars
        out.append(split_day(folder.name, text, limit, held_out_chars))
    return out
