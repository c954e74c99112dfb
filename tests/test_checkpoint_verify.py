"""Verified checkpoints: every committed step's manifest, a truncated, bit-flipped or deleted array
file (or a missing manifest) skipped for the previous verified step with one line naming it, the
run ending bitwise equal to an uninterrupted one; checkpoint.on_corrupt=error; `ckpt verify` and
`ckpt list`; a directory written before manifests restored unverified.

One reference run of 6 steps (a checkpoint every 2) in a subprocess; each case damages a copy of
its checkpoints. The resumes run in subprocesses (tests/resume_harness.py, sharing a compilation
cache); the restore decisions and their exact lines are checked in-process on one built model.
"""

import dataclasses
import json
import os
import pathlib
import shutil

import jax
import pytest
from test_checkpoint_resume import (  # noqa: F401  (fixtures: shared, corpus, jax_cache)
    Run,
    RunDir,
    assert_same_state,
    corpus,
    finished,
    jax_cache,
    shared,
)
from util import build_on

from jaxscale import cli
from jaxscale import config as config_lib
from jaxscale.checkpoint import verify
from jaxscale.checkpoint.manager import Checkpointer
from jaxscale.errors import CheckpointError, ConfigError

TINY = ["steps=6", "checkpoint.every=2", "model.num_layers=1", "batch_size=8"]
HASH = verify.DEFAULT_HASH


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, jax_cache) -> RunDir:  # noqa: F811
    """6 steps straight, checkpoints at 2, 4 and 6: what every damaged copy resumes towards."""
    w = tmp_path_factory.mktemp("verify") / "reference"
    run = finished(Run(w, corpus, jax_cache, *TINY))
    assert run.checkpoints() == ["2", "4", "6"]
    return run


def copy_of(reference, tmp_path) -> pathlib.Path:
    """A workdir holding a copy of the reference's checkpoints (to damage); returns it."""
    w = tmp_path / "w"
    shutil.copytree(reference.workdir / "checkpoints", w / "checkpoints")
    return w


def array_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The largest array data file of a step (OCDBT's data files under state/)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def damage(step_dir: pathlib.Path, how: str) -> str:
    """Truncate, flip one byte of, or delete the step's largest array file: the expected
    `file: why` of the verification."""
    victim = array_file(step_dir)
    rel, size = str(victim.relative_to(step_dir)), victim.stat().st_size
    if how == "truncate":
        victim.write_bytes(victim.read_bytes()[: size // 2])
        return f"{rel}: {size // 2} bytes, the manifest says {size}"
    if how == "flip":
        data = bytearray(victim.read_bytes())
        data[size // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        return f"{rel}: contents differ from the manifest ({HASH})"
    victim.unlink()
    return f"{rel}: missing"


def cli_output(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


# -- saving ----------------------------------------------------------------------------------


def test_every_committed_step_has_a_manifest_of_all_its_files(reference):
    for step in (2, 4, 6):
        step_dir = reference.workdir / "checkpoints" / str(step)
        manifest = json.loads((step_dir / verify.MANIFEST).read_text())
        files = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
                       if p.is_file() and p.name != verify.MANIFEST)
        assert sorted(manifest["files"]) == files and len(files) > 10
        assert manifest["hash"] == HASH
        for rel, (size, digest) in manifest["files"].items():
            assert (step_dir / rel).stat().st_size == size
            assert verify.file_digest(str(step_dir / rel), HASH) == digest
        assert not [p for p in step_dir.iterdir() if ".tmp" in p.name]  # written atomically


def test_ckpt_verify_and_list_of_a_sound_run(reference, capsys):
    d = reference.workdir / "checkpoints"
    sizes = {s: verify.step_size(str(d / str(s))) for s in (2, 4, 6)}
    code, out = cli_output(capsys, "ckpt", "verify", str(reference.workdir))
    assert code == 0
    assert out.splitlines() == [f"step {s}: ok ({n} files, {b / 2**20:.1f} MiB)"
                                for s, (n, b) in sizes.items()]
    meta = json.loads((d / "6" / "meta" / "metadata").read_text())
    assert meta["config_hash"] == verify.config_hash(meta["config"])
    code, out = cli_output(capsys, "ckpt", "list", str(d))
    assert code == 0
    header, *rows = out.splitlines()[1:]
    assert out.splitlines()[0] == f"checkpoints in {d}"
    assert header.split() == ["step", "size", "verified", "mesh", "config"]
    assert [r.split() for r in rows] == [
        [str(s), f"{b / 2**20:.1f}", "MiB", "yes", "fsdp=8", meta["config_hash"]]
        for s, (_, b) in sizes.items()]


# -- restoring, end to end -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_a_damaged_latest_step_is_skipped_and_the_run_ends_bitwise_equal(
    how, reference, tmp_path, corpus, jax_cache, capsys  # noqa: F811
):
    w = copy_of(reference, tmp_path)
    d = w / "checkpoints"
    why = damage(d / "6", how)
    code, out = cli_output(capsys, "ckpt", "verify", str(w))
    assert code == cli.EXIT_CHECKPOINT
    ok = [f"step {s}: ok ({n} files, {b / 2**20:.1f} MiB)"
          for s, (n, b) in ((s, verify.step_size(str(d / str(s)))) for s in (2, 4))]
    assert out.splitlines() == [*ok, f"step 6: CORRUPT {why}"]

    run = finished(Run(w, corpus, jax_cache, *TINY))
    lines = run.output.splitlines()
    assert (f"checkpoint: step 6 in {d} is corrupt ({why}); skipping it for the previous "
            "verified step") in lines
    assert "checkpoint: deleted step 6 (the run continues from step 4)" in lines
    assert (f"checkpoint: resumed from step 4 in {d} (skipped corrupt step 6: "
            f"{why.split(':')[0]})") in lines
    assert "Traceback" not in run.output
    assert run.batches() == reference.batches()[4:]
    assert {s: v for s, v in run.losses().items() if s > 4} == {
        s: v for s, v in reference.losses().items() if s > 4}
    assert_same_state(run.state(6), reference.state(6))  # params and optimizer state, bitwise
    assert cli_output(capsys, "ckpt", "verify", str(w))[0] == 0


def test_on_corrupt_error_exits_with_the_checkpoint_code_and_the_line(
    reference, tmp_path, corpus, jax_cache  # noqa: F811
):
    w = copy_of(reference, tmp_path)
    why = damage(w / "checkpoints" / "6", "flip")
    run = Run(w, corpus, jax_cache, *TINY, "checkpoint.on_corrupt=error")
    assert run.wait() == cli.EXIT_CHECKPOINT, run.output[-3000:]
    assert run.output.splitlines()[-1] == (
        f"jaxscale: error: checkpoint step 6 in {w / 'checkpoints'} is corrupt ({why}) "
        "(checkpoint.on_corrupt=error; on_corrupt=skip resumes from the previous verified step)")
    assert "Traceback" not in run.output
    assert sorted(os.listdir(w / "checkpoints")) == ["2", "4", "6"]  # nothing deleted


# -- restore decisions, in-process -----------------------------------------------------------


@pytest.fixture(scope="module")
def built(reference, corpus):  # noqa: F811
    """The reference's model built once in this process (restores need its shapes)."""
    from test_checkpoint_resume import RUN

    return build_on([*RUN, *TINY, f"data.path={corpus}", f"workdir={reference.workdir}"])


def restore(built, workdir, **checkpoint):
    """Restore from workdir's checkpoints: (restored step, the lines logged)."""
    cfg = dataclasses.replace(built.cfg, workdir=str(workdir), checkpoint=dataclasses.replace(
        built.cfg.checkpoint, **checkpoint))
    lines = []
    with Checkpointer(cfg, built.mesh, log=lines.append) as ckpt:
        state, _, data = ckpt.restore_or_init(pytest.fail, built.abstract, built.shardings,
                                              rng=jax.random.key(0))
    assert data["step"] == int(state.step)
    return int(state.step), lines


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_on_corrupt_error_raises_the_line(how, built, reference, tmp_path):
    w = copy_of(reference, tmp_path)
    why = damage(w / "checkpoints" / "6", how)
    with pytest.raises(CheckpointError) as e:
        restore(built, w, on_corrupt="error")
    assert str(e.value) == (
        f"checkpoint step 6 in {w / 'checkpoints'} is corrupt ({why}) (checkpoint.on_corrupt="
        "error; on_corrupt=skip resumes from the previous verified step)")


def test_a_step_committed_without_its_manifest_is_corrupt(built, reference, tmp_path):
    """A kill -9 between orbax's commit and the manifest: that step is not used."""
    w = copy_of(reference, tmp_path)
    d = w / "checkpoints"
    (d / "6" / verify.MANIFEST).unlink()
    step, lines = restore(built, w)
    assert step == 4
    assert lines == [
        f"checkpoint: step 6 in {d} is corrupt ({verify.MANIFEST}: missing (the step committed, "
        "its manifest was never written)); skipping it for the previous verified step",
        "checkpoint: deleted step 6 (the run continues from step 4)",
        f"checkpoint: resumed from step 4 in {d} (skipped corrupt step 6: {verify.MANIFEST})",
    ]


def test_restore_step_that_is_corrupt_falls_back_past_every_bad_step(built, reference, tmp_path):
    w = copy_of(reference, tmp_path)
    d = w / "checkpoints"
    why6, why4 = damage(d / "6", "flip"), damage(d / "4", "truncate")
    step, lines = restore(built, w, restore_step=4)
    assert step == 2
    assert lines == [
        f"checkpoint: step 4 in {d} (checkpoint.restore_step=4) is corrupt ({why4}); skipping "
        "it for the previous verified step",
        "checkpoint: deleted step 4 (the run continues from step 2)",
        "checkpoint: deleted step 6 (the run continues from step 2)",
        f"checkpoint: resumed from step 2 in {d} (skipped corrupt step 4: "
        f"{why4.split(':')[0]})",
    ]
    assert why6  # step 6 was after the asked-for step: never verified, deleted


def test_no_verified_step_raises_the_list(built, reference, tmp_path):
    w = copy_of(reference, tmp_path)
    d = w / "checkpoints"
    whys = {s: damage(d / str(s), how) for s, how in ((2, "delete"), (4, "flip"), (6, "truncate"))}
    with pytest.raises(CheckpointError) as e:
        restore(built, w)
    assert str(e.value) == (
        f"no checkpoint step in {d} verifies: step 6: {whys[6]}; step 4: {whys[4]}; "
        f"step 2: {whys[2]}. Move {d} away to start over")
    assert sorted(os.listdir(d)) == ["2", "4", "6"]


def test_a_directory_without_any_manifest_restores_unverified(built, reference, tmp_path,
                                                              capsys):
    """Checkpoints written before manifests existed: restored, with one line saying so."""
    w = copy_of(reference, tmp_path)
    d = w / "checkpoints"
    for s in (2, 4, 6):
        (d / str(s) / verify.MANIFEST).unlink()
    step, lines = restore(built, w)
    assert step == 6
    assert lines == [
        f"checkpoint: no step in {d} has a manifest (written before checkpoints were verified, "
        "or not on a local path): step 6 is restored unverified",
        f"checkpoint: resumed from step 6 in {d}",
    ]
    code, out = cli_output(capsys, "ckpt", "verify", str(d))
    assert code == cli.EXIT_CHECKPOINT
    assert out.splitlines() == [f"step {s}: unverified (no step in {d} has a manifest)"
                                for s in (2, 4, 6)]
    code, out = cli_output(capsys, "ckpt", "list", str(d))
    assert [r.split()[3] for r in out.splitlines()[2:]] == ["-", "-", "-"]


def test_save_params_writes_a_manifest(tmp_path):
    import numpy as np

    from jaxscale.checkpoint import save_params

    save_params(str(tmp_path / "ckpt"), {"w": np.arange(6.0)}, {"step": 0})
    assert verify.verify_step(str(tmp_path / "ckpt" / "0")) is None
    assert (tmp_path / "ckpt" / "0" / verify.MANIFEST).exists()


def test_bad_on_corrupt_and_ckpt_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        config_lib.load("tiny", ["checkpoint.on_corrupt=skp"])
    assert str(e.value) == ("checkpoint.on_corrupt='skp' is not valid; choose one of: skip, "
                            "error (did you mean 'skip'?)")
    assert cli.main(["ckpt", "verify", str(tmp_path / "nope")]) == cli.EXIT_CHECKPOINT
    assert capsys.readouterr().err == f"jaxscale: error: {tmp_path / 'nope'}: no such directory\n"
    assert cli.main(["ckpt", "list", str(tmp_path)]) == cli.EXIT_CHECKPOINT
    assert capsys.readouterr().err == (f"jaxscale: error: {tmp_path} holds no committed "
                                       "checkpoint step\n")
