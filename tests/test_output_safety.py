"""The user's data is never modified: what `--output` (with or without `--overwrite`) may and may not replace.

Every refused command must fail with one `error:` line before any work, and leave every file under the test's
directory (the LoRA step, its sibling step, the user's files) hashing as before, with nothing new written.
"""

import errno
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

from helpers import FIXTURE_LORA_CONFIG
from helpers import FIXTURE_STEP
from helpers import REPO
from helpers import tree_digest
import pytest

from openpi_merge_plugin import cli
from openpi_merge_plugin.checkpoint import output
from openpi_merge_plugin.errors import MergeError

LORA = ["--lora-config", str(FIXTURE_LORA_CONFIG)]
EXPORT = ["--action-horizon", "50", "--allow-nonstandard-dims"]


@pytest.fixture(scope="module")
def merged_example(tmp_path_factory) -> pathlib.Path:
    """A LoRA step with its merged output, made once; tests copy it."""
    step = tmp_path_factory.mktemp("merged-example") / "run" / "2"
    shutil.copytree(FIXTURE_STEP, step)
    assert cli.main([str(step), *LORA, "--no-progress"]) == 0
    return step


@pytest.fixture
def world(tmp_path, merged_example, monkeypatch) -> pathlib.Path:
    """tmp_path/: run/2 (the LoRA step, merged), run/1 (a sibling step), mywork/notes.txt, some_file, empty/."""
    shutil.copytree(merged_example, tmp_path / "run" / "2")
    shutil.copytree(FIXTURE_STEP, tmp_path / "run" / "1")
    (tmp_path / "mywork").mkdir()
    (tmp_path / "mywork" / "notes.txt").write_text("three days of notes\n")
    (tmp_path / "some_file").write_text("keep me\n")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)  # relative spellings below are relative to it
    return tmp_path


def _refused(capsys, world: pathlib.Path, argv: list[str], message: str) -> None:
    before = tree_digest(world)
    names = sorted(p.relative_to(world).as_posix() for p in world.rglob("*"))
    code = cli.main([*argv, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    assert message in err[0], err[0]
    assert tree_digest(world) == before
    assert sorted(p.relative_to(world).as_posix() for p in world.rglob("*")) == names


def _no_debris(root: pathlib.Path) -> None:
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]


MERGE_REFUSED = [
    (["--output", "run/2", "--overwrite"], "is the LoRA step itself"),
    (["--output", "run/2/", "--overwrite"], "is the LoRA step itself"),
    (["--output", "run/2/../2/./", "--overwrite"], "is the LoRA step itself"),
    (["--output", "run", "--overwrite"], "contains the LoRA step"),
    (["--output", ".", "--overwrite"], "contains the LoRA step"),
    (["--output", "run/2/params/merged"], "lies inside the LoRA step"),
    (["--output", "run/2/train_state", "--overwrite"], "lies inside the LoRA step"),
    (["--output", "run/2/assets/x"], "lies inside the LoRA step"),
    (["--output", "mywork", "--overwrite"], "holds 1 file (notes.txt) and no manifest of openpi-merge-lora"),
    (["--output", "mywork"], "already exists (pass --overwrite to replace it)"),
    (["--output", "some_file", "--overwrite"], "is a file, not a directory"),
    (["--output", "run/1", "--overwrite"], "is an openpi checkpoint step"),
    (["--output", "run/7"], "would look like step 7 of the training run"),
]


@pytest.mark.parametrize(("flags", "message"), MERGE_REFUSED, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_merge_refuses_outputs_that_would_touch_user_data(world, capsys, flags, message):
    _refused(capsys, world, ["run/2", *LORA, *flags], message)


def test_merge_refuses_a_directory_of_runs(world, capsys):
    shutil.copytree(world / "run", world / "runs" / "a")
    _refused(capsys, world, ["run/2", *LORA, "--output", "runs/a", "--overwrite"], "is a training run's checkpoint")


def test_symlinked_spellings_of_the_step_are_refused(world, capsys):
    (world / "link_to_step").symlink_to(world / "run" / "2")
    (world / "link_to_run").symlink_to(world / "run")
    _refused(capsys, world, ["run/2", *LORA, "--output", "link_to_run/2/params/m"], "lies inside the LoRA step")
    _refused(capsys, world, ["run/2", *LORA, "--output", "link_to_step", "--overwrite"], "is a symbolic link")
    _refused(capsys, world, ["link_to_step", *LORA, "--output", "run", "--overwrite"], "contains the LoRA step")


def test_an_earlier_output_with_foreign_files_is_not_replaced(world, capsys):
    (world / "run" / "2" / "merged" / "my_eval.csv").write_text("step,score\n")
    _refused(capsys, world, ["run/2", *LORA, "--overwrite"], "also holds files its manifest does not list (my_eval")


EXPORT_REFUSED = [
    (["run/2/merged", "--output", "run/2/merged", "--overwrite"], "is the merged checkpoint itself"),
    (["run/2/merged", "--output", "run/2", "--overwrite"], "contains the merged checkpoint"),
    (["run/2/merged", "--output", "run/2/merged/pt"], "lies inside the merged checkpoint"),
    (["run/2/merged", "--output", "run", "--overwrite"], "contains the merged checkpoint"),
    (["run/2", *LORA, "--output", "run/2", "--overwrite"], "is the LoRA step itself"),
    (["run/2", *LORA, "--output", "run/2/params/pt"], "lies inside the LoRA step"),
    (["run/2/merged", "--output", "mywork", "--overwrite"], "holds 1 file (notes.txt)"),
    (["run/2/merged", "--output", "some_file", "--overwrite"], "is a file, not a directory"),
]


@pytest.mark.parametrize("fmt", ["pytorch", "lerobot"])
@pytest.mark.parametrize(("argv", "message"), EXPORT_REFUSED, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_export_refuses_outputs_that_would_touch_user_data(world, capsys, argv, message, fmt):
    _refused(capsys, world, ["export", *argv, *EXPORT, "--format", fmt], message)


def test_lerobot_export_lands_in_the_step_or_beside_a_merge_and_replaces_only_its_own_output(world, capsys):
    step = world / "run" / "2"
    lora_step = {p: d for p, d in tree_digest(step).items() if not p.startswith("merged")}
    lerobot = [*EXPORT, "--format", "lerobot", "--no-progress"]
    assert cli.main(["export", "run/2/merged", *lerobot]) == 0
    assert (step / "merged_lerobot" / "model.safetensors").is_file()
    _refused(capsys, world, ["export", "run/2/merged", *EXPORT, "--format", "lerobot"], "already exists")
    assert cli.main(["export", "run/2", *LORA, *lerobot, "--overwrite"]) == 0
    assert cli.main(["export", "run/2/merged", *EXPORT, "--no-progress"]) == 0  # the PyTorch export beside it
    _refused(
        capsys,
        world,
        ["export", "run/2/merged", *EXPORT, "--format", "lerobot", "--output", "mywork", "--overwrite"],
        "holds 1 file (notes.txt)",
    )
    assert {p: d for p, d in tree_digest(step).items() if not p.startswith("merged")} == lora_step
    assert cli.main(["run/2", *LORA, "--output", "serving", "--no-progress"]) == 0
    assert cli.main(["export", "serving", *lerobot]) == 0
    assert (world / "serving_lerobot" / "config.json").is_file()
    assert (world / "mywork" / "notes.txt").read_text() == "three days of notes\n"
    _no_debris(world)
    capsys.readouterr()


def test_export_of_a_merge_elsewhere_protects_the_step_its_manifest_names(world, capsys):
    assert cli.main(["run/2", *LORA, "--output", "elsewhere", "--no-progress"]) == 0
    _refused(
        capsys,
        world,
        ["export", "elsewhere", "--output", "run/2", "--overwrite", *EXPORT],
        "is the LoRA step of this merge itself",
    )


def test_overwrite_replaces_an_earlier_output_or_an_empty_directory_and_leaves_no_debris(world, capsys):
    step = world / "run" / "2"
    lora_step = {p: d for p, d in tree_digest(step).items() if not p.startswith("merged")}
    assert cli.main(["run/2", *LORA, "--overwrite", "--no-progress"]) == 0
    assert cli.main(["run/2", *LORA, "--output", "empty", "--overwrite", "--no-progress"]) == 0
    assert (world / "empty" / "manifest.json").is_file()
    assert cli.main(["export", "run/2/merged", *EXPORT, "--no-progress"]) == 0
    assert cli.main(["export", "run/2/merged", *EXPORT, "--overwrite", "--no-progress"]) == 0
    assert cli.main(["export", "run/2", *LORA, *EXPORT, "--overwrite", "--no-progress"]) == 0
    assert (step / "merged_pytorch" / "model.safetensors").is_file()
    assert {p: d for p, d in tree_digest(step).items() if not p.startswith("merged")} == lora_step
    assert (world / "mywork" / "notes.txt").read_text() == "three days of notes\n"
    _no_debris(world)
    capsys.readouterr()


def test_export_of_a_merge_outside_a_step_lands_beside_it(world, capsys):
    assert cli.main(["run/2", *LORA, "--output", "serving", "--no-progress"]) == 0
    assert cli.main(["export", "serving", *EXPORT, "--no-progress"]) == 0
    assert (world / "serving_pytorch" / "model.safetensors").is_file()
    _no_debris(world)
    capsys.readouterr()


def test_a_failed_commit_leaves_the_earlier_output_as_it_was(world, monkeypatch):
    out = world / "run" / "2" / "merged"
    before = tree_digest(out)
    rename = pathlib.Path.rename

    def busy_when_renaming_in(self, target):
        if pathlib.Path(target) == out and ".tmp-old-" not in self.name:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(target))
        return rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", busy_when_renaming_in)
    busy = r"cannot commit .*: Device or resource busy \(EBUSY\); the earlier output is left as it was"
    with pytest.raises(MergeError, match=busy), output.staged_directory(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert tree_digest(out) == before
    _no_debris(world)


def test_a_mount_point_is_refused_before_any_work(world):
    mount = world / "mnt"
    mount.mkdir()
    cmd = [sys.executable, "-m", "openpi_merge_plugin.cli", "run/2", *LORA, "--output", str(mount), "--overwrite"]
    script = f"mount -t tmpfs tmpfs {mount} && exec {shlex.join([*cmd, '--no-progress'])}"
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], check=False).returncode:
        pytest.skip("cannot make a mount point here (no mount namespace)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], cwd=world, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --output {mount} is a mount point, which cannot be replaced by a rename; --overwrite replaces only "
        "an unchanged earlier output of openpi-merge-lora or an empty directory: choose another --output"
    )
    _no_debris(world)


def test_an_export_the_runtime_cannot_load_is_refused_before_the_merge(world, capsys):
    _refused(
        capsys,
        world,
        ["export", "run/2", *LORA, "--action-horizon", "50", "--output", "pt"],
        "hard-codes dimensions this model does not have: siglip_width 32 (PI0Pytorch: 1152), ",
    )


def test_merge_on_save_cleans_only_its_own_staging_directories(tmp_path):
    from openpi_merge_plugin.openpi_glue import merged_item

    ours = tmp_path / ".merged-5.tmp-0123456789ab"
    ours.mkdir()
    (ours / "params").mkdir()
    theirs = [tmp_path / ".merged-5.tmp-my-notes", tmp_path / ".merged-x.tmp-0123456789ab"]
    theirs[0].mkdir()
    theirs[1].write_text("a user's file")
    merged_item.remove_stale_staging(tmp_path)
    assert not ours.exists()
    assert all(p.exists() for p in theirs)
