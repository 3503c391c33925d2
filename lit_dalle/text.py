"""The caption tokenizer: byte-level BPE trained with Hugging Face ``tokenizers`` (PAPER.md B.1).

Captions are lowercased and BPE-encoded (the paper: vocabulary 16,384, at most 256 tokens), with BPE
dropout (Provilkov et al.; the paper: 10%) applied only while training; validation and generation encode
deterministically. The tokenizer is one JSON file: it is saved beside a Prior's checkpoints, stored
inside them, and loads on its own. A pretrained Hugging Face tokenizer in a local folder (its
``tokenizer.json``) is accepted too. Byte-level pre-tokenization means no caption is ever out of
vocabulary.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    """A BPE caption tokenizer with training-only dropout.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (BPE model for dropout to apply).
        dropout: BPE merge dropout used by ``encode(..., train=True)`` (the paper: 0.1).
    """

    def __init__(self, tokenizer: Tokenizer, dropout: float = 0.1) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"BPE dropout={dropout} must be in [0, 1) (the paper uses 0.1)")
        self.tokenizer = tokenizer
        self.dropout = dropout
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self._set_dropout(None)

    # -- building ------------------------------------------------------------------------------------

    @classmethod
    def train(
        cls, captions: Iterable[str], vocab_size: int, *, min_frequency: int = 2, dropout: float = 0.1
    ) -> TextTokenizer:
        """Train a byte-level BPE on captions (lowercased by the tokenizer's normaliser).

        Args:
            captions: training captions.
            vocab_size: the target vocabulary size, including the 256 byte symbols.
            min_frequency: merges seen fewer times are not learned.
            dropout: BPE dropout applied by ``encode(train=True)``.
        """
        if vocab_size <= 256:
            raise ValueError(f"vocab_size={vocab_size} must exceed the 256 byte symbols of byte-level BPE")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(captions, trainer=trainer)
        return cls(tokenizer, dropout=dropout)

    @classmethod
    def from_str(cls, text: str, dropout: float = 0.1) -> TextTokenizer:
        """Load from the JSON text of ``to_str`` (as stored in a checkpoint)."""
        return cls(Tokenizer.from_str(text), dropout=dropout)

    @classmethod
    def load(cls, path: str | Path, dropout: float = 0.1) -> TextTokenizer:
        """Load a tokenizer JSON file, or a folder holding ``tokenizer.json`` (ours or a Hugging Face one).

        Raises:
            FileNotFoundError: naming the path, when neither exists.
        """
        path = Path(path).expanduser()
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"tokenizer {str(path)!r} not found: give a tokenizer.json file or a folder holding one "
                "(train one with `python -m lit_dalle train-tokenizer`)"
            )
        return cls(Tokenizer.from_file(str(file)), dropout=dropout)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer JSON to ``path`` (a file, or a folder that gets ``tokenizer.json``)."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() or not path.suffix else path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(self.to_str())
        return file

    def to_str(self) -> str:
        """The tokenizer as JSON text, with dropout off (dropout is a setting of this class)."""
        return self.tokenizer.to_str()

    # -- encoding ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids (ids are 0 .. vocab_size - 1)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _set_dropout(self, value: float | None) -> None:
        if isinstance(self.tokenizer.model, models.BPE):
            self.tokenizer.model.dropout = value

    def encode(
        self, captions: Sequence[str], text_len: int, *, train: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode captions into fixed-length rows.

        Args:
            captions: B captions.
            text_len: L, the number of text slots; longer encodings are truncated (the paper: 256).
            train: apply BPE dropout (training only).

        Returns:
            ids: LongTensor [B, L], 0 where there is no token.
            valid: BoolTensor [B, L], True at real tokens (a prefix of each row).
        """
        self._set_dropout(self.dropout if train and self.dropout > 0 else None)
        try:
            encodings = self.tokenizer.encode_batch(list(captions))
        finally:
            self._set_dropout(None)
        ids = torch.zeros(len(captions), text_len, dtype=torch.long)
        valid = torch.zeros(len(captions), text_len, dtype=torch.bool)
        for row, encoding in enumerate(encodings):
            tokens = encoding.ids[:text_len]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            valid[row, : len(tokens)] = True
        return ids, valid

    def decode(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> list[str]:
        """Decode rows of ids (only the ``valid`` ones, when given) back into text."""
        rows = ids.tolist()
        masks = valid.tolist() if valid is not None else [[True] * len(r) for r in rows]
        return [self.tokenizer.decode([t for t, keep in zip(r, m) if keep]).strip() for r, m in zip(rows, masks)]


def read_captions(shards: Sequence[str], limit: int | None = None) -> Iterator[str]:
    """Captions (``KEY.txt`` members, UTF-8, lowercased) from tar shards, without decoding images."""
    import webdataset as wds

    from lit_dalle.data.decode import normalize_caption

    def quiet(exn: Exception) -> bool:
        log.warning("reading captions: %s", exn)
        return True

    count = 0
    stream = wds.tarfile_to_samples(handler=quiet)(iter([{"url": u} for u in shards]))
    for sample in stream:
        try:
            caption = normalize_caption(sample["txt"].decode("utf-8")) if "txt" in sample else ""
        except UnicodeDecodeError:
            continue
        if caption:
            yield caption
            count += 1
            if limit is not None and count >= limit:
                return


def train_tokenizer(
    out: str,
    shards: str | list[str] | None = None,
    vocab_size: int = 16384,
    min_frequency: int = 2,
    max_captions: int | None = None,
) -> dict[str, int | str]:
    """Train the caption BPE tokenizer on the captions of tar shards and save it as JSON.

    Args:
        out: where to write (a .json file, or a folder that receives tokenizer.json).
        shards: shard paths, brace patterns, globs or folders; None uses the embedded dataset's train split.
        vocab_size: the vocabulary size (the paper: 16384; the embedded captions need ~512).
        min_frequency: merges seen fewer times are not learned.
        max_captions: read at most this many captions (None: all).

    Returns:
        The output file and the vocabulary size reached.
    """
    from lit_dalle.data.embedded import EmbeddedShapes, ensure_embedded
    from lit_dalle.data.shards import expand_shards

    spec = shards if shards is not None else str(ensure_embedded(EmbeddedShapes(resolution=64))["train"])
    tokenizer = TextTokenizer.train(
        read_captions(expand_shards(spec), max_captions), vocab_size, min_frequency=min_frequency
    )
    file = tokenizer.save(out)
    print(json.dumps({"out": str(file), "vocab_size": tokenizer.vocab_size}))
    return {"out": str(file), "vocab_size": tokenizer.vocab_size}


def tokenizer_for_fit(
    trainer: Any, shards: Sequence[str], train: Callable[[Sequence[str]], TextTokenizer], dropout: float
) -> TextTokenizer:
    """Train a caption tokenizer on ``shards`` when ``fit`` starts: on rank 0, broadcast, saved beside the run.

    What a module that trains its own tokenizer calls in ``on_fit_start`` (the Prior, the contrastive
    model): the tokenizer is trained once (rank 0), sent to every rank, and written as ``tokenizer.json``
    into the log folder and every checkpoint folder (modules store it in their checkpoints as well).

    Args:
        trainer: the running ``lightning.Trainer``.
        shards: the training shards whose captions are read.
        train: trains a tokenizer on the captions of the shards (the module's ``train_tokenizer``).
        dropout: the module's BPE dropout.
    """
    if not shards:
        raise ValueError("no tokenizer: set model.tokenizer, or fit with a data module that has train shards")
    text = train(shards).to_str() if trainer.is_global_zero else None
    tokenizer = TextTokenizer.from_str(trainer.strategy.broadcast(text), dropout)
    # On every rank: ``trainer.log_dir`` broadcasts, so reading it on rank 0 alone would hang the others.
    folders = {trainer.log_dir} | {getattr(c, "dirpath", None) for c in trainer.checkpoint_callbacks}
    if trainer.is_global_zero:
        for folder in filter(None, folders):
            tokenizer.save(Path(folder) / TOKENIZER_FILE)
    return tokenizer
