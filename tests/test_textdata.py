"""WordNet supersenses (`builtin: wordnet-supersenses`): parsing, fixed splits, class selection,
balanced seeded limits, the one-line errors, and the bundled split-wordnet sequence.

A tiny WordNet in the real data-file format is written per test, so nothing here needs the
Debian package; the last tests read the real one when it is installed (CI installs it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterdb.errors import AdbError
from adapterdb.trainers import textdata
from adapterdb.trainers.config import DataSpec, load_sequence, parse_task
from adapterdb.trainers.data import load_task_data
from adapterdb.trainers.textdata import LEXNAMES, WORDNET_DEBIAN, load_supersenses

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
CLASSES = {"noun": ["noun.animal", "noun.plant", "noun.food"], "verb": ["verb.motion"]}
PER_CLASS = 40


def _line(offset: int, lexname: str, pos: str, words: list[str], gloss: str) -> str:
    """A data-file line as wndb(5WN) spells it, pointers and all (the reader skips them)."""
    ss_type = pos[0]
    lemmas = " ".join(f"{w} 0" for w in words)
    return (
        f"{offset:08d} {LEXNAMES.index(lexname):02d} {ss_type} {len(words):02x} {lemmas} "
        f"001 @ 00001740 {ss_type} 0000 | {gloss}  \n"
    )


def write_wordnet(folder: Path) -> Path:
    """data.noun / data.verb with PER_CLASS synsets per class; offsets grow like byte offsets."""
    folder.mkdir(parents=True, exist_ok=True)
    for pos, names in CLASSES.items():
        lines, offset = [LICENCE], 1740
        for name in names:
            kind = name.split(".")[1]
            for i in range(PER_CLASS):
                words = [f"{kind}_{i}", f"{kind}{i}(a)"] if i % 7 == 0 else [f"{kind}_{i}"]
                gloss = f"a {kind} thing number {i}" + ('; "an example"' if i % 5 == 0 else "")
                lines.append(_line(offset, name, pos, words, gloss))
                offset += len(lines[-1])
        (folder / f"data.{pos}").write_text("".join(lines))
    return folder


@pytest.fixture()
def wordnet(tmp_path: Path) -> Path:
    textdata.read_data_file.cache_clear()
    return write_wordnet(tmp_path / "dict")


def test_text_is_words_then_definition(wordnet: Path) -> None:
    synsets = textdata.read_data_file(wordnet, "noun")
    assert len(synsets) == 3 * PER_CLASS
    first = synsets[0]
    assert first.lexname == "noun.animal" and first.pos == "noun"
    # underscores become spaces, adjective markers like (a) go, the definition follows a
    # colon, and the gloss's quoted usage examples are cut off
    assert first.text == "animal 0, animal0: a animal thing number 0"
    assert synsets[1].text == "animal 1: a animal thing number 1"


def test_splits_are_fixed_disjoint_and_about_one_in_five(wordnet: Path) -> None:
    classes = ["noun.animal", "noun.plant", "noun.food", "verb.motion"]
    train, _ = load_supersenses(wordnet, "train", classes)
    evl, _ = load_supersenses(wordnet, "eval", classes)
    assert not set(train) & set(evl)
    assert len(train) + len(evl) == 4 * PER_CLASS
    assert 0.1 < len(evl) / (4 * PER_CLASS) < 0.3
    # the same on every call and whatever else is selected or however it is seeded
    assert load_supersenses(wordnet, "eval", classes, seed=7) == load_supersenses(
        wordnet, "eval", classes
    )
    animals, _ = load_supersenses(wordnet, "eval", ["noun.animal", "verb.motion"], seed=3)
    assert [t for t in evl if t.startswith("animal")] == [t for t in animals if "animal" in t]


def test_classes_select_and_relabel_in_the_given_order(wordnet: Path) -> None:
    texts, labels = load_supersenses(wordnet, "train", ["verb.motion", "noun.plant"])
    assert set(labels) == {0, 1}
    for text, label in zip(texts, labels, strict=True):
        assert text.startswith(("motion", "plant")[label])
    with pytest.raises(AdbError, match=r"'noun\.dog' is not a WordNet supersense"):
        load_supersenses(wordnet, "train", ["noun.dog", "noun.plant"])


def test_limit_is_balanced_seeded_and_bounded(wordnet: Path) -> None:
    classes = ["noun.animal", "noun.plant", "noun.food"]
    texts, labels = load_supersenses(wordnet, "train", classes, limit=10, seed=1)
    assert len(texts) == 10 and sorted(labels.count(k) for k in range(3)) == [3, 3, 4]
    assert (texts, labels) == load_supersenses(wordnet, "train", classes, limit=10, seed=1)
    assert texts != load_supersenses(wordnet, "train", classes, limit=10, seed=2)[0]
    full, _ = load_supersenses(wordnet, "train", classes)
    assert set(texts) <= set(full)
    assert len(load_supersenses(wordnet, "train", classes, limit=10_000)[0]) == len(full)


def test_task_data_through_the_data_spec(wordnet: Path) -> None:
    spec = DataSpec(
        builtin="wordnet-supersenses",
        classes=["noun.plant", "noun.animal"],
        folder=wordnet,
        limit=12,
        eval_limit=4,
    )
    data = load_task_data(spec, seed=0)
    assert data.label_names == ("noun.plant", "noun.animal") and data.num_classes == 2
    assert len(data.train) == 12 and len(data.eval) == 4
    item = data.eval[0]
    assert set(item) == {"text", "label"} and isinstance(item["text"], str)
    assert data.train.labels.dtype == torch.long


def test_missing_wordnet_is_one_line_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADB_WORDNET", str(tmp_path / "nowhere"))
    spec = DataSpec(builtin="wordnet-supersenses", classes=["noun.animal", "noun.plant"])
    with pytest.raises(AdbError) as info:
        load_task_data(spec)
    message = str(info.value)
    assert "\n" not in message
    assert "apt-get install wordnet-base" in message and "ADB_WORDNET" in message
    assert str(tmp_path / "nowhere") in message


def test_a_file_that_is_not_wordnet_is_one_line(tmp_path: Path) -> None:
    textdata.read_data_file.cache_clear()
    (tmp_path / "data.noun").write_text(LICENCE + "this is not wordnet\n")
    with pytest.raises(AdbError, match=r"data\.noun:2: not a WordNet data line") as info:
        load_supersenses(tmp_path, "train", ["noun.animal", "noun.plant"])
    assert "\n" not in str(info.value)


def _task(data: dict[str, object]) -> dict[str, object]:
    return {"name": "t", "model": {"packaged": "minilm"}, "data": data, "optim": {"steps": 1}}


def test_schema_checks_classes_per_builtin() -> None:
    ok = parse_task(
        _task({"builtin": "wordnet-supersenses", "classes": ["noun.act", "noun.event"]}),
        Path("/tmp"),
        "task.yaml",
    )
    assert ok.data.classes == ["noun.act", "noun.event"]
    bad = [
        ({"builtin": "wordnet-supersenses", "classes": ["noun.act", "noun.dog"]}, "classes[1]"),
        ({"builtin": "wordnet-supersenses", "classes": ["noun.act", 3]}, "classes[1] = 3"),
        ({"builtin": "fashion-mnist", "classes": [0, "noun.act"]}, "classes[1] = 'noun.act'"),
        ({"builtin": "wordnet-supersenses", "classes": ["noun.act"]}, "at least 2"),
    ]
    for data, part in bad:
        with pytest.raises(AdbError) as info:
            parse_task(_task(data), Path("/tmp"), "task.yaml")
        message = str(info.value)
        assert "\n" not in message and part in message, message
    files = {"classes": ["noun.act", "noun.event"], "text": "x", "train": "a.jsonl"}
    with pytest.raises(AdbError) as info:
        parse_task(_task(files), Path("/tmp"), "task.yaml")
    assert "only apply to builtin: fashion-mnist | wordnet-supersenses" in str(info.value)


BUNDLED = Path(__file__).parents[1] / "trainers" / "sequences" / "split-wordnet.yaml"


def test_bundled_sequence_is_five_disjoint_wordnet_tasks() -> None:
    seq = load_sequence(BUNDLED)
    assert len(seq.tasks) == 5
    seen: list[str] = []
    for task in seq.tasks:
        assert task.model.packaged == "minilm"
        assert task.data.builtin == "wordnet-supersenses"
        assert task.data.classes is not None and 2 <= len(task.data.classes) <= 4
        seen += [str(c) for c in task.data.classes]
    assert len(seen) == len(set(seen)), "a class appears in two tasks"


real = pytest.mark.skipif(
    not (WORDNET_DEBIAN / "data.noun").is_file(), reason="Debian's wordnet-base not installed"
)


@real
def test_real_wordnet_parses_every_synset() -> None:
    nouns = textdata.read_data_file(WORDNET_DEBIAN, "noun")
    verbs = textdata.read_data_file(WORDNET_DEBIAN, "verb")
    assert (len(nouns), len(verbs)) == (82115, 13767)  # WordNet 3.0
    dog = next(s for s in nouns if s.text.startswith("dog, domestic dog, Canis familiaris:"))
    assert dog.lexname == "noun.animal" and "member of the genus Canis" in dog.text


@real
def test_real_bundled_tasks_have_enough_examples() -> None:
    for task in load_sequence(BUNDLED).tasks:
        data = load_task_data(task.data, task.optim.seed)
        assert len(data.train) == task.data.limit
        assert len(data.eval) == task.data.eval_limit
        counts = torch.bincount(data.eval.labels, minlength=data.num_classes)
        assert int(counts.max() - counts.min()) <= 1, (task.name, counts)
        train = {data.train[i]["text"] for i in range(len(data.train))}
        assert not train & {data.eval[i]["text"] for i in range(len(data.eval))}
