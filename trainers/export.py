"""`adb export`: a revision as a PEFT folder, or folded into its base model as a full
transformers model folder for deployment tools that do not speak PEFT.

The merged folder is what `PeftModel.from_pretrained(base, adapter).merge_and_unload()` then
`save_pretrained` gives, plus the base folder's tokenizer / processor files; it is written
into a stage folder beside the output and renamed in as a unit (adapterdb/atomic_folder.py),
and every check (base folder, adapter fit, output) runs before anything is written.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterdb.adapter import CONFIG_FILE, WEIGHTS_FILE, to_torch, write_peft_raw
from adapterdb.atomic_folder import write_staged
from adapterdb.errors import AdbError, MismatchError, NotFoundError
from adapterdb.storage.store import Store

# Files of a model folder that tokenise or preprocess inputs: copied beside the merged weights.
PREPROCESSOR_FILES = (
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece*.model",
    "*.tiktoken",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template*",
)


@dataclass
class Exported:
    commit_id: str
    output: Path
    files: list[str]  # names written into `output`
    merged_into: Path | None

    def to_json(self) -> dict[str, Any]:
        return {
            "commit": self.commit_id,
            "output": str(self.output),
            "files": self.files,
            "merged_into": str(self.merged_into) if self.merged_into else None,
        }


def export(
    store: Store, rev: str, out: Path, merged_into: Path | None = None, force: bool = False
) -> Exported:
    """Write `rev` to `out`: its PEFT folder, or with `merged_into` (a transformers model
    folder) the full model with the adapter folded into the weights."""
    check_output(out, force)
    if merged_into is not None and (
        out.resolve() == merged_into.resolve() or merged_into.resolve() in out.resolve().parents
    ):
        raise AdbError(
            f"-o {out} is the base model folder {merged_into} (or inside it): exporting would "
            "overwrite the base; pass another -o"
        )
    oid = store.resolve(rev)
    manifest = store.read_manifest(store.read_commit(oid).manifest)
    raw = store.load_tensors(manifest)
    if merged_into is None:
        write_peft_raw(out, manifest.config, raw, manifest.metadata)
        return Exported(oid, out.absolute(), sorted([CONFIG_FILE, WEIGHTS_FILE]), None)
    model = merged_model(merged_into, manifest.config, {n: to_torch(r) for n, r in raw.items()})
    written: list[str] = []

    def fill(stage: Path) -> None:
        model.save_pretrained(stage)
        for path in preprocessor_files(merged_into):
            if not (stage / path.name).exists():
                shutil.copyfile(path, stage / path.name)
        written.extend(sorted(p.name for p in stage.iterdir()))
        _fsync_files(stage)

    write_staged(out, fill)
    return Exported(oid, out.absolute(), written, merged_into.absolute())


def check_output(out: Path, force: bool) -> None:
    """Refuse a file, or a folder that holds anything, as the output unless forced."""
    if out.exists() and not out.is_dir():
        raise AdbError(f"{out} is a file, not a folder; pass -o a folder to export to")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AdbError(f"{out} is not empty; pass --force to write over it or pick another -o")


def merged_model(base_dir: Path, config: Mapping[str, Any], tensors: Mapping[str, Any]) -> Any:
    """The base model of `base_dir` with the LoRA adapter (`config`, `tensors` keyed as PEFT
    saves them) folded into its weights (`merge_and_unload`)."""
    from peft import PeftConfig, get_peft_model

    from adapterdb.trainers.runtime import load_adapter

    base = load_base(base_dir)
    try:
        peft_config = PeftConfig.from_peft_type(**{"peft_type": "LORA", **dict(config)})
        peft = get_peft_model(base, peft_config)
    except (TypeError, ValueError, KeyError) as exc:  # e.g. target modules not in the model
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise MismatchError(
            f"the adapter does not fit the model in {base_dir}: {reason}; export onto the "
            "base model the adapter was trained on"
        ) from None
    load_adapter(peft, tensors, where=f"model in {base_dir}")
    return peft.merge_and_unload()


def load_base(base_dir: Path) -> Any:
    """The model a transformers folder holds, as the class its config.json names (so a
    classifier keeps its head and a causal LM its LM head), in its saved dtype."""
    import transformers

    from adapterdb.trainers.models import from_pretrained_checked

    if not base_dir.is_dir():
        raise NotFoundError(f"--merged-into {base_dir} is not a folder; pass a model folder")
    if not (base_dir / "config.json").is_file():
        raise AdbError(
            f"--merged-into {base_dir} has no config.json, so it is not a transformers model "
            "folder; pass one (save_pretrained writes config.json beside the weights)"
        )
    config = from_pretrained_checked(transformers.AutoConfig, base_dir)
    names = getattr(config, "architectures", None) or []
    loader = getattr(transformers, names[0], None) if names else None
    return from_pretrained_checked(loader or transformers.AutoModel, base_dir)


def preprocessor_files(base_dir: Path) -> list[Path]:
    """The tokenizer / processor files of a model folder (`PREPROCESSOR_FILES`)."""
    return sorted(
        p
        for p in base_dir.iterdir()
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in PREPROCESSOR_FILES)
    )


def _fsync_files(folder: Path) -> None:
    """`save_pretrained` and `copyfile` leave data in the page cache; the rename into place
    must not make a folder visible whose files a crash could still empty."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
