"""Tiny random models, tokenizers, processors and data files, written on the fly (no downloads).

Every builder saves a transformers folder that `trainers.models.load_model` reads like a real
checkpoint: a BERT sequence classifier (BertTokenizerFast from a vocab file), a CLIP dual
encoder (+ CLIPImageProcessor), a LLaVA vision-to-text model (+ LlavaProcessor) and a Llama
causal LM. Dimensions are 8-16 so that a training step takes milliseconds on one CPU thread.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
from collections.abc import Iterable, Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import torch
import yaml

# Word-level vocabulary shared by the CLIP, LLaVA and Llama tokenizers (ids = positions).
WORDS = ["[PAD]", "[UNK]", "[EOS]", "a", "photo", "of", "cat", "dog", "what", "is", "it", "yes"]
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Two topic vocabularies with no word in common: 4 classes x 3 words each.
TOPICS = {
    "t1": [
        ["apple", "pear", "plum"],
        ["car", "bus", "tram"],
        ["red", "blue", "green"],
        ["cat", "dog", "cow"],
    ],
    "t2": [
        ["oak", "elm", "ash"],
        ["rain", "snow", "hail"],
        ["one", "two", "six"],
        ["salt", "mint", "sage"],
    ],
}


def word_tokenizer(words: Sequence[str] = WORDS, whitespace_split: bool = False) -> Any:
    """A word-level fast tokenizer: one id per word, [PAD]/[UNK]/[EOS] special tokens.

    `whitespace_split` keeps tokens like `<image>` whole (the default pre-tokenizer splits
    punctuation off).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = (
        pre_tokenizers.WhitespaceSplit() if whitespace_split else pre_tokenizers.Whitespace()
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def save_word_tokenizer(folder: Path, words: Sequence[str] = WORDS) -> None:
    word_tokenizer(words).save_pretrained(folder)


def save_bert(
    folder: Path, words: Iterable[str] = (), num_labels: int = 4, hidden: int = 16, seed: int = 0
) -> Path:
    """A 1-layer BERT classifier + BertTokenizerFast over [specials] + `words` (dropout off, so
    a training step is a deterministic function of the batch)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = BERT_SPECIAL + [w for w in dict.fromkeys(words) if w not in BERT_SPECIAL]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # from_pretrained reads vocab.txt in transformers 4 and 5 (5 ignores a `vocab_file=` kwarg)
    BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def clip_config(words: Sequence[str] = WORDS, image_size: int = 16) -> Any:
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"vocab_size": len(words), "hidden_size": 8, "intermediate_size": 16,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 2},
        vision_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": 8},
        projection_dim=8,
    )  # fmt: skip


def save_clip(folder: Path, image_size: int = 16, seed: int = 0) -> Path:
    """A CLIP dual encoder with a word-level tokenizer and a CLIPImageProcessor."""
    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    CLIPModel(clip_config(WORDS, image_size)).save_pretrained(folder)
    save_word_tokenizer(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    return folder


def save_llama(folder: Path, seed: int = 0) -> Path:
    """A 1-layer Llama causal LM (hidden 8) with the word-level tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    save_word_tokenizer(folder)
    return folder


def save_llava(folder: Path, seed: int = 0) -> Path:
    """LLaVA: CLIP vision tower (16 px, 8 px patches) + 1-layer Llama, LlavaProcessor with an
    `<image>` token that expands to 2x2 patches + the class token = 5 tokens per image."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = word_tokenizer(WORDS, whitespace_split=True)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    images = CLIPImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="full",
        image_token="<image>",
        num_additional_image_tokens=1,  # CLIP's class token: 2x2 patches + 1 per image
    )
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 8,
                       "intermediate_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
        text_config={"model_type": "llama", "vocab_size": len(WORDS) + 1, "hidden_size": 8,
                     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "pad_token_id": 0},
        image_token_index=len(WORDS),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# --- data and task files ------------------------------------------------------------------


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dict(r)) + "\n" for r in rows))
    return path


def write_yaml(path: Path, doc: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(doc), sort_keys=False))
    return path


def topic_rows(classes: Sequence[Sequence[str]], n: int, seed: int) -> list[dict[str, Any]]:
    """`n` rows (classes in turn, then shuffled) of 4 words drawn from the class's words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % len(classes)
        rows.append({"text": " ".join(rng.choices(classes[label], k=4)), "label": label})
    rng.shuffle(rows)
    return rows


def write_topic_data(folder: Path, task: str, n_train: int = 32, n_eval: int = 16) -> Path:
    """data/<task>_train.jsonl and data/<task>_eval.jsonl under `folder` (text/label columns)."""
    classes = TOPICS[task]
    write_jsonl(folder / f"{task}_train.jsonl", topic_rows(classes, n_train, seed=1))
    write_jsonl(folder / f"{task}_eval.jsonl", topic_rows(classes, n_eval, seed=2))
    return folder


def topic_task(
    name: str,
    model: str | Mapping[str, Any],
    data: str,
    steps: int = 8,
    align: Mapping[str, Any] | None = None,
    **optim: Any,
) -> dict[str, Any]:
    """A task mapping in the issue's shape: `model` is a folder (sequence classification) or a
    model mapping; `data` is the prefix of <data>_train.jsonl / <data>_eval.jsonl."""
    spec = (
        {"path": model, "task": "sequence-classification", "num_labels": 4}
        if isinstance(model, str)
        else dict(model)
    )
    return {
        "name": name,
        "model": spec,
        "data": {
            "train": f"{data}_train.jsonl",
            "eval": f"{data}_eval.jsonl",
            "text": "text",
            "label": "label",
        },
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "optim": {"lr": 1.0e-2, "steps": steps, "batch_size": 16, "seed": 0, **optim},
        "align": dict(align or {"p": 50, "every": 4, "reinit": "global"}),
    }


def write_images(folder: Path, n: int, seed: int, size: int = 16) -> list[tuple[str, int]]:
    """`n` PNG files, half dark (label 0), half bright (label 1): (relative path, label)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        label = i % 2
        base = 40 + 160 * label
        pixels = (base + torch.randint(-30, 30, (size, size, 3), generator=gen)).clamp(0, 255)
        name = f"img{seed}_{i}.png"
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / name)
        out.append((f"{folder.name}/{name}", label))
    return out


# --- the CLI in this process ----------------------------------------------------------------


def adb_in_process(args: Sequence[str], cwd: Path) -> tuple[int, str, str]:
    """`adb ARGS` through the console script's entry point (adapterdb.cli.app:main) in this
    process: (exit code, stdout, stderr). Same parsing and error handling as the installed
    script, without the 5-10 s of interpreter + torch start-up a subprocess costs on a busy
    2-core box; an exception that escapes `main` (a traceback) fails the calling test."""
    from adapterdb.cli import app as cli_app

    out, err = io.StringIO(), io.StringIO()
    saved_cwd, saved_argv, saved_store = Path.cwd(), sys.argv, os.environ.pop("ADB_STORE", None)
    code: int = 0
    try:
        os.chdir(cwd)
        sys.argv = ["adb", *args]
        with redirect_stdout(out), redirect_stderr(err):
            try:
                cli_app.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        if saved_store is not None:
            os.environ["ADB_STORE"] = saved_store
    return code, out.getvalue(), err.getvalue()


def write_image_tasks(root: Path) -> None:
    """clip_{train,eval}.jsonl (image/label: dark 0, bright 1), vqa_*.jsonl (image/question/
    answer, questions of two lengths so batches get padded) and qa_*.jsonl (text only)."""
    for split, n, seed in (("train", 16, 1), ("eval", 6, 2)):
        images = write_images(root / "img", n, seed)
        write_jsonl(root / f"clip_{split}.jsonl", [{"image": p, "label": y} for p, y in images])
        questions = ["<image> what is it", "<image> it"]
        write_jsonl(
            root / f"vqa_{split}.jsonl",
            [{"image": p, "question": questions[i % 2], "answer": "yes"}
             for i, (p, _) in enumerate(images)],
        )  # fmt: skip
        write_jsonl(
            root / f"qa_{split}.jsonl",
            [{"question": ["what is it", "it"][i % 2], "answer": "a cat"} for i in range(n)],
        )
