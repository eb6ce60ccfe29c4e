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
PEFT = ["--format", "lerobot-peft", "--base", "lerobot/pi0_base"]


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


# --- Issue 29: ownership by proof, and no write inside any checkpoint step -------------------------------------------
# Each case: one `error:` line before any work, every file under the test's directory hashing as before (`_refused`).

PLOT = [*LORA, "--plot"]


def _sealed_pictures_are_valid(data: bytes) -> None:
    """A sealed PNG is still a valid PNG: every chunk's CRC matches (the text chunk's was recomputed)."""
    import struct
    import zlib

    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        body = data[pos + 4 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(body), body[:4]
        pos += 12 + length


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
def test_a_picture_is_replaced_only_with_overwrite_and_only_if_drawn_here_unchanged(world, capsys, suffix):
    picture = f"fig{suffix}"
    assert cli.main(["inspect", "run/2", *PLOT, picture, "--no-progress"]) == 0
    capsys.readouterr()
    _refused(capsys, world, ["inspect", "run/2", *PLOT, picture], "already exists (pass --overwrite to replace")
    assert cli.main(["inspect", "run/2", *PLOT, picture, "--overwrite", "--no-progress"]) == 0
    from openpi_merge_plugin.cli import plot_mark

    drawn = (world / picture).read_bytes()
    assert plot_mark.drawn_here(drawn)
    if suffix == ".png":
        _sealed_pictures_are_valid(drawn)
    # Edited after drawing (one byte of the picture, not of the mark): the user's now.
    data = bytearray((world / picture).read_bytes())
    data[len(data) // 2] ^= 0x01
    (world / picture).write_bytes(bytes(data))
    capsys.readouterr()
    _refused(
        capsys,
        world,
        ["inspect", "run/2", *PLOT, picture, "--overwrite"],
        f"--plot {world / picture} already exists and is not a picture drawn by openpi-merge-lora inspect, unchanged "
        "since (its recorded sha256 does not match): choose a new file name",
    )


@pytest.mark.parametrize(
    "content",
    [
        b"<svg><!-- openpi-merge-lora inspect --></svg>",  # the words, as the old check looked for them
        b"<svg>openpi-merge-lora inspect sha256:" + b"0" * 64 + b"</svg>",  # the mark with a made-up digest
        b"<svg>openpi-merge-lora inspect sha256:" + b"ab" * 32 + b"</svg>",
    ],
)
def test_a_users_picture_that_merely_mentions_the_command_is_not_replaced(world, capsys, content):
    (world / "user.svg").write_bytes(content)
    _refused(capsys, world, ["inspect", "run/2", *PLOT, "user.svg", "--overwrite"], "is not a picture drawn by")


@pytest.mark.parametrize(
    "edit",
    ["assets/fixture_robot/norm_stats.json", "params/_METADATA"],
)
def test_overwrite_refuses_an_earlier_output_whose_files_were_edited(world, capsys, edit):
    path = world / "run" / "2" / "merged" / edit
    same_size = bytearray(path.read_bytes())
    same_size[-2] ^= 0x01  # an edit that keeps the size: only the sha256 tells
    path.write_bytes(bytes(same_size))
    _refused(
        capsys,
        world,
        ["run/2", *LORA, "--overwrite"],
        f"is an output of openpi-merge-lora whose file {edit} was changed since it was written (its sha256 differs",
    )
    path.write_bytes(bytes(same_size) + b" ")
    _refused(capsys, world, ["run/2", *LORA, "--overwrite"], f"whose file {edit} was changed since it was written (")


def test_overwrite_refuses_an_edited_lerobot_config(world, capsys):
    lerobot = [*EXPORT, "--format", "lerobot", "--no-progress"]
    assert cli.main(["export", "run/2/merged", *lerobot]) == 0
    config = world / "run" / "2" / "merged_lerobot" / "config.json"
    config.write_text(config.read_text().replace('"n_action_steps": 50', '"n_action_steps": 10'))
    capsys.readouterr()
    _refused(
        capsys,
        world,
        ["export", "run/2/merged", *EXPORT, "--format", "lerobot", "--overwrite"],
        "whose file config.json was changed since it was written",
    )


def _forge_manifest(root: pathlib.Path) -> None:
    """A manifest.json of this tool listing every file under `root` with its true size and sha256."""
    import hashlib
    import json

    files = {
        p.relative_to(root).as_posix(): {
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            "bytes": p.stat().st_size,
        }
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    manifest = {"format_version": 1, "plugin": "openpi-merge-plugin", "files": files}
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_a_lora_step_carrying_a_forged_manifest_is_never_replaced(world, capsys):
    step = world / "run" / "1"
    _forge_manifest(step)
    _refused(
        capsys,
        world,
        ["run/2", *LORA, "--output", "run/1", "--overwrite"],
        f"--output {step} is an openpi checkpoint step (it has _CHECKPOINT_METADATA and train_state and a "
        "manifest.json), never an output of openpi-merge-lora",
    )
    # Without Orbax's step markers, the LoRA leaves in its params still tell.
    shutil.copytree(step / "params", world / "bare" / "params")
    _forge_manifest(world / "bare")
    _refused(
        capsys,
        world,
        ["run/2", *LORA, "--output", "bare", "--overwrite"],
        "holds a LoRA checkpoint's params (lora_a/lora_b leaves), never an output of openpi-merge-lora",
    )


def test_an_output_holding_a_link_is_not_replaced(world, capsys):
    (world / "run" / "2" / "merged" / "notes").symlink_to(world / "mywork" / "notes.txt")
    _refused(capsys, world, ["run/2", *LORA, "--overwrite"], "also holds links or special files (notes)")


def test_a_failed_merge_on_save_is_replaced_but_not_a_file_that_looks_like_its_record(world, capsys):
    import json

    failed = world / "failed"
    failed.mkdir()
    record = {"step": 2, "error": "VerificationError: ...", "traceback": "...", "created_utc": "2025-01-01T00:00:00"}
    (failed / "MERGE_FAILED.json").write_text(json.dumps(record))
    assert cli.main(["run/2", *LORA, "--output", "failed", "--overwrite", "--no-progress"]) == 0
    assert (failed / "manifest.json").is_file()
    (world / "mine").mkdir()
    (world / "mine" / "MERGE_FAILED.json").write_text(json.dumps({"my": "notes"}))
    capsys.readouterr()
    _refused(capsys, world, ["run/2", *LORA, "--output", "mine", "--overwrite"], "is not the record of a failed merge")


@pytest.fixture
def linked_step(world) -> pathlib.Path:
    """run/3: a LoRA step whose params/ is a symlink to `real_params/` beside the runs (as on a cluster)."""
    step = world / "run" / "3"
    shutil.copytree(FIXTURE_STEP, step)
    (step / "params").rename(world / "real_params")
    (step / "params").symlink_to(world / "real_params")
    return step


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run/3", *LORA, "--output", "run/3/params/evil"], "--output {world}/run/3/params/evil lies inside the LoRA"),
        (["export", "run/3", *LORA, *EXPORT, "--output", "run/3/params/evil"], "lies inside the LoRA step"),
        (["export", "run/3", *LORA, *EXPORT, "--format", "lerobot", "--output", "run/3/params/e"], "lies inside the"),
        (["inspect", "run/3", *PLOT, "run/3/params/p.png"], "--plot {world}/run/3/params/p.png lies inside the"),
        (["inspect", "run/2", *PLOT, "run/3/params/p.png"], "lies inside the Orbax checkpoint {world}/run/3/params"),
        (["run/2", *LORA, "--output", "real_params/evil"], "lies inside the Orbax checkpoint {world}/real_params"),
        (["run/2", *LORA, "--output", "run/3/assets/x"], "lies inside the openpi checkpoint step {world}/run/3"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_nothing_is_written_into_a_step_through_a_symlinked_params(linked_step, world, capsys, argv, message):
    _refused(capsys, world, argv, message.format(world=world))


def test_a_link_into_a_step_from_elsewhere_is_judged_where_it_leads(linked_step, world, capsys):
    (world / "shortcut").symlink_to(world / "run" / "1")
    _refused(capsys, world, ["run/2", *LORA, "--output", "shortcut/x"], "lies inside the openpi checkpoint step")
    _refused(capsys, world, ["run/2", *LORA, "--output", "shortcut/params/x"], "lies inside the Orbax checkpoint")
    _refused(capsys, world, ["inspect", "run/2", *PLOT, "shortcut/p.png"], "lies inside the openpi checkpoint step")
    # `..` after a link: by name it is <dir>/x, on the filesystem run/1/x; judged both ways.
    (world / "p1").symlink_to(world / "run" / "1" / "params")
    _refused(
        capsys,
        world,
        ["run/2", *LORA, "--output", "p1/../x"],
        f"--output {world}/x (resolved: {world}/run/1/x) lies inside the openpi checkpoint step {world}/run/1",
    )


@pytest.mark.parametrize("target", [".", "..", "../.."])
def test_an_assets_link_into_its_own_copy_is_refused_before_any_work(world, capsys, target):
    step = world / "run" / "1"
    shutil.rmtree(step / "assets")
    (step / "assets").symlink_to(target)
    for argv in (["run/1", *LORA], ["run/1", *LORA, "--output", "out"], ["export", "run/1", *LORA, *EXPORT]):
        before = tree_digest(world)
        code = cli.main([*argv, "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1
        assert len(err) == 1
        assert len(err[0]) < 400, len(err[0])  # not 1.45 MB of "File name too long" paths
        assert err[0].startswith(f"error: cannot copy {step / 'assets'}: "), err[0]
        assert err[0].endswith(("(a link into its own copy): point it at the files themselves", "(a loop)")), err[0]
        assert tree_digest(world) == before
        _no_debris(world)


SIBLING_AND_SLOT_REFUSED = [
    (["run/2", *LORA, "--output", "run/1/params/merged"], "lies inside the Orbax checkpoint {world}/run/1/params"),
    (["run/2", *LORA, "--output", "run/1/assets/x"], "lies inside the openpi checkpoint step {world}/run/1, which"),
    (["run/2", *LORA, "--output", "run/1/x"], "lies inside the openpi checkpoint step {world}/run/1, which"),
    (["inspect", "run/2/merged", "--plot", "run/2/x.png"], "--plot {world}/run/2/x.png lies inside the openpi"),
    (["inspect", "run/2", *PLOT, "run/1/x.png"], "--plot {world}/run/1/x.png lies inside the openpi checkpoint step"),
    (["inspect", "run/2", *PLOT, "run/2/merged/x.png"], "lies inside the inspected run/2"),
    # Step 1's slot never holds step 2's weights.
    (
        ["run/2", *LORA, "--output", "run/1/merged"],
        (
            "--output {world}/run/1/merged is the slot of step {world}/run/1 for its own merged Orbax checkpoint, and "
            "this command writes the merged Orbax checkpoint of step {world}/run/2: choose a directory outside any "
            "checkpoint step (or {world}/run/2/merged)"
        ),
    ),
    (["export", "run/2", *LORA, *EXPORT, "--output", "run/1/merged_pytorch"], "is the slot of step {world}/run/1"),
    (["export", "run/2/merged", *EXPORT, "--output", "run/1/merged_pytorch"], "is the slot of step {world}/run/1"),
    # A slot holds its own kind of output only.
    (
        ["export", "run/2", *LORA, *EXPORT, "--output", "run/2/merged", "--overwrite"],
        (
            "--output {world}/run/2/merged is the slot of step {world}/run/2 for its merged Orbax checkpoint, not for a "
            "PyTorch export: choose {world}/run/2/merged_pytorch or a directory outside the step"
        ),
    ),
    (
        ["export", "run/2", *LORA, *EXPORT, "--format", "lerobot", "--output", "run/2/merged", "--overwrite"],
        "is the slot of step {world}/run/2 for its merged Orbax checkpoint, not for a LeRobot export",
    ),
    (["export", "run/2/merged", *EXPORT, "--output", "run/2/merged_lerobot"], "for its LeRobot export, not for a Py"),
    (["run/2", *LORA, "--output", "run/2/merged_pytorch"], "for its PyTorch export, not for a merged Orbax checkpoint"),
    # The adapter's slot (issue 32): the LoRA step's own adapter only.
    (["run/2", *LORA, "--output", "run/2/lerobot_peft"], "for its LeRobot PEFT adapter, not for a merged Orbax"),
    (
        ["export", "run/2", *LORA, *EXPORT, "--format", "lerobot", "--output", "run/2/lerobot_peft"],
        "for its LeRobot PEFT adapter, not for a LeRobot export: choose {world}/run/2/merged_lerobot",
    ),
    (
        ["export", "run/2", *LORA, *EXPORT, *PEFT, "--output", "run/2/merged_lerobot"],
        "for its LeRobot export, not for a LeRobot PEFT adapter: choose {world}/run/2/lerobot_peft",
    ),
    (["export", "run/2", *LORA, *EXPORT, *PEFT, "--output", "run/1/lerobot_peft"], "is the slot of step {world}/run/1"),
    (["export", "run/2", *LORA, *EXPORT, *PEFT, "--output", "run/2/params/x"], "lies inside the LoRA step"),
    (["export", "run/2/merged", *EXPORT, "--output", "run/2/lerobot_peft"], "for its LeRobot PEFT adapter, not for"),
]


@pytest.mark.parametrize(
    ("argv", "message"), SIBLING_AND_SLOT_REFUSED, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_no_write_into_a_sibling_step_and_each_slot_for_its_own_kind_and_step(world, capsys, argv, message):
    _refused(capsys, world, argv, message.format(world=world))


def test_step_1s_slot_is_refused_even_when_it_holds_an_earlier_output(world, capsys):
    assert cli.main(["run/1", *LORA, "--no-progress"]) == 0
    capsys.readouterr()
    _refused(capsys, world, ["run/2", *LORA, "--output", "run/1/merged", "--overwrite"], "is the slot of step")
    # Step 2's export into step 2's own slot, through a link to the step: allowed.
    (world / "step2").symlink_to(world / "run" / "2")
    assert cli.main(["export", "run/2/merged", *EXPORT, "--output", "step2/merged_pytorch", "--no-progress"]) == 0
    assert (world / "run" / "2" / "merged_pytorch" / "model.safetensors").is_file()


def test_output_under_a_file_says_the_file_is_not_a_directory(world, capsys):
    _refused(
        capsys,
        world,
        ["run/2", *LORA, "--output", "some_file/x"],
        f"error: cannot write {world}/some_file/x: {world}/some_file is a file, not a directory",
    )
    _refused(capsys, world, ["run/2", *LORA, "--output", "some_file/x/y"], f"{world}/some_file is a file, not a dir")


def test_overwrite_of_a_huge_foreign_directory_is_refused_without_walking_it(world, capsys, monkeypatch):
    """`--output '~'`: refused after looking at a bounded number of files (it walked 238,566 for 20 s)."""
    home = world / "home"
    for i in range(30):
        (home / f"d{i:02d}").mkdir(parents=True)
        for j in range(100):
            (home / f"d{i:02d}" / f"f{j:03d}").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    before = tree_digest(world)
    seen = []
    with monkeypatch.context() as patched:
        scandir = os.scandir
        patched.setattr(os, "scandir", lambda path: seen.append(path) or scandir(path))
        code = cli.main(["run/2", *LORA, "--output", "~", "--overwrite", "--no-progress"])
    assert code == 1
    assert capsys.readouterr().err.startswith(
        f"error: --output {home} holds more than 1,000 files (d00/f000, d00/f001, d00/f002, ...) and no manifest"
    )
    assert len([p for p in seen if pathlib.Path(p).is_relative_to(home)]) <= 15  # not all 31 directories
    assert tree_digest(world) == before


def test_a_name_of_255_bytes_is_written_and_replaced(world, capsys):
    name = "n" * 245
    for _ in range(2):
        assert cli.main(["run/2", *LORA, "--output", name, "--overwrite", "--no-progress"]) == 0
    assert (world / name / "manifest.json").is_file()
    _no_debris(world)
    capsys.readouterr()
    _refused(capsys, world, ["run/2", *LORA, "--output", "m" * 256], "is 256 bytes long, and filesystems allow 255")
    _refused(capsys, world, ["inspect", "run/2", *PLOT, "p" * 252 + ".png"], "is 256 bytes long")
