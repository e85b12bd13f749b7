"""Text sources and packed token contexts (docs/method.md §7).

A text source is any iterator of strings (one document each). `token_contexts` packs documents into
fixed-length contexts with the end-of-text token prepended as BOS, so no padding ever exists.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
import itertools
from itertools import islice
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def hf_text_source(
    path: str = "openwebtext",
    split: str = "train",
    field: str = "text",
    streaming: bool = True,
    **kwargs,
) -> Iterator[str]:
    """Yield the `field` column of a `datasets` dataset, streamed by default (no full download).

    Extra keyword arguments go to `datasets.load_dataset` (e.g. `name=`, `data_files=`).
    """
    import datasets

    try:
        ds = datasets.load_dataset(path, split=split, streaming=streaming, **kwargs)
    except Exception as exc:  # network / unknown dataset: re-raise with the fix
        raise RuntimeError(
            f"could not load dataset {path!r} (split {split!r}): {exc}. If there is no network, "
            "pass a local data directory / file (e.g. hf_text_source('json', data_files=...)) or "
            "use embedded_text_source()."
        ) from exc
    columns = getattr(ds, "column_names", None)
    if columns is not None and field not in columns:
        raise KeyError(
            f"dataset {path!r} has no column {field!r}; available columns: {list(columns)}. "
            "Pass field=<one of them>."
        )
    for i, row in enumerate(ds):
        if field not in row:
            raise KeyError(
                f"row {i} of dataset {path!r} has no field {field!r}; available: {list(row)}. "
                "Pass field=<one of them>."
            )
        yield row[field]


TEXT_SUFFIXES = (".txt", ".md")


def text_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files a text-file source reads: files as given, folders expanded to their sorted
    `*.txt`/`*.md` files. Raises naming the path when one is missing or a folder has no text."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file())
            text = [q for q in found if q.suffix in TEXT_SUFFIXES]
            if not text:
                what = ("it is empty" if not found else f"it holds {len(found)} file(s), none "
                        f"ending in .txt or .md: {', '.join(q.name for q in found[:5])}"
                        f"{' ...' if len(found) > 5 else ''}")
                raise FileNotFoundError(
                    f"data folder {str(p)!r} has no text files ({what}); put the text in .txt or "
                    ".md files there, or pass a file."
                )
            files.extend(text)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"text file {str(p)!r} does not exist; pass existing files.")
    return files


def read_text_file(f: Path) -> str:
    """The UTF-8 text of `f`; a binary or non-UTF-8 file raises naming the file and byte offset."""
    data = f.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValueError(
            f"data file {str(f)!r} looks binary (a NUL byte at byte offset {nul}); pass text files "
            "(UTF-8) only."
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"data file {str(f)!r} is not UTF-8: byte {data[exc.start]:#04x} at byte offset "
            f"{exc.start} cannot be decoded; convert it (e.g. `iconv -f latin1 -t utf-8`) or "
            "remove it from the data."
        ) from None


def text_file_source(paths: str | Path | Sequence[str | Path]) -> Iterator[str]:
    """Yield documents from text files: ONE DOCUMENT PER FILE (the whole file's text).

    Files are read in the order given (a directory is expanded to its sorted `*.txt`/`*.md` files).
    One document per file keeps paragraphs of the same text in one context, as in web corpora.
    """
    for f in text_files(paths):
        yield read_text_file(f)


def embedded_text_source(split: str = "train") -> Iterator[str]:
    """Yield the plays of the embedded Shakespeare corpus (one document per play)."""
    from .embedded import embedded_corpus

    yield from embedded_corpus(split)


def token_contexts(
    texts: Iterable[str],
    tokenizer,
    ctx_len: int,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """Pack documents into contexts of `ctx_len` tokens: [eos as BOS] + (ctx_len - 1) text tokens.

    Each document is tokenized and followed by the eos token; the stream is cut into chunks of
    ctx_len - 1 tokens and every chunk gets the eos id prepended as BOS (docs/method.md §7;
    position 0 is dropped later). Short documents are packed together, not skipped, and nothing
    is padded; the final incomplete chunk is dropped. Context i goes to rank i % world_size, so DDP
    ranks never see the same context. Yields LongTensor [ctx_len].
    """
    if ctx_len < 2:
        raise ValueError(f"ctx_len={ctx_len} is too small: a context needs BOS + at least 1 token.")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "the tokenizer has no eos_token_id; set tokenizer.eos_token (e.g. '<|endoftext|>')."
        )
    body = ctx_len - 1
    buf: list[int] = []
    n_ctx = 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(
                f"text source item {i} is a {type(text).__name__}, not a str; the text source "
                "must yield strings (check the dataset field)."
            )
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buf.append(eos)
        start = 0
        while len(buf) - start >= body:
            if n_ctx % world_size == rank:
                yield torch.tensor([eos] + buf[start : start + body], dtype=torch.long)
            n_ctx += 1
            start += body
        del buf[:start]


def batched_contexts(contexts: Iterable[torch.Tensor], n: int) -> Iterator[torch.Tensor]:
    """Stack up to `n` contexts into LongTensor [n, ctx_len] batches (the last may be smaller)."""
    it = iter(contexts)
    while chunk := list(islice(it, n)):
        yield torch.stack(chunk)


def looks_like_path(spec: str) -> bool:
    """Whether `spec` names a local path rather than a `datasets` name ("openwebtext",
    "owner/name"): it starts with / . ~, has a file suffix, more than one "/", or its first part
    is an existing local folder."""
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec:
        return True
    if Path(spec).suffix in (*TEXT_SUFFIXES, ".json", ".jsonl", ".csv", ".parquet", ".gz"):
        return True
    return "/" in spec and Path(spec.split("/")[0]).is_dir()


def check_text_source(spec: str) -> None:
    """Fail before any work if `spec` cannot give text: a missing path, a folder without text
    files, a binary or non-UTF-8 file. "embedded" and `datasets` names pass unchecked."""
    if spec == "embedded":
        return
    p = Path(spec).expanduser()
    if p.exists():
        for f in text_files(p):
            read_text_file(f)
    elif looks_like_path(spec):
        raise FileNotFoundError(
            f"data path {spec!r} does not exist; pass an existing text file or folder, "
            "'embedded', or a `datasets` name such as 'openwebtext'."
        )


def text_source(spec: str, split: str = "train") -> Iterator[str]:
    """A text source from a short spec: "embedded" (the Shakespeare corpus), an existing file or
    folder (`text_file_source`), or else a `datasets` name streamed from the Hub (`hf_text_source`).
    A missing local path raises FileNotFoundError (see `looks_like_path`)."""
    if spec == "embedded":
        return embedded_text_source(split)
    if Path(spec).expanduser().exists():
        return text_file_source(Path(spec).expanduser())
    check_text_source(spec)
    return hf_text_source(spec, split=split)


class _Counted:
    """Counts the documents and non-whitespace characters of a text iterator."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.docs, self.chars = texts, 0, 0

    def __iter__(self) -> Iterator[str]:
        for t in self.texts:
            self.docs += 1
            if isinstance(t, str):
                self.chars += len("".join(t.split()))
            yield t


def contexts_from(
    spec: str, tokenizer, ctx_len: int, *, split: str = "train", repeat: bool = False,
    skip_docs: int = 0, rank: int = 0, world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """Packed contexts of `text_source(spec, split)` for one rank, after skipping `skip_docs`
    documents; with `repeat`, epoch after epoch (deterministic, so a resumed buffer can skip).

    A pass over the source that yields no complete context raises ValueError naming the source
    and what it held (with `repeat` it would otherwise loop forever)."""
    epochs = itertools.count() if repeat else range(1)
    for _ in epochs:
        texts = _Counted(islice(text_source(spec, split), skip_docs, None))
        n = 0
        for ctx in token_contexts(texts, tokenizer, ctx_len, rank=rank, world_size=world_size):
            n += 1
            yield ctx
        if n == 0:
            raise ValueError(
                f"text source {spec!r} ({split} split) gave no complete context of "
                f"ctx_len={ctx_len} tokens in a whole pass: it holds {texts.docs} document(s) "
                f"with {texts.chars} non-whitespace characters"
                + (f" after skipping {skip_docs} documents" if skip_docs else "")
                + ". Pass more text (or a lower ctx_len)."
            )
