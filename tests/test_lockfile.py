"""requirements-dev.lock, which `make test` and `make demo` install from, covers pyproject.toml.

Every dependency that pyproject.toml names (the dev extras included) must be pinned exactly in
the lock, at a version its range admits, and every pin must carry a hash, or
`pip install --require-hashes` refuses the file. Files are parsed here; nothing is fetched.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as the lock is

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements-dev.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def parse_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, [hashes])}, from a pip requirements file with hashes."""
    # join the backslash-continued lines, then drop comments and options (--find-links ...)
    joined = re.sub(r"\\\n", " ", text)
    pins: dict[str, tuple[str, list[str]]] = {}
    for raw in joined.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        spec, *opts = line.split()
        m = PIN.match(spec)
        assert m, f"lock line is not an exact `name==version` pin: {line[:80]!r}"
        hashes = [o.removeprefix("--hash=") for o in opts if o.startswith("--hash=")]
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{name} is pinned twice in the lock"
        pins[name] = (m.group(2), hashes)
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return [Requirement(r) for r in reqs]


@pytest.fixture(scope="module")
def pins() -> dict[str, tuple[str, list[str]]]:
    assert LOCK.is_file(), f"{LOCK.name} is missing: run `make lock`"
    return parse_lock(LOCK.read_text())


def test_every_declared_dependency_is_pinned_in_range(pins) -> None:
    missing = [str(r) for r in declared() if canonicalize_name(r.name) not in pins]
    assert not missing, (
        f"pyproject.toml names {missing} but {LOCK.name} does not pin them: run `make lock`"
    )
    outside = [
        f"{r} (lock: {pins[canonicalize_name(r.name)][0]})"
        for r in declared()
        if not r.specifier.contains(pins[canonicalize_name(r.name)][0], prereleases=True)
    ]
    assert not outside, f"{LOCK.name} pins versions outside pyproject.toml's ranges: {outside}"


def test_every_pin_has_a_sha256_hash(pins) -> None:
    unhashed = [name for name, (_, hashes) in pins.items() if not hashes]
    assert not unhashed, f"{LOCK.name} pins {unhashed} without a hash: run `make lock`"
    bad = [
        h
        for _, hashes in pins.values()
        for h in hashes
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", h)
    ]
    assert not bad, f"hashes that are not sha256: {bad[:3]}"


def test_torch_is_the_local_cpu_build(pins) -> None:
    # any other torch pulls GBs of CUDA packages (README, Makefile's TORCH)
    assert Version(pins["torch"][0]).base_version == "2.13.0"


def test_parser_catches_unhashed_and_loose_pins() -> None:
    text = (
        "--find-links /opt/wheels\n\nfoo==1.0 \\\n    --hash=sha256:"
        + "a" * 64
        + "\n    # via bar\nbaz==2\n"
    )
    assert parse_lock(text) == {"foo": ("1.0", ["sha256:" + "a" * 64]), "baz": ("2", [])}
    with pytest.raises(AssertionError, match="exact"):
        parse_lock("foo>=1.0\n")
