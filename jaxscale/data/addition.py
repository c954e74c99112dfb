"""Multi-digit addition as text: a task that needs no download, for test-time compute.

A problem is a pair of integers ``0 <= a, b < 10**digits``; its document is ``"a+b=c\\n"``
(``"123+456=579\\n"``), its prompt ``"a+b="`` and its answer ``"c"``. A small byte-level decoder
learns it on a CPU in minutes without learning it perfectly, which is where sampling several
answers and voting pays (`jaxscale.ttc`, `jaxscale ttc`).

Every problem belongs to one split, decided by a hash of ``(a, b)`` alone (not by the seed or the
digits): ``test`` (1% of the problems: the only ones `make_tasks` draws), ``held_out`` (the next
`data.val_fraction` of them: the evaluation loss) and ``train`` (the rest). So the prompts of a
task file appear in no training or evaluation window, whatever the seeds of either.

Training records (`AdditionWindows`) are windows of ``seq_len + 1`` tokens packed with whole
documents, each window a pure function of ``(seed, split, index)``; no document is cut at a
window's edge, the tail of a window is padding (outside the loss).
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Sequence

import numpy as np

from jaxscale.data.sources import Record, _Batched, window_records
from jaxscale.data.tokenizers import ByteTokenizer, Tokenizer
from jaxscale.errors import ConfigError

TRAIN, HELD_OUT, TEST = 0, 1, 2  # split ids (also mixed into each window's random stream)
SPLITS = {"train": TRAIN, "held_out": HELD_OUT, "test": TEST}
TEST_FRACTION = 0.01  # share of all problems kept for task files
_BUCKETS = 10_000  # resolution of the split fractions
MAX_DIGITS = 9  # operands and sums stay below 2**32 (the hash packs a and b into 64 bits)
_ENUMERATE_BELOW = 10**6  # problem spaces up to this size are listed (small splits are found)


def problem_hash(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each problem ``(a, b)`` (splitmix64's finaliser of ``a << 32 | b``)."""
    x = (np.asarray(a, np.uint64) << np.uint64(32)) | np.asarray(b, np.uint64)
    with np.errstate(over="ignore"):  # the mixing multiplies wrap around by design
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def problem_split(a: np.ndarray, b: np.ndarray, val_fraction: float) -> np.ndarray:
    """The split of each problem: TEST, HELD_OUT or TRAIN (int8), from `problem_hash` alone."""
    bucket = (problem_hash(a, b) % np.uint64(_BUCKETS)).astype(np.int64)
    test = round(TEST_FRACTION * _BUCKETS)
    held_out = test + round(val_fraction * _BUCKETS)
    return np.where(bucket < test, TEST, np.where(bucket < held_out, HELD_OUT, TRAIN)).astype(
        np.int8)


def prompt_text(a: int, b: int) -> str:
    return f"{a}+{b}="


def document_text(a: int, b: int) -> str:
    return f"{a}+{b}={a + b}\n"


def _check_digits(digits: int) -> None:
    if not 1 <= digits <= MAX_DIGITS:
        raise ConfigError(f"data.addition_digits={digits} must be in [1, {MAX_DIGITS}]")


@functools.lru_cache(maxsize=8)
def _listed(digits: int, split: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Every problem of a split, for problem spaces small enough to list (`_ENUMERATE_BELOW`)."""
    size = 10**digits
    a, b = np.divmod(np.arange(size * size, dtype=np.int64), size)
    keep = problem_split(a, b, val_fraction) == split
    return a[keep], b[keep]


def _split_name(split: int) -> str:
    return next(name for name, i in SPLITS.items() if i == split)


def draw_problems(rng: np.random.Generator, n: int, digits: int, split: int,
                  val_fraction: float, distinct: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`n` problems drawn uniformly from one split (without repeats when `distinct`, and then
    the first `n` of a longer draw: a task file of 200 problems starts with the one of 100).

    Raises:
      ConfigError: the split has fewer than `n` problems (``distinct``) or none.
    """
    _check_digits(digits)
    size = 10**digits
    if size * size <= _ENUMERATE_BELOW:
        a, b = _listed(digits, split, val_fraction)
        if not len(a) and not distinct:
            raise ConfigError(
                f"data.addition_digits={digits} with data.val_fraction={val_fraction} leaves no "
                f"problems in the {_split_name(split)!r} split")
        if distinct and len(a) < n:
            raise ConfigError(
                f"data.addition_digits={digits} has {len(a)} problems in the "
                f"{_split_name(split)!r} split, fewer than the {n} asked for; use more digits")
        pick = rng.permutation(len(a))[:n] if distinct else rng.integers(0, len(a), n)
        return a[pick], b[pick]
    # Large spaces: rejection sampling; every split holds at least ~1% of the problems.
    got_a, got_b, seen = [], [], set()
    while len(got_a) < n:
        a = rng.integers(0, size, 4096)
        b = rng.integers(0, size, 4096)
        keep = problem_split(a, b, val_fraction) == split
        for x, y in zip(a[keep].tolist(), b[keep].tolist(), strict=True):
            if distinct:
                if (x, y) in seen:
                    continue
                seen.add((x, y))
            got_a.append(x)
            got_b.append(y)
    return np.asarray(got_a[:n], np.int64), np.asarray(got_b[:n], np.int64)


class AdditionWindows(_Batched):
    """Windows of ``seq_len + 1`` tokens packed with whole addition documents of one split.

    Window ``i`` draws its problems from ``default_rng([seed, split, i])`` and lays their
    documents end to end while they fit; the rest is padding (document id -1, outside the loss).
    Each document's positions start at 0 (`window_records`), as a prompt's do when sampling.
    """

    def __init__(self, seq_len: int, digits: int, seed: int, split: int = TRAIN,
                 val_fraction: float = 0.02, tokenizer: Tokenizer | None = None,
                 size: int = 1 << 30):
        _check_digits(digits)
        if seq_len + 1 < 3 * digits + 4:  # validation.validate says so for a config
            raise ValueError(f"seq_len={seq_len} is shorter than a {digits}-digit document")
        if val_fraction + TEST_FRACTION >= 1:
            raise ConfigError(f"data.val_fraction={val_fraction} leaves no addition problems to "
                              f"train on ({TEST_FRACTION:.0%} are kept for task files)")
        self.seq_len, self.digits, self.seed, self.split = seq_len, digits, seed, split
        self.val_fraction, self._len = val_fraction, size
        self.tokenizer = tokenizer or ByteTokenizer()
        self._per_window = (seq_len + 1) // 6 + 1  # "0+0=0\n" is the shortest document

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and document ids (-1 = padding) of window `index`, each [seq_len + 1]."""
        rng = np.random.default_rng([self.seed, self.split, int(index)])
        a, b = draw_problems(rng, self._per_window, self.digits, self.split, self.val_fraction)
        length = self.seq_len + 1
        tokens = np.zeros(length, np.int64)
        doc_ids = np.full(length, -1, np.int64)
        at = 0
        for d, (x, y) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
            ids = self.tokenizer.encode(document_text(x, y))
            if at + len(ids) > length:
                break
            tokens[at:at + len(ids)] = ids
            doc_ids[at:at + len(ids)] = d
            at += len(ids)
        return tokens, doc_ids

    def batch(self, indices: np.ndarray) -> Record:
        """Windows `indices`, stacked: each field [len(indices), seq_len]."""
        tokens, doc_ids = zip(*(self.window(i) for i in np.asarray(indices).reshape(-1)),
                                strict=True)
        return window_records(np.stack(tokens), np.stack(doc_ids))


def make_tasks(n: int, digits: int = 3, seed: int = 0) -> list[dict[str, str]]:
    """`n` distinct problems of the test split: ``[{"prompt": "a+b=", "answer": "c"}, ...]``.

    The test split is disjoint from the training and held-out windows for any seed and any
    `data.val_fraction` (see the module docstring); `seed` picks which test problems.
    """
    if n < 1:
        raise ConfigError(f"--make-tasks {n} must be at least 1")
    # The test split does not depend on val_fraction: any value gives the same problems.
    a, b = draw_problems(np.random.default_rng([seed, TEST]), n, digits, TEST, 0.0,
                         distinct=True)
    return [{"prompt": prompt_text(x, y), "answer": str(x + y)}
            for x, y in zip(a.tolist(), b.tolist(), strict=True)]


def write_tasks(path: str | pathlib.Path, n: int, digits: int = 3, seed: int = 0) -> pathlib.Path:
    """Write `make_tasks(n, digits, seed)` as JSON lines to `path`; returns the path."""
    path = pathlib.Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in make_tasks(n, digits, seed)))
    return path


def verify(prompt: str, completion: str) -> float:
    """An exact verifier for ``--scorer jaxscale.data.addition:verify``: 1.0 when the completion's
    first line is the sum of the prompt's operands, else 0.0 (best-of-N with it is pass@N)."""
    left, _, _ = prompt.partition("=")
    try:
        a, b = (int(x) for x in left.split("+"))
    except ValueError:
        return 0.0
    return float(completion.split("\n", 1)[0].strip() == str(a + b))


def operands(tasks: Sequence[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """The ``(a, b)`` of each task row's ``"a+b="`` prompt (to check a task file's split)."""
    pairs = [row["prompt"].rstrip("=").split("+") for row in tasks]
    return (np.asarray([int(x) for x, _ in pairs], np.int64),
            np.asarray([int(y) for _, y in pairs], np.int64))
