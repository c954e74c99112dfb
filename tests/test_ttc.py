"""Test-time compute: the addition source and its task files (exact documents, the splits keep
task prompts out of training), the answer extractor, majority vote and best-of-N on hand-made
samples with exact accuracies over nested prefixes, verifier loading, and `jaxscale ttc` end to
end on a two-step model, with every bad input's one-line error."""

import json
import sys
import types

import numpy as np
import pytest

from jaxscale import cli, ttc
from jaxscale import config as config_lib
from jaxscale.data import addition
from jaxscale.data.tokenizers import ByteTokenizer
from jaxscale.errors import ConfigError

BYTES = ByteTokenizer()


# -- the addition source ---------------------------------------------------------------------


def test_addition_windows_pack_whole_documents_as_a_function_of_the_seed():
    windows = addition.AdditionWindows(seq_len=32, digits=3, seed=0)
    tokens, doc_ids = windows.window(0)
    assert BYTES.decode(tokens) == "850+610=1460\n636+860=1496\n" + "\0" * 7
    assert doc_ids.tolist() == [0] * 13 + [1] * 13 + [-1] * 7
    assert BYTES.decode(windows.window(1)[0]) == "889+812=1701\n449+188=637\n" + "\0" * 8
    again = addition.AdditionWindows(seq_len=32, digits=3, seed=0).batch(np.array([0, 1]))
    other = addition.AdditionWindows(seq_len=32, digits=3, seed=1).batch(np.array([0, 1]))
    assert BYTES.decode(other["inputs"][0]) != BYTES.decode(again["inputs"][0])
    record = windows[0]
    np.testing.assert_array_equal(record["inputs"], again["inputs"][0])
    # positions restart at every document; the loss skips the boundary and the padding
    assert record["positions"].tolist() == list(range(13)) * 2 + list(range(6))
    assert record["segment_ids"].tolist() == [1] * 13 + [2] * 13 + [0] * 6
    assert record["loss_mask"].tolist() == [1] * 12 + [0] + [1] * 12 + [0] * 7


def _window_problems(windows, count):
    """The (a, b) of every document in the first `count` windows."""
    found = []
    for i in range(count):
        tokens, doc_ids = windows.window(i)
        text = BYTES.decode(tokens[doc_ids >= 0])
        for line in text.splitlines():
            left, _, total = line.partition("=")
            a, b = map(int, left.split("+"))
            assert int(total) == a + b
            found.append((a, b))
    return found


def test_splits_are_disjoint_and_task_files_draw_only_the_test_split(tmp_path):
    a, b = np.divmod(np.arange(10**6), 1000)
    split = addition.problem_split(a, b, val_fraction=0.02)
    assert np.bincount(split).tolist() == [970078, 19825, 10097]
    # the test split does not move with data.val_fraction
    wide = addition.problem_split(a, b, val_fraction=0.3)
    np.testing.assert_array_equal(split == addition.TEST, wide == addition.TEST)

    path = addition.write_tasks(tmp_path / "tasks.jsonl", 200, digits=3, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[:3] == addition.make_tasks(3) == [{"prompt": "697+508=", "answer": "1205"},
                                                  {"prompt": "191+307=", "answer": "498"},
                                                  {"prompt": "892+557=", "answer": "1449"}]
    assert len({r["prompt"] for r in rows}) == 200  # distinct problems
    x, y = addition.operands(rows)
    assert np.all(addition.problem_split(x, y, 0.02) == addition.TEST)
    assert [r["answer"] for r in rows] == [str(i + j) for i, j in zip(x, y, strict=True)]
    assert addition.make_tasks(3, seed=1) != addition.make_tasks(3, seed=0)
    assert ttc.read_tasks(path) == [ttc.Task(r["prompt"], r["answer"]) for r in rows]

    tasks = set(zip(x.tolist(), y.tolist(), strict=True))
    train = _window_problems(addition.AdditionWindows(32, 3, seed=0), 300)
    held_out = _window_problems(
        addition.AdditionWindows(32, 3, seed=0, split=addition.HELD_OUT), 100)
    assert len(train) > 500 and len(held_out) > 150
    assert not tasks & set(train) and not tasks & set(held_out)
    assert set(addition.problem_split(*np.array(train).T, 0.02)) == {addition.TRAIN}
    assert set(addition.problem_split(*np.array(held_out).T, 0.02)) == {addition.HELD_OUT}


def test_addition_settings_fail_in_one_line():
    with pytest.raises(ConfigError, match=r"^data.addition_digits=0 must be in \[1, 9\]$"):
        config_lib.load("addition", ["data.addition_digits=0"])
    with pytest.raises(ConfigError, match=r"^seq_len=11 is too short for data.addition_digits=3: "
                       r"a document takes up to 13 tokens, so seq_len must be at least 12$"):
        config_lib.load("addition", ["seq_len=11"])
    with pytest.raises(ConfigError, match=r"^data.addition_digits=1 has 1 problems in the 'test' "
                       r"split, fewer than the 5 asked for; use more digits$"):
        addition.make_tasks(5, digits=1)
    held_out = addition.AdditionWindows(32, 3, seed=0, split=addition.HELD_OUT, val_fraction=0.0)
    with pytest.raises(ConfigError, match=r"^data.addition_digits=3 with data.val_fraction=0.0 "
                       r"leaves no problems in the 'held_out' split$"):
        held_out.window(0)


# -- answers, votes and scores ---------------------------------------------------------------


@pytest.mark.parametrize("completion, answer", [
    ("579\n", "579"), ("579", "579"), (" 579 \nnext", "579"), ("-12\n", "-12"),
    ("57a\n", None), ("\n579", None), ("", None), ("5 7\n", None), ("+579\n", None),
])
def test_extract_answer(completion, answer):
    assert ttc.extract_answer(completion) == answer


def test_majority_vote_counts_answers_and_breaks_ties_by_first_appearance():
    assert ttc.majority_vote(["1", "2", "2"]) == "2"
    assert ttc.majority_vote(["1", "2", "2", "1"]) == "1"  # tied: "1" came first
    assert ttc.majority_vote(["2", None, None, "1", "1"]) == "1"  # no answer: no vote
    assert ttc.majority_vote([None, "3", "4"]) == "3"
    assert ttc.majority_vote([None, None]) is None


def test_best_of_n_keeps_the_top_score_among_samples_with_an_answer():
    assert ttc.best_of_n(["1", "2", "3"], [-1.0, -0.2, -0.5]) == "2"
    assert ttc.best_of_n(["1", "2", "3"], [-0.2, -0.2, -0.5]) == "1"  # tied: the first sample
    assert ttc.best_of_n([None, "2", "3"], [0.0, -3.0, -0.5]) == "3"  # no answer: never kept
    assert ttc.best_of_n([None, None], [0.0, 0.0]) is None


def _samples(answers, scores, tokens):
    return ttc.Samples([[""] * len(a) for a in answers], answers, np.asarray(scores, float),
                       np.asarray(tokens))


def test_evaluate_scores_every_n_on_the_first_n_samples():
    tasks = [ttc.Task("p0", "7"), ttc.Task("p1", "5"), ttc.Task("p2", "9")]
    samples = _samples(
        answers=[["7", "1", "1", "7"],  # right, then outvoted, then a tie that "7" wins
                 ["4", "5", "5", "5"],  # wrong first, then a majority for "5"
                 [None, "9", "8", "8"]],  # no answer first; "9" alone, then outvoted by "8"
        scores=[[-0.1, -0.5, -0.2, -0.3],
                [-0.9, -0.4, -0.6, -0.1],
                [0.0, -0.7, -0.3, -0.8]],
        tokens=[[2, 2, 2, 2], [2, 2, 3, 2], [4, 2, 2, 2]])
    rows = ttc.evaluate(tasks, samples, ttc.sample_counts(4))
    assert [r["n"] for r in rows] == [1, 2, 4]
    # N=1: the first samples: 7 right, 4 wrong, none -> 1/3 for both
    # N=2: vote ties -> first: "7" right, "4" wrong, "9" right; best: "7", "5", "9" all right
    # N=4: vote "7" (tie, first) right, "5" right, "8" wrong; best: -0.1 "7", -0.1 "5", -0.3 "8"
    assert [r["majority"] for r in rows] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert [r["best_of_n"] for r in rows] == pytest.approx([1 / 3, 1.0, 2 / 3])
    assert [r["oracle"] for r in rows] == pytest.approx([1 / 3, 1.0, 1.0])
    assert [r["tokens"] for r in rows] == [8, 14, 27]
    assert [r["tokens_per_prompt"] for r in rows] == pytest.approx([8 / 3, 14 / 3, 9.0])
    with pytest.raises(ValueError, match=r"N=8 is outside the 4 samples drawn"):
        ttc.evaluate(tasks, samples, [8])


def test_sample_counts():
    assert ttc.sample_counts(1) == [1]
    assert ttc.sample_counts(32) == [1, 2, 4, 8, 16, 32]
    assert ttc.sample_counts(5) == [1, 2, 4, 5]
    with pytest.raises(ConfigError, match=r"^--max-n 0 must be at least 1$"):
        ttc.sample_counts(0)


def test_scorers_and_verifiers():
    logprob = ttc.load_scorer("logprob")
    assert logprob("1+1=", "2\n", np.array([-0.5, -1.5])) == pytest.approx(-1.0)
    verify = ttc.load_scorer("jaxscale.data.addition:verify")
    assert verify("12+30=", "42\n", np.zeros(3)) == 1.0
    assert verify("12+30=", "41\n", np.zeros(3)) == 0.0
    for spec, message in [
        ("lgprob", "--scorer 'lgprob' is neither one of: logprob nor a module:function verifier "
                   "(did you mean 'logprob'?)"),
        ("mod:", "--scorer 'mod:' is neither one of: logprob nor a module:function verifier"),
        ("no_such_module_xyz:f", "--scorer 'no_such_module_xyz:f': cannot import "
                                 "'no_such_module_xyz' (No module named 'no_such_module_xyz')"),
        ("jaxscale.data.addition:nope",
         "--scorer 'jaxscale.data.addition:nope': module 'jaxscale.data.addition' has no 'nope'"),
        ("jaxscale.data.addition:TEST",
         "--scorer 'jaxscale.data.addition:TEST': jaxscale.data.addition.TEST is not callable"),
    ]:
        with pytest.raises(ConfigError) as e:
            ttc.load_scorer(spec)
        assert str(e.value) == message
    with pytest.raises(ConfigError, match=r"^--scorer 'os.path:join' returned '1\+1=/2\\n' for "
                       r"prompt '1\+1='; a verifier returns a number$"):
        ttc.load_scorer("os.path:join")("1+1=", "2\n", np.zeros(1))


def test_bad_task_files_name_the_line(tmp_path):
    path = tmp_path / "tasks.jsonl"
    for text, message in [
        ('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n',
         f'{path}:2: a task row needs a "prompt" (text) and an "answer" (text or integer)'),
        ('\n{"prompt": "", "answer": "2"}\n',
         f'{path}:2: a task row needs a "prompt" (text) and an "answer" (text or integer)'),
        ('["1+1=", "2"]\n',
         f'{path}:1: a task row needs a "prompt" (text) and an "answer" (text or integer)'),
        ('{"prompt": "1+1=", "answer": 2}\nnot json\n',
         f"{path}:2: not a JSON object (Expecting value)"),
        ("\n\n", f"--tasks {str(path)!r}: holds no tasks"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            ttc.read_tasks(path)
        assert str(e.value) == message
    path.write_text('{"prompt": "1+1=", "answer": 2}\n')
    assert ttc.read_tasks(path) == [ttc.Task("1+1=", "2")]  # an integer answer is its digits
    with pytest.raises(ConfigError, match=r"^--tasks '.*missing.jsonl': no such file$"):
        ttc.read_tasks(tmp_path / "missing.jsonl")


class FakeGenerator:
    """A Generator stand-in that returns scripted completions in order, per prompt text."""

    def __init__(self, script, eos_ids="[10]"):
        self.cfg = config_lib.load("addition", [f"generate.eos_ids={eos_ids}"])
        self.tokenizer = BYTES
        self.script, self.calls = script, []

    def generate(self, prompts, **changes):
        self.calls.append(([BYTES.decode(p) for p in prompts], changes))
        drawn = {}
        ids, logprobs = [], []
        for p in prompts:
            text = BYTES.decode(p)
            completion, score = self.script[text][drawn.setdefault(text, 0)]
            drawn[text] += 1
            ids.append(BYTES.encode(completion))
            logprobs.append(np.full(len(completion), score))
        return types.SimpleNamespace(ids=ids, logprobs=logprobs)


def test_sampling_repeats_each_prompt_and_scores_every_sample():
    script = {"1+1=": [("2\n", -0.5), ("3\n", -0.1), ("2\n", -0.4), ("x\n", 0.0)],
              "5+5=": [("9\n", -0.2), ("10\n", -0.3), ("10\n", -0.9), ("10", -0.8)]}
    gen = FakeGenerator(script)
    tasks = [ttc.Task("1+1=", "2"), ttc.Task("5+5=", "10")]
    report = ttc.accuracy_vs_samples(gen, tasks, max_n=4, temperature=0.7, seed=5)
    (greedy_prompts, greedy_settings), (prompts, settings) = gen.calls
    assert greedy_prompts == ["1+1=", "5+5="]
    assert greedy_settings == {"temperature": 0.0, "eos_ids": (10,)}
    assert prompts == ["1+1="] * 4 + ["5+5="] * 4
    assert settings == {"temperature": 0.7, "seed": 5, "eos_ids": (10,)}
    assert report["greedy"] == 0.5 and report["greedy_tokens"] == 4
    assert report["sample_accuracy"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert report["tasks"][0] == {"prompt": "1+1=", "answer": "2",
                                  "answers": ["2", "3", "2", None],
                                  "scores": [-0.5, -0.1, -0.4, 0.0], "tokens": [2, 2, 2, 2]}
    assert report["tasks"][1]["answers"] == ["9", "10", "10", "10"]
    # N=1: "2" right, "9" wrong. N=2: vote "2" (tie, first) and "9" (tie, first); best "3" and
    # "9". N=4: vote "2" and "10"; best "3" (-0.1; "x" has no answer) and "9" (-0.2).
    assert [(r["n"], r["majority"], r["best_of_n"], r["oracle"], r["tokens"])
            for r in report["rows"]] == [(1, 0.5, 0.5, 0.5, 4), (2, 0.5, 0.0, 1.0, 9),
                                         (4, 1.0, 0.0, 1.0, 18)]
    gen.calls.clear()
    verified = ttc.accuracy_vs_samples(gen, tasks, max_n=4, scorer="jaxscale.data.addition:verify")
    assert [r["best_of_n"] for r in verified["rows"]] == [0.5, 1.0, 1.0]  # the oracle
    assert gen.calls[1][1] == {"temperature": 0.8, "seed": 0, "eos_ids": (10,)}
    # without generate.eos_ids the newline ends an answer
    gen = FakeGenerator(script, eos_ids="[]")
    ttc.draw_samples(gen, tasks[:1], 1)
    assert gen.calls[0][1] == {"eos_ids": (10,)}


# -- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step run of a small model on the addition source: a workdir with config.yaml and a
    checkpoint (and the addition preset's sampling settings: 6 new tokens, newline ends)."""
    from jaxscale.run.loop import train

    workdir = tmp_path_factory.mktemp("addition")
    cfg = config_lib.load("addition", [
        "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
        "model.d_ff=64", "seq_len=16", "batch_size=8", "steps=2", "eval_batches=1",
        "progress=false", "optim.warmup_steps=1", f"workdir={workdir}", "mesh.fsdp=8"])
    train(cfg)
    return workdir


def test_cli_tables_and_json_agree_with_the_samples(trained, tmp_path, capsys, monkeypatch):
    out, plot = tmp_path / "ttc.json", tmp_path / "ttc.png"
    argv = ["ttc", "--checkpoint", str(trained), "--make-tasks", "6", "--max-n", "8",
            "--temperature", "1.0", "--seed", "3"]
    assert cli.main(argv + ["--output", str(out), "--plot", str(plot)]) == 0
    printed = capsys.readouterr()
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["n"] for r in rows] == [1, 2, 4, 8]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in printed.err and f"wrote {plot}" in printed.err
    table = printed.out.splitlines()
    assert table[0].startswith("6 prompts, 8 samples each at temperature 1 (seed 3), best-of-N "
                               "by logprob; accuracy of one sample ")
    for line, r in zip(table[2:], rows, strict=True):
        assert line.split() == [str(r["n"]), f"{r['best_of_n']:.3f}", f"{r['majority']:.3f}",
                                f"{r['oracle']:.3f}", f"{r['tokens']:,}",
                                f"{r['tokens_per_prompt']:.1f}"]
    tasks = [ttc.Task(row["prompt"], row["answer"]) for row in addition.make_tasks(6)]
    assert [(t["prompt"], t["answer"]) for t in report["tasks"]] == [
        (t.prompt, t.answer) for t in tasks]
    # every N is the first N of one draw: recompute the table from the recorded samples
    samples = ttc.Samples([[""] * 8] * 6, [t["answers"] for t in report["tasks"]],
                          np.array([t["scores"] for t in report["tasks"]]),
                          np.array([t["tokens"] for t in report["tasks"]]))
    again = ttc.evaluate(tasks, samples, [1, 2, 4, 8])
    for mine, theirs in zip(again, rows, strict=True):
        assert mine == pytest.approx(theirs)
    right = [[a == t.answer for a in row["answers"]]
             for t, row in zip(tasks, report["tasks"], strict=True)]
    assert report["sample_accuracy"] == pytest.approx(np.mean(right))
    assert rows[0]["majority"] == rows[0]["best_of_n"]  # N=1: both keep the first sample
    tokens = [r["tokens"] for r in rows]
    assert tokens == sorted(set(tokens)) and tokens[-1] == samples.tokens.sum()
    assert 6 * 8 <= tokens[-1] <= 6 * 8 * 6  # at least one token each, at most max_new_tokens
    oracle = [r["oracle"] for r in rows]
    assert oracle == sorted(oracle)  # nested prefixes: a right answer stays found

    # The same seed draws the same samples whatever the scorer; an exact verifier's best-of-N
    # is the oracle. Without matplotlib the plot is a note, not a failure.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out2 = tmp_path / "verified.json"
    assert cli.main(argv + ["--scorer", "jaxscale.data.addition:verify", "--output", str(out2),
                            "--plot", str(tmp_path / "no.png")]) == 0
    assert ("jaxscale: note: --plot {} skipped: matplotlib is not installed (pip install "
            "'jaxscale[plot]')".format(tmp_path / "no.png")) in capsys.readouterr().err
    verified = json.loads(out2.read_text())
    assert [t["answers"] for t in verified["tasks"]] == [t["answers"] for t in report["tasks"]]
    assert [r["best_of_n"] for r in verified["rows"]] == oracle
    assert [r["majority"] for r in verified["rows"]] == [r["majority"] for r in rows]
    assert not (tmp_path / "no.png").exists()


def test_cli_bad_inputs_fail_in_one_line(trained, tmp_path, capsys):
    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text('{"prompt": "1+1=", "answer": "2"}\n{"answer": "4"}\n')
    run = ["ttc", "--checkpoint", str(trained)]
    for argv, line in [
        (run, "give exactly one of --tasks FILE.jsonl and --make-tasks N"),
        (run + ["--make-tasks", "3", "--tasks", str(bad_row)],
         "give exactly one of --tasks FILE.jsonl and --make-tasks N"),
        (run + ["--make-tasks", "3", "--max-n", "0"], "--max-n 0 must be at least 1"),
        (run + ["--make-tasks", "0"], "--make-tasks 0 must be at least 1"),
        (run + ["--tasks", str(tmp_path / "missing.jsonl")],
         f"--tasks {str(tmp_path / 'missing.jsonl')!r}: no such file"),
        (run + ["--tasks", str(bad_row)],
         f'{bad_row}:2: a task row needs a "prompt" (text) and an "answer" (text or integer)'),
        (run + ["--make-tasks", "3", "--scorer", "nomodule_q:f"],
         "--scorer 'nomodule_q:f': cannot import 'nomodule_q' (No module named 'nomodule_q')"),
        (run + ["--make-tasks", "3", "--scorer", "jaxscale.ttc"],
         "--scorer 'jaxscale.ttc' is neither one of: logprob nor a module:function verifier"),
        (["ttc", "--make-tasks", "3"],
         "the following arguments are required: --checkpoint (see 'jaxscale ttc --help')"),
        (run + ["--max-m", "3"], "unrecognized argument '--max-m' (did you mean '--max-n'?)"),
        (["ttc", "--checkpoint", str(tmp_path / "nowhere"), "--make-tasks", "3"],
         f"--checkpoint {str(tmp_path / 'nowhere')!r}: no such directory"),
    ]:
        assert cli.main(argv) == cli.EXIT_CONFIG
        captured = capsys.readouterr()
        assert captured.err == f"jaxscale: error: {line}\n"
        assert captured.out == ""
