"""BLIP's tokenizer: BERT WordPiece plus [DEC] (answer BOS) and [ENC] (multimodal first token).

BLIP feeds [CLS] to the text-only (ITC) encoder, swaps in [ENC] for multimodal passes (ITM, VQA
question) and [DEC] for the answer decoder; texts are lowercased with punctuation stripped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoTokenizer, BertTokenizer, BlipConfig, PreTrainedTokenizerBase

from uniadapter_serve.errors import CheckpointError
from uniadapter_serve.model.backbone import text_config
from uniadapter_serve.model.loading import local_folder

CONFIG_DIR = Path(__file__).parent / "configs"
DEMO_VOCAB = CONFIG_DIR / "demo-vocab.txt"
DEMO_ANSWERS = CONFIG_DIR / "demo-answers.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")

_PUNCT = re.compile(r"[^\w\s]")

CAPTION_WORDS, QUESTION_WORDS = 30, 50
"""Words kept of a caption / query and of a question (BLIP's pre_caption / pre_question limits)."""


def register_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Mark [DEC] and [ENC] special (one id each, never split) where the vocabulary already holds them, as the
    original BLIP code registers them: [DEC] the BOS token, [ENC] an additional special token."""
    size = len(tokenizer)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != size:
        raise CheckpointError("the vocabulary lacks [DEC] or [ENC]: registering them would add ids the model lacks")


def clean_text(text: str, max_words: int) -> str:
    """BLIP's pre_caption/pre_question: lowercase, punctuation to spaces, at most `max_words`."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


class BlipTokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 35) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        ids: dict[str, int] = {}
        for tok in ("[PAD]", "[SEP]", "[CLS]", "[DEC]", "[ENC]"):
            found = tokenizer.convert_tokens_to_ids(tok)
            ids[tok] = found if isinstance(found, int) else -1
        missing = [tok for tok, i in ids.items() if i < 0 or i == tokenizer.unk_token_id]
        if missing:
            raise CheckpointError(f"tokenizer lacks BLIP's special tokens {missing}")
        self.pad_id, self.sep_id, self.cls_id = ids["[PAD]"], ids["[SEP]"], ids["[CLS]"]
        self.dec_id, self.enc_id = ids["[DEC]"], ids["[ENC]"]

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @classmethod
    def from_folder(cls, folder: str | Path) -> BlipTokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the tokenizer in {folder}: {e}") from e
        return cls(tok)

    @classmethod
    def demo(cls, vocab_size: int | None = None) -> BlipTokenizer:
        """The demo world's small vocabulary, cut to `vocab_size` (letters come first, so any
        word still tokenizes)."""
        tokens = DEMO_VOCAB.read_text().split()
        if vocab_size is not None:
            tokens = tokens[:vocab_size]
        tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
        register_special_tokens(tokenizer)
        return cls(tokenizer)

    def save(self, folder: str | Path) -> None:
        """Write the tokenizer files into a backbone folder, [DEC] and [ENC] registered as special tokens
        (so transformers' `BlipProcessor.from_pretrained(folder)` never splits them)."""
        register_special_tokens(self.tokenizer)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the last call's padding/truncation (each call sets its own): not saved
            backend.no_padding()
            backend.no_truncation()
        self.tokenizer.save_pretrained(str(folder))

    def count(self, text: str) -> int:
        """Number of word pieces in `text` (without special tokens)."""
        return len(self.tokenizer.tokenize(text))

    def encode(self, texts: list[str], *, mode: Literal["text", "multimodal"] = "text",
               max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids, mask (B, L). First token [CLS] for text-only, [ENC] for multimodal passes."""
        out = self.tokenizer(texts, padding="longest", truncation=True, max_length=max_length or self.max_length,
                             return_tensors="pt")
        ids, mask = out["input_ids"], out["attention_mask"]
        if mode == "multimodal":
            ids[:, 0] = self.enc_id
        return ids, mask

    def encode_answers(self, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids, mask (B, L): [DEC] answer [SEP]."""
        ids, mask = self.encode(answers, max_length=self.max_length)
        ids[:, 0] = self.dec_id
        return ids, mask

    def decode(self, ids: torch.Tensor) -> str:
        """Answer ids (starting with [DEC]) -> text, stopping at [SEP]."""
        tokens = ids.tolist()[1:]
        if self.sep_id in tokens:
            tokens = tokens[: tokens.index(self.sep_id)]
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True)).strip()


def load_tokenizer(source: str | Path, config: BlipConfig) -> BlipTokenizer:
    """The tokenizer saved beside a backbone, or the demo vocabulary for bundled/random backbones."""
    folder = local_folder(source)
    if folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES):
        tok = BlipTokenizer.from_folder(folder)
    else:
        tok = BlipTokenizer.demo(text_config(config).vocab_size)
    if tok.vocab_size > text_config(config).vocab_size:
        raise CheckpointError(
            f"tokenizer has {tok.vocab_size} tokens but the backbone's vocabulary is {text_config(config).vocab_size}"
        )
    return tok


def default_answer_list(backbone: str | Path) -> list[str]:
    """The list a server on `backbone` ranks by default (without ANSWER_LIST): the answer_list.json beside the
    backbone, else the built-in one."""
    folder = local_folder(backbone)
    beside = folder / "answer_list.json" if folder is not None else None
    return load_answer_list(beside if beside is not None and beside.is_file() else None)


def load_answer_list(path: str | Path | None = None) -> list[str]:
    """A VQA candidate answer list (JSON list of strings); the demo list by default."""
    data = json.loads(Path(path or DEMO_ANSWERS).read_text())
    if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
        raise CheckpointError(f"{path}: an answer list must be a JSON list of strings")
    return data
