"""What `cog build` sends to Docker: the files of the project folder that `.dockerignore` does not
exclude, with their total size.

Docker's rules: each line is a pattern relative to the context root (``*``, ``?``, ``**`` for any
number of folders; a trailing ``/`` is ignored, a pattern naming a folder excludes what is below it;
``!`` re-includes); the last pattern that matches a path decides.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Rule:
    pattern: re.Pattern
    exclude: bool


def _compile(pattern: str) -> re.Pattern:
    pattern = pattern.strip().strip("/")
    parts = []
    for piece in pattern.split("/"):
        parts.append(
            "(?:.*/)?" if piece == "**" else fnmatch.translate(piece).removeprefix("(?s:").removesuffix(")\\Z") + "/"
        )
    regex = "".join(parts).removesuffix("/")
    # a match of a folder covers everything below it
    return re.compile(f"^{regex}(?:/.*)?$", re.S)


def read_rules(dockerignore: Path, bake: bool = False) -> list[Rule]:
    rules = []
    if not dockerignore.is_file():
        return rules
    for line in dockerignore.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        body = line.lstrip("!")
        if bake and body.strip("/") == "weights":
            continue
        rules.append(Rule(_compile(body), exclude))
    return rules


def excluded(path: str, rules: list[Rule]) -> bool:
    verdict = False
    for rule in rules:
        if rule.pattern.match(path):
            verdict = rule.exclude
    return verdict


def build_context(root: Path, bake: bool = False) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file the build context holds."""
    rules = read_rules(root / ".dockerignore", bake)
    files = []
    for folder, dirs, names in os.walk(root):
        rel_folder = Path(folder).relative_to(root).as_posix()
        rel_folder = "" if rel_folder == "." else rel_folder + "/"
        # a folder excluded with no "!" rule below it is not walked (as Docker skips it)
        dirs[:] = [d for d in dirs if not (excluded(rel_folder + d, rules) and not any(not r.exclude for r in rules))]
        for name in names:
            rel = rel_folder + name
            if not excluded(rel, rules):
                files.append((rel, (Path(folder) / name).stat().st_size))
    return sorted(files)
