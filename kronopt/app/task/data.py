"""Byte-level text corpora with a deterministic train/validation split.

The default corpus is the source of Python's standard library, found through
:func:`sysconfig.get_paths`: every ``*.py`` file directly in the ``stdlib``
directory (about 170 files, 4–5 MB on CPython 3.11), read as bytes. It is present
on any ordinary Python install, so nothing is downloaded. A file goes to the
validation split when ``crc32(file name) % 10 == 0`` — the split depends only on
the names, never on a random state, and is the same on every run and machine
with the same Python version.

A user file (``--data PATH``) is split by position instead: the last 10 % of its
bytes are the validation split.

Each corpus carries the SHA-256 of the bytes it was read from (:attr:`Corpus.sha256`),
the digest ``kronopt ablate`` keys its cached runs by, so a key always names the
bytes its run trained on.
"""

import hashlib
import sysconfig
import zlib
from pathlib import Path

import attrs
import torch
from torch import Tensor

from kronopt.config import ConfigError

#: one file in ``VALIDATION_MODULUS`` goes to the validation split (by name)
VALIDATION_MODULUS = 10


@attrs.frozen(eq=False)
class Corpus:
    """Train and validation bytes as ``uint8`` tensors, where they came from, and ``sha256``: the digest of
    the bytes read (:func:`stdlib_digest` for the standard library, the file's SHA-256 otherwise)."""

    train: Tensor
    val: Tensor
    source: str
    train_files: tuple[str, ...] = ()
    val_files: tuple[str, ...] = ()
    sha256: str = ""

    def batch(self, split: str, batch: int, context: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``batch`` random windows of ``context`` bytes (inputs) and the same shifted by one (targets), int64.

        Each of the split's ``numel - context`` windows of ``context + 1`` bytes is equally likely (the last one
        included, so every byte but the first is a target).
        """
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, data.numel() - context, (batch,), generator=generator)
        idx = starts[:, None] + torch.arange(context + 1)
        windows = data[idx].long()
        return windows[:, :-1], windows[:, 1:]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """The standard library's top-level ``*.py`` files, sorted, split into (train, validation) by name."""
    files = sorted(stdlib_dir().glob("*.py"))
    train = [f for f in files if zlib.crc32(f.name.encode()) % VALIDATION_MODULUS != 0]
    val = [f for f in files if zlib.crc32(f.name.encode()) % VALIDATION_MODULUS == 0]
    return train, val


def stdlib_digest(train: list[bytes], val: list[bytes]) -> str:
    """The SHA-256 (hex) naming a standard-library corpus, from the SHA-256 digests of its files per split
    (:func:`stdlib_files`' order): a header, then per split its name and number of files and each file's
    digest, so an edited file or a file moved to the other split gives another digest."""
    h = hashlib.sha256(b"kronopt stdlib corpus\n")
    for split, digests in (("train", train), ("val", val)):
        h.update(f"{split} {len(digests)}\n".encode())
        for digest in digests:
            h.update(digest)
    return h.hexdigest()


def unreadable_data(exc: OSError, path: Path | None) -> ConfigError:
    """The :class:`ConfigError` at ``task.data`` for a data file (or a standard library file) that could not
    be read: the file the error names, else ``path``."""
    where = str(exc.filename if exc.filename is not None else path)
    if isinstance(exc, FileNotFoundError):
        return ConfigError([("task.data", f"no such file: {where!r}")])
    return ConfigError([("task.data", f"cannot read {where!r}: {exc.strerror or exc}")])


def _read(files: list[Path]) -> tuple[Tensor, list[bytes]]:
    """The files' bytes joined by newlines, and each file's SHA-256 digest of the bytes read; a file that
    cannot be read is a :class:`ConfigError` naming it."""
    try:
        contents = [f.read_bytes() for f in files]
    except OSError as exc:
        raise unreadable_data(exc, None) from exc
    blob = b"\n".join(contents)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8), [hashlib.sha256(c).digest() for c in contents]


def load_corpus(path: str | Path | None, *, context: int) -> Corpus:
    """The stdlib corpus (``path=None``) or a text file, split; raises :class:`ConfigError` if unusable.

    Each split must hold more than ``context + 1`` bytes.
    """
    if path is None:
        train_files, val_files = stdlib_files()
        if not train_files or not val_files:
            where = str(stdlib_dir())
            message = f"no Python sources in the standard library directory {where!r}; give a text file with --data PATH"
            raise ConfigError([("task.data", message)])
        (train, train_digests), (val, val_digests) = _read(train_files), _read(val_files)
        corpus = Corpus(
            train=train,
            val=val,
            source=f"python stdlib ({stdlib_dir()})",
            train_files=tuple(f.name for f in train_files),
            val_files=tuple(f.name for f in val_files),
            sha256=stdlib_digest(train_digests, val_digests),
        )
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([("task.data", f"no such file: {str(p)!r}")])
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise unreadable_data(exc, p) from exc
        cut = len(raw) - len(raw) // VALIDATION_MODULUS
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
        corpus = Corpus(train=data[:cut], val=data[cut:], source=str(p), sha256=hashlib.sha256(raw).hexdigest())
    for split in ("train", "val"):
        size = getattr(corpus, split).numel()
        if size <= context + 1:
            message = (
                f"the {split} split of {corpus.source} has {size} bytes; it needs more than context + 1 = "
                f"{context + 1} (use a larger file or a smaller --context)"
            )
            raise ConfigError([("task.data", message)])
    return corpus
