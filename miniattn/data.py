"""Real text for the language model: the Python standard library's own source.

Every machine that runs miniattn has Python, and so has these files; they are
the default training text. Any UTF-8 file can replace them (``--text PATH``).

The text is read as characters. The vocabulary is the sorted set of
characters of the text, so a checkpoint stores it and refuses text with
characters it has never seen.
"""

import pathlib
import sysconfig

import numpy as np

# A fixed set of pure-Python standard-library modules that exist in every
# CPython 3 release since 3.8. Their contents change a little between
# releases, so results are comparable within one Python version.
STDLIB_FILES = (
    "textwrap.py",
    "string.py",
    "heapq.py",
    "bisect.py",
    "fractions.py",
    "colorsys.py",
    "shlex.py",
    "fnmatch.py",
    "glob.py",
    "calendar.py",
    "queue.py",
    "difflib.py",
)


def stdlib_text():
    """Return the concatenated source of STDLIB_FILES and the paths read."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    paths = [root / name for name in STDLIB_FILES if (root / name).is_file()]
    if not paths:
        raise FileNotFoundError(
            f"none of the standard-library files {', '.join(STDLIB_FILES)} was found under {root}; "
            f"pass a UTF-8 text file with --text PATH"
        )
    return "\n".join(path.read_text(encoding="utf-8") for path in paths), paths


def read_text(path):
    """Return the contents of a UTF-8 text file, with errors that say what to do."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} not found; pass an existing UTF-8 file with --text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"text file {str(path)!r} is not valid UTF-8 ({error.reason} at byte {error.start}); "
            f"convert it to UTF-8 or pass another file"
        ) from None
    if not text:
        raise ValueError(f"text file {str(path)!r} is empty; pass a file with some text")
    return text


class CharVocabulary:
    """The characters of a text, each mapped to an integer id in sorted order."""

    def __init__(self, characters):
        self.characters = "".join(sorted(set(characters)))
        self.index = {character: position for position, character in enumerate(self.characters)}

    def __len__(self):
        return len(self.characters)

    def encode(self, text):
        """Return the ids (int64 array) of the characters of text."""
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            shown = "".join(unknown[:20])
            raise ValueError(
                f"text contains {len(unknown)} characters outside the vocabulary ({shown!r}); "
                f"train a new model on this text instead of loading the checkpoint"
            )
        return np.fromiter((self.index[character] for character in text), dtype=np.int64, count=len(text))

    def decode(self, ids):
        """Return the text of a sequence of ids."""
        return "".join(self.characters[int(token)] for token in ids)


def split_ids(ids, validation_fraction=0.1):
    """Split ids into (train, validation) at a fixed point: the last fraction is validation."""
    cut = int(len(ids) * (1.0 - validation_fraction))
    return ids[:cut], ids[cut:]


def unigram_cross_entropy(train_ids, validation_ids, vocab_size):
    """Return the validation cross-entropy (nats per character) of train-set character frequencies.

    Add-one smoothing keeps characters unseen in training at a finite cost.
    """
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[validation_ids].mean())


def random_batch(ids, batch_size, length, rng):
    """Return inputs and next-character targets (B, L) from random windows of ids."""
    if len(ids) < length + 1:
        raise ValueError(
            f"the text has {len(ids)} characters but one training sequence needs {length + 1}; "
            f"use a longer text or a shorter --context"
        )
    starts = rng.integers(0, len(ids) - length, size=batch_size)
    windows = np.stack([ids[start : start + length + 1] for start in starts])  # (B, L + 1)
    return windows[:, :-1], windows[:, 1:]
