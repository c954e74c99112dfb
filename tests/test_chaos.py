"""The chaos soak, short: a 24-step run restarted after one fault of each kind (an injected write
failure, a kill -9, a SIGTERM) ends bitwise equal to an uninterrupted run, with every step's batch
the reference's, and goodput accounts for the restarts (benchmarks/chaos.py does the work)."""

import importlib
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
chaos = importlib.import_module("chaos")


@pytest.mark.slow
def test_soak_with_one_fault_of_each_kind_ends_bitwise_equal(tmp_path):
    lines = []
    result = chaos.soak(tmp_path, ["fail_save", "kill", "term"], steps=24, every=4, seed=3,
                        log=lines.append)
    assert result["errors"] == [], "\n".join(lines)
    segments = result["segments"]
    assert [(s["kind"], s["code"]) for s in segments] == [
        ("fail_save", chaos.EXIT_CHECKPOINT), ("kill", -9), ("term", chaos.EXIT_PREEMPTED),
        (None, 0)], "\n".join(lines)
    assert result["faults"] == {"kill": 1, "term": 1, "fail_save": 1}
    assert result["restarts"] == 3
    # The failed write's step is never resumed from: the next start goes back before it.
    assert segments[1]["start_step"] < segments[0]["fail_step"]
    # Each start resumes where the checkpoints left it; batches repeat only after a restart.
    assert segments[0]["start_step"] == 0 and segments[-1]["start_step"] > 0
    assert result["batches_taken"] == 24 + result["batches_repeated"]
    assert result["batches_repeated"] > 0
    assert result["state_arrays"] > 10 and result["state_numbers"] > 10_000

    goodput = result["goodput"]
    buckets = goodput["buckets"]
    assert set(buckets) == {"startup", "productive", "evaluation", "checkpoint", "data_wait",
                            "lost", "restart_gap"}
    assert sum(buckets.values()) == pytest.approx(goodput["total_s"], rel=0.01)
    assert buckets["lost"] > 0 and buckets["restart_gap"] > 0
    assert 0 < goodput["fraction"] < 1
    # Every second of the supervisor's wall time is in some segment (up to process teardown).
    assert 0.8 < goodput["wall_ratio"] <= 1.01
    table = result["goodput_table"]
    assert table.splitlines()[0].split() == ["segment", "status", "steps", "startup",
                                             "productive", "eval", "ckpt", "data", "lost", "gap",
                                             "total"]
    assert [line.split()[1] for line in table.splitlines()[1:5]] == [
        "failed", "killed", "preempted", "done"]
    assert table.splitlines()[-2].startswith(f"goodput {100 * goodput['fraction']:.1f}%")


def test_faults_drawn_by_seed():
    kinds = chaos.draw_kinds(20, seed=0)
    assert len(kinds) == 20 and set(kinds) == set(chaos.KINDS)
    assert kinds == chaos.draw_kinds(20, seed=0) != chaos.draw_kinds(20, seed=1)


def test_batch_check_names_a_skipped_a_different_and_a_misplaced_batch():
    ref = [(s, f"{s:064x}") for s in range(8)]
    good = [{"start_step": 0, "batches": ref[:5]}, {"start_step": 4, "batches": ref[4:]}]
    assert chaos.check_batches(ref, good, 8) == {"errors": [], "taken": 9, "repeated": 1}
    skipped = [{"start_step": 0, "batches": ref[:4]}, {"start_step": 5, "batches": ref[5:]}]
    assert chaos.check_batches(ref, skipped, 8)["errors"] == ["steps [4] never took a batch"]
    other = [{"start_step": 0, "batches": ref[:3] + [(3, "f" * 64)] + ref[4:]}]
    assert chaos.check_batches(ref, other, 8)["errors"] == [
        "start 0: batches of steps [3] differ from the reference's"]
    late = [{"start_step": 0, "batches": ref[:4]}, {"start_step": 2, "batches": ref[4:]}]
    assert chaos.check_batches(ref, late, 8)["errors"] == [
        "start 1: batches are not consecutive from step 2: [4, 5, 6, 7]..."]
