"""Test-time compute: sample N answers per prompt, then keep one by a score or by a vote.

    gen = Generator.load("/tmp/ttc-run")                        # a trained addition model
    tasks = read_tasks("tasks.jsonl")                           # {"prompt", "answer"} rows
    report = accuracy_vs_samples(gen, tasks, max_n=32, temperature=0.8)
    print(format_report(report))

**Best-of-N** keeps the highest-scoring of the N samples. The default score (`logprob`) is the
model's own mean log-probability of the tokens it generated (the answer and its end-of-sequence
newline; at temperature 1, whatever the sampling temperature); ``module:function`` names a
verifier called as ``f(prompt, completion) -> float``. **Self-consistency** keeps the answer that
most of the N samples give (a majority vote).

A sample's answer is `extract_answer` of its completion: the integer it wrote after the prompt's
``=``, up to the newline (or the end of the generation). A sample without one does not vote, and
best-of-N keeps it only when no sample has an answer (then the prompt counts as wrong). Ties are
broken by sample order: the vote goes to the tied answer that appeared first, best-of-N to the
first of the tied best scores. So at N=1 both keep the first sample and agree.

The N's share one draw: `max_n` samples per prompt are drawn once and N is evaluated on the first
N of them (nested prefixes), so the curve's points are not independent draws and the compute of N
is what those first N samples generated. Accuracies are means over the prompts; ``oracle`` is the
share of prompts with at least one right answer among the N (pass@N: what a perfect verifier
would reach).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import math
import pathlib
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxscale.errors import ConfigError
from jaxscale.validation import did_you_mean

if TYPE_CHECKING:
    from jaxscale.generate import Generator

# A scorer sees the prompt, the completion's text and the log-probability of each generated id.
Scorer = Callable[[str, str, np.ndarray], float]

_INTEGER = re.compile(r"\s*(-?\d+)\s*")


@dataclasses.dataclass(frozen=True)
class Task:
    prompt: str  # the text the model continues, e.g. "123+456="
    answer: str  # the right answer, compared with `extract_answer` of a completion


def read_tasks(path: str | pathlib.Path) -> list[Task]:
    """Tasks from a JSON-lines file of ``{"prompt": "123+456=", "answer": "579"}`` rows.

    Raises:
      ConfigError: no such file, a line that is not JSON, a row without a non-empty string
        "prompt" and a string or integer "answer" (the message names the line), or no rows.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"--tasks {str(path)!r}: no such file")
    from jaxscale.data.documents import json_rows

    tasks = []
    for where, row in json_rows(path):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        answer = row.get("answer") if isinstance(row, dict) else None
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = str(answer)
        if not (isinstance(prompt, str) and prompt and isinstance(answer, str)):
            raise ConfigError(f'{where}: a task row needs a "prompt" (text) and an "answer" '
                              f"(text or integer)")
        tasks.append(Task(prompt, answer.strip()))
    if not tasks:
        raise ConfigError(f"--tasks {str(path)!r}: holds no tasks")
    return tasks


def extract_answer(completion: str) -> str | None:
    """The integer on the completion's first line (``"579\\n"`` -> ``"579"``), else None.

    The completion is what the model wrote after the prompt (which ends with ``=``); the answer
    stops at the first newline, the end-of-sequence of the addition task, or at the end of the
    generation. Anything but an integer (and surrounding spaces) on that line is no answer.
    """
    match = _INTEGER.fullmatch(completion.split("\n", 1)[0])
    return match.group(1) if match else None


# -- scorers ---------------------------------------------------------------------------------


def mean_logprob(prompt: str, completion: str, logprobs: np.ndarray) -> float:
    """The model's mean log-probability per generated token (-inf for an empty generation)."""
    return float(np.mean(logprobs)) if len(logprobs) else -math.inf


# --scorer names -> scorers; anything else must be a module:function verifier.
SCORERS: dict[str, Scorer] = {"logprob": mean_logprob}


def load_verifier(spec: str) -> Callable[[str, str], float]:
    """The function ``module:function`` names, e.g. ``jaxscale.data.addition:verify``.

    Raises:
      ConfigError: one line naming `spec`: not of the form module:function, the module does not
        import, it has no such attribute, or the attribute is not callable.
    """
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"--scorer {spec!r} is neither one of: {', '.join(SCORERS)} nor a "
                          "module:function verifier" + did_you_mean(spec, list(SCORERS)))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        reason = " ".join(str(e).split())
        raise ConfigError(f"--scorer {spec!r}: cannot import {module_name!r} ({reason})") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise ConfigError(f"--scorer {spec!r}: module {module_name!r} has no {function_name!r}")
    if not callable(function):
        raise ConfigError(f"--scorer {spec!r}: {module_name}.{function_name} is not callable")
    return function


def load_scorer(spec: str) -> Scorer:
    """A scorer: a name in `SCORERS`, or a ``module:function`` verifier (see `load_verifier`)."""
    if spec in SCORERS:
        return SCORERS[spec]
    verifier = load_verifier(spec)

    def score(prompt: str, completion: str, logprobs: np.ndarray) -> float:
        value = verifier(prompt, completion)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--scorer {spec!r} returned {value!r} for prompt {prompt!r}; a "
                              "verifier returns a number") from None

    return score


# -- selection -------------------------------------------------------------------------------


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The answer most samples give; a tie goes to the tied answer that appeared first.

    Samples without an answer (None) do not vote; with no answer at all the result is None.
    """
    votes = collections.Counter(a for a in answers if a is not None)
    if not votes:
        return None
    most = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == most)


def best_of_n(answers: Sequence[str | None], scores: Sequence[float]) -> str | None:
    """The answer of the highest-scoring sample that has one; a tie goes to the first sample."""
    candidates = [i for i, a in enumerate(answers) if a is not None]
    if not candidates:
        return None
    best = max(candidates, key=lambda i: (scores[i], -i))
    return answers[best]


def sample_counts(max_n: int) -> list[int]:
    """The N's evaluated: 1, 2, 4, ... up to `max_n` (and `max_n` itself when no power of 2)."""
    if max_n < 1:
        raise ConfigError(f"--max-n {max_n} must be at least 1")
    counts = [2**k for k in range(max_n.bit_length()) if 2**k <= max_n]
    return counts if counts[-1] == max_n else counts + [max_n]


@dataclasses.dataclass(frozen=True)
class Samples:
    """`max_n` samples of every prompt: each field indexed [prompt][sample]."""

    completions: list[list[str]]  # the generated text
    answers: list[list[str | None]]  # extract_answer of each completion
    scores: np.ndarray  # float [P, max_n]: the scorer's value of each sample
    tokens: np.ndarray  # int [P, max_n]: tokens each sample generated (its compute)

    @property
    def max_n(self) -> int:
        return self.tokens.shape[1]


def evaluate(tasks: Sequence[Task], samples: Samples, counts: Sequence[int]) -> list[dict]:
    """For each N in `counts`, over the prompts: best-of-N, majority and oracle accuracy, and
    the tokens the first N samples generated (total and per prompt).

    Every N uses the first N samples of each prompt (nested prefixes of one draw).
    """
    rows = []
    for n in counts:
        if not 1 <= n <= samples.max_n:
            raise ValueError(f"N={n} is outside the {samples.max_n} samples drawn")
        best, vote, oracle = [], [], []
        for task, answers, scores in zip(tasks, samples.answers, samples.scores, strict=True):
            first = answers[:n]
            best.append(best_of_n(first, scores[:n]) == task.answer)
            vote.append(majority_vote(first) == task.answer)
            oracle.append(task.answer in first)
        tokens = int(samples.tokens[:, :n].sum())
        rows.append({"n": n, "best_of_n": float(np.mean(best)), "majority": float(np.mean(vote)),
                     "oracle": float(np.mean(oracle)), "tokens": tokens,
                     "tokens_per_prompt": tokens / len(tasks)})
    return rows


# -- sampling --------------------------------------------------------------------------------


def _end_of_answer(gen: Generator) -> tuple[int, ...]:
    """generate.eos_ids, or the newline's id when none are set (and it is one token)."""
    if gen.cfg.generate.eos_ids or gen.tokenizer is None:
        return tuple(gen.cfg.generate.eos_ids)
    newline = [int(i) for i in gen.tokenizer.encode("\n")]
    return tuple(newline) if len(newline) == 1 else ()


def draw_samples(gen: Generator, tasks: Sequence[Task], max_n: int,
                 scorer: Scorer = mean_logprob, **settings: Any) -> Samples:
    """`max_n` samples of every task's prompt, in one `gen.generate` call (it batches).

    Args:
      gen: a Generator with a tokenizer.
      tasks: the prompts (and answers, unused here).
      max_n: samples per prompt: the prompt repeated max_n times, each row its own random draws.
      scorer: scores each sample (see `load_scorer`).
      settings: changes of ``gen.cfg.generate`` (temperature, seed, max_new_tokens, ...); the
        end-of-sequence ids default to `_end_of_answer`.
    """
    if gen.tokenizer is None:
        raise ConfigError("test-time compute needs a tokenizer: the model has none")
    settings.setdefault("eos_ids", _end_of_answer(gen))
    encoded = [gen.tokenizer.encode(t.prompt) for t in tasks]
    out = gen.generate([ids for ids in encoded for _ in range(max_n)], **settings)
    completions, answers = [], []
    scores = np.zeros((len(tasks), max_n))
    tokens = np.zeros((len(tasks), max_n), np.int64)
    for p, task in enumerate(tasks):
        texts, found = [], []
        for j in range(max_n):
            ids, logprobs = out.ids[p * max_n + j], out.logprobs[p * max_n + j]
            text = gen.tokenizer.decode(ids)
            texts.append(text)
            found.append(extract_answer(text))
            scores[p, j] = scorer(task.prompt, text, logprobs)
            tokens[p, j] = len(ids)
        completions.append(texts)
        answers.append(found)
    return Samples(completions, answers, scores, tokens)


def accuracy_vs_samples(gen: Generator, tasks: Sequence[Task], max_n: int = 32,
                        scorer: str = "logprob", temperature: float = 0.8,
                        seed: int | None = None) -> dict:
    """Greedy accuracy, then best-of-N and majority accuracy for N = 1, 2, 4, ... max_n.

    Returns:
      A JSON-ready report: ``rows`` (`evaluate`'s, one per N), ``greedy`` (accuracy at
      temperature 0), ``sample_accuracy`` (the share of right samples over all max_n samples of
      every prompt: the expected accuracy at N=1, less noisy than row N=1's first samples), the
      settings, the sampling seconds, and per task the prompt, answer, and each sample's answer,
      score and token count.
    """
    counts = sample_counts(max_n)
    score = load_scorer(scorer)
    seed = gen.cfg.generate.seed if seed is None else seed
    greedy = draw_samples(gen, tasks, 1, temperature=0.0)
    start = time.perf_counter()
    samples = draw_samples(gen, tasks, max_n, score, temperature=temperature, seed=seed)
    seconds = time.perf_counter() - start
    greedy_right = [a[0] == t.answer for t, a in zip(tasks, greedy.answers, strict=True)]
    # Every sample is a draw of N=1: their mean estimates its accuracy with max_n x the draws.
    sample_right = [np.mean([a == t.answer for a in answers])
                    for t, answers in zip(tasks, samples.answers, strict=True)]
    return {
        "rows": evaluate(tasks, samples, counts),
        "greedy": float(np.mean(greedy_right)),
        "sample_accuracy": float(np.mean(sample_right)),
        "greedy_tokens": int(greedy.tokens.sum()),
        "prompts": len(tasks), "max_n": max_n, "scorer": scorer, "temperature": temperature,
        "seed": seed, "max_new_tokens": gen.cfg.generate.max_new_tokens,
        "sampling_seconds": seconds,
        "tasks": [{"prompt": t.prompt, "answer": t.answer, "answers": answers,
                   "scores": scores.tolist(), "tokens": tokens.tolist()}
                  for t, answers, scores, tokens in zip(tasks, samples.answers, samples.scores,
                                                        samples.tokens, strict=True)],
    }


def format_report(report: dict) -> str:
    """The table of an `accuracy_vs_samples` report: one line per N."""
    lines = [f"{report['prompts']} prompts, {report['max_n']} samples each at temperature "
             f"{report['temperature']:g} (seed {report['seed']}), best-of-N by "
             f"{report['scorer']}; accuracy of one sample {report['sample_accuracy']:.3f} "
             f"(mean of all), greedy {report['greedy']:.3f}",
             f"{'N':>4}  {'best-of-N':>9}  {'majority':>8}  {'oracle':>6}  {'tokens':>9}  "
             f"{'tokens/prompt':>13}"]
    for r in report["rows"]:
        lines.append(f"{r['n']:>4}  {r['best_of_n']:>9.3f}  {r['majority']:>8.3f}  "
                     f"{r['oracle']:>6.3f}  {r['tokens']:>9,}  {r['tokens_per_prompt']:>13.1f}")
    return "\n".join(lines)


def write_report(path: str | pathlib.Path, report: dict) -> pathlib.Path:
    """The report as JSON (written to a temporary file, then renamed); returns the path."""
    from jaxscale.run.hooks import write_atomic

    path = pathlib.Path(path)
    write_atomic(path, json.dumps(report, indent=1) + "\n")
    return path


__all__ = ["SCORERS", "Samples", "Scorer", "Task", "accuracy_vs_samples", "best_of_n",
           "draw_samples", "evaluate", "extract_answer", "format_report", "load_scorer",
           "load_verifier", "majority_vote", "mean_logprob", "read_tasks", "sample_counts",
           "write_report"]
