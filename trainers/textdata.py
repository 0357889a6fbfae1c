"""WordNet supersenses: real text for classification, offline (`builtin: wordnet-supersenses`).

Every WordNet synset is one example. Its text is its words and its definition, as a
dictionary prints them ("dog, domestic dog, Canis familiaris: a member of the genus Canis
..."), without the usage examples that some glosses add after the definition (`; "the dog
barked all night"`: one noun synset in ten has them; they lengthen every batch), and its
label is the synset's lexicographer file, its *supersense*: `noun.animal`, `noun.food`,
`verb.motion`, ... (the 45 names of `man 5 lexnames`, in LEXNAMES). Classes are chosen by
name: `classes: [noun.plant, noun.animal]` makes noun.plant class 0.

WordNet 3.0 ships in Debian's `wordnet-base` (`/usr/share/wordnet`, WordNet licence: use,
copy, modify and distribute, with the copyright notice); any WordNet 3.x `dict` folder with
`data.noun`, `data.verb`, `data.adj`, `data.adv` works through `data.folder` / $ADB_WORDNET.

Splits are fixed, not drawn: a synset is in eval when the CRC-32 of its part of speech and
offset is 0 mod 5 (about 20%), so train and eval never share a synset, whatever the classes,
seed or limits, on every machine. `limit` / `eval_limit` then take a seeded subset that is
balanced over the chosen classes (a class with fewer examples gives all it has).

Pure Python on purpose: the schema (config.py) imports LEXNAMES without loading torch.
"""

from __future__ import annotations

import os
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from adapterdb.errors import AdbError

WORDNET_DEBIAN = Path("/usr/share/wordnet")
# The lexicographer files in id order (WordNet 3.0, lexnames(5WN)).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)  # fmt: skip
EVAL_EVERY = 5  # one synset in EVAL_EVERY (by hash) is held out for eval
_DATA_FILE = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers on adjectives: big(a)


@dataclass(frozen=True)
class Synset:
    pos: str  # data file: noun, verb, adj, adv
    offset: int
    lexname: str
    text: str

    @property
    def split(self) -> str:
        key = f"{self.pos}:{self.offset:08d}".encode()
        return "eval" if zlib.crc32(key) % EVAL_EVERY == 0 else "train"


def wordnet_folder(folder: Path | None = None) -> Path:
    """`data.folder`, else $ADB_WORDNET, else where Debian's wordnet-base installs WordNet."""
    if folder is not None:
        return folder
    return Path(os.environ.get("ADB_WORDNET", WORDNET_DEBIAN))


def load_supersenses(
    folder: Path, split: str, classes: Sequence[str], limit: int | None = None, seed: int = 0
) -> tuple[list[str], list[int]]:
    """(texts, labels) of `split` ('train' / 'eval') for synsets in `classes`, labels 0..k-1 in
    the order `classes` lists them; at most `limit`, balanced over the classes, seeded."""
    unknown = [c for c in classes if c not in LEXNAMES]
    if unknown:
        raise AdbError(f"{unknown[0]!r} is not a WordNet supersense; use one of {_some_names()}")
    index = {name: i for i, name in enumerate(classes)}
    per_class: list[list[Synset]] = [[] for _ in classes]
    for pos in sorted({c.split(".")[0] for c in classes}):
        for synset in read_data_file(folder, pos):
            if synset.lexname in index and synset.split == split:
                per_class[index[synset.lexname]].append(synset)
    chosen = []
    for i, group in enumerate(per_class):
        chosen += _quota(group, limit, i, classes, seed)
    chosen.sort(key=lambda s: (s.pos, s.offset))  # file order, whatever the sampling order
    return [s.text for s in chosen], [index[s.lexname] for s in chosen]


def _quota(
    group: list[Synset], limit: int | None, i: int, classes: Sequence[str], seed: int
) -> list[Synset]:
    """Class i's share of `limit` (limit // k, the first limit % k classes one more)."""
    if limit is None:
        return group
    share = limit // len(classes) + (1 if i < limit % len(classes) else 0)
    if share >= len(group):
        return group
    return random.Random(f"{seed}:{classes[i]}").sample(group, share)


@lru_cache(maxsize=8)
def read_data_file(folder: Path, pos: str) -> tuple[Synset, ...]:
    """Every synset of one WordNet data file (`data.noun`, ...), in file order.

    Format (wndb(5WN)): `offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] ...
    | gloss`; w_cnt is two hex digits; lines starting with two spaces are the licence."""
    path = folder / _DATA_FILE[pos]
    if not path.is_file():
        raise AdbError(
            f"WordNet file {path.name} not found in {folder}; `apt-get install wordnet-base` "
            f"installs it in {WORDNET_DEBIAN}, or set data.folder / ADB_WORDNET to a WordNet "
            "3.x dict folder"
        )
    synsets = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if line.startswith("  ") or not line.strip():
                continue
            head, bar, gloss = line.partition(" | ")
            fields = head.split()
            try:
                lexfile, count = int(fields[1]), int(fields[3], 16)
                words = [_word(w) for w in fields[4 : 4 + 2 * count : 2]]
                synset = Synset(pos, int(fields[0]), LEXNAMES[lexfile], _text(words, gloss))
            except (IndexError, ValueError):
                synset = None
            if synset is None or not bar or len(words) != count:
                raise AdbError(f"{path}:{number}: not a WordNet data line; use WordNet 3.x files")
            synsets.append(synset)
    return tuple(synsets)


def _word(word: str) -> str:
    return _ADJ_MARKER.sub("", word).replace("_", " ")


def _text(words: list[str], gloss: str) -> str:
    """'word, word: definition', the gloss's quoted usage examples cut off."""
    definition = gloss.split('; "', 1)[0].strip()
    return f"{', '.join(words)}: {definition or gloss.strip()}"


def _some_names() -> str:
    return ", ".join(LEXNAMES[3:8]) + ", ... (`man 5 lexnames`)"
