"""SIGKILL at many points of an offline merge: the LoRA step survives byte for byte, `merged/` is either absent or
complete and verified, and a rerun succeeds and leaves no leftovers.

Each kill point runs the merge in a subprocess (tests/fault_runner.py) that SIGKILLs itself at the N-th call of one
function. The default run covers every stage; OPENPI_MERGE_ALL_KILL_POINTS=1 adds more calls of each.
"""

from concurrent import futures
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

from helpers import FIXTURE_STEP
from helpers import REPO
from helpers import merge_argv
from helpers import tree_digest
import pytest

from openpi_merge_plugin import cli
from openpi_merge_plugin.checkpoint import output
from openpi_merge_plugin.checks import integrity

FAULT_RUNNER = REPO / "tests" / "fault_runner.py"
ALL = os.environ.get("OPENPI_MERGE_ALL_KILL_POINTS") == "1"

READ = "openpi_merge_plugin.checkpoint.sources:OrbaxSource.read"  # 12 calls: batches of plain leaves, then each weight
MERGE_SLICE = "openpi_merge_plugin.merge.slice_ops:merge_slice"  # 30 calls: 10 weights x 3 layers
WRITE_LEAF = "openpi_merge_plugin.checkpoint.orbax_stream:StreamingArrayHandler._write_leaf"  # 50 calls: every leaf
WRITE_SHARDING = "openpi_merge_plugin.checkpoint.orbax_stream:StreamingArrayHandler._write_sharding"  # 50 calls
RENAME = "os:rename"


@dataclasses.dataclass(frozen=True)
class KillPoint:
    name: str
    target: str
    n: int = 1
    action: str = "kill_before"
    match: str | None = None
    # With an earlier complete `merged/` that this merge replaces (--overwrite).
    overwrite: bool = False
    # With leftovers of an earlier killed merge to clean up.
    leftovers: bool = False
    default: bool = True  # in the default run; the others only with OPENPI_MERGE_ALL_KILL_POINTS=1

    def fault(self) -> dict:
        return {"target": self.target, "n": self.n, "action": self.action, "match": self.match}


KILL_POINTS = [
    # Reading the LoRA step (staging directory just made, nothing written yet).
    KillPoint("read-first", READ, 1),
    KillPoint("read-2", READ, 2, default=False),
    KillPoint("read-6", READ, 6, default=False),
    KillPoint("read-last", READ, 12, default=False),
    # Merging layer slices, with earlier leaves already handed to TensorStore.
    KillPoint("merge-slice-1", MERGE_SLICE, 1, default=False),
    KillPoint("merge-slice-2", MERGE_SLICE, 2, default=False),
    KillPoint("merge-slice-16-after", MERGE_SLICE, 16, "kill_after"),
    KillPoint("merge-slice-30-after", MERGE_SLICE, 30, "kill_after", default=False),
    # Writing leaves into Orbax's temporary directory.
    KillPoint("write-leaf-1", WRITE_LEAF, 1, default=False),
    KillPoint("write-leaf-11", WRITE_LEAF, 11, default=False),
    KillPoint("write-leaf-25-after", WRITE_LEAF, 25, "kill_after"),
    KillPoint("write-leaf-40", WRITE_LEAF, 40, default=False),
    KillPoint("write-leaf-50-after", WRITE_LEAF, 50, "kill_after"),
    KillPoint("write-sharding-1-after", WRITE_SHARDING, 1, "kill_after", default=False),
    KillPoint("write-sharding-50-after", WRITE_SHARDING, 50, "kill_after", default=False),
    # Orbax's own commit: metadata written, its temporary directory renamed to params/.
    KillPoint("orbax-commit-rename", RENAME, 1, match="orbax-checkpoint-tmp"),
    KillPoint("orbax-commit-rename-after", RENAME, 1, "kill_after", match="orbax-checkpoint-tmp", default=False),
    # Copying assets/.
    KillPoint("assets-copy", "shutil:copytree", 1),
    KillPoint("assets-copy-after", "shutil:copytree", 1, "kill_after", default=False),
    # The manifest: checksums, the file itself (killed half-written), fsync.
    KillPoint("checksums", "openpi_merge_plugin.checkpoint.output:file_checksums", 1, default=False),
    KillPoint("checksums-after", "openpi_merge_plugin.checkpoint.output:file_checksums", 1, "kill_after"),
    KillPoint("manifest-half-written", "pathlib:Path.write_text", 1, "kill_half_write", match="manifest.json"),
    KillPoint("manifest-after", "openpi_merge_plugin.checkpoint.output:write_manifest", 1, "kill_after", default=False),
    KillPoint("fsync", "openpi_merge_plugin.checkpoint.output:_fsync_tree", 1, default=False),
    KillPoint("fsync-after", "openpi_merge_plugin.checkpoint.output:_fsync_tree", 1, "kill_after"),
    # The commit: one rename of the staging directory to merged/.
    KillPoint("commit-rename", RENAME, 2, match=".merged.tmp-"),
    KillPoint("commit-rename-after", RENAME, 2, "kill_after", match=".merged.tmp-"),
    # --overwrite: old merged/ moved aside, new one renamed in, old one removed.
    KillPoint("overwrite-move-old", RENAME, 1, match="/merged", overwrite=True, default=False),
    KillPoint("overwrite-move-old-after", RENAME, 1, "kill_after", match="/merged", overwrite=True),
    KillPoint("overwrite-commit-after", RENAME, 2, "kill_after", match=".merged.tmp-", overwrite=True, default=False),
    KillPoint("overwrite-remove-old", "shutil:rmtree", 1, match=".merged.tmp-old-", overwrite=True),
    # Cleaning up the leftovers of an earlier killed merge, halfway through.
    KillPoint("cleanup-of-leftovers", "os:unlink", 1, match="junk-1", leftovers=True),
]
SELECTED = [k for k in KILL_POINTS if ALL or k.default]


def _lora_files(step) -> dict[str, str]:
    """Digest of the LoRA step itself: everything but merged/ and the merge's temporary siblings of it."""
    return {p: d for p, d in tree_digest(step).items() if not p.split("/")[0].startswith(("merged", ".merged"))}


@pytest.fixture(scope="module")
def killed(merge_env, tmp_path_factory) -> dict[str, tuple]:
    """Runs every selected kill point, two at a time; name -> (step dir, return code, stderr)."""
    reference = tmp_path_factory.mktemp("reference") / "2"
    shutil.copytree(FIXTURE_STEP, reference)
    assert cli.main([*merge_argv(reference), "--no-progress"]) == 0

    def run(point: KillPoint):
        step = tmp_path_factory.mktemp(point.name) / "2"
        shutil.copytree(FIXTURE_STEP, step)
        argv = [*merge_argv(step), "--no-progress"]
        if point.overwrite:
            shutil.copytree(reference / "merged", step / "merged")
            argv.append("--overwrite")
        if point.leftovers:
            stale = step / ".merged.tmp-0123456789ab"
            stale.mkdir()
            for i in range(3):
                (stale / f"junk-{i}").write_bytes(b"x" * 1000)
        cmd = [sys.executable, str(FAULT_RUNNER), json.dumps([point.fault()]), *argv]
        proc = subprocess.run(cmd, env=merge_env, capture_output=True, text=True, check=False, timeout=600)
        return point.name, (step, proc.returncode, proc.stderr)

    with futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(pool.map(run, SELECTED))


@pytest.mark.parametrize("point", SELECTED, ids=lambda k: k.name)
def test_sigkill_leaves_the_lora_step_intact_and_merged_absent_or_complete(killed, point, capsys):
    step, code, stderr = killed[point.name]
    assert code == -signal.SIGKILL, f"the kill point was not reached (exit code {code}):\n{stderr}"
    original = tree_digest(FIXTURE_STEP)
    assert _lora_files(step) == original

    merged = step / "merged"
    if merged.exists():
        result = integrity.verify_merged(merged)
        assert result.ok, result.problems
    else:
        assert not [p for p in step.iterdir() if p.name == "merged"]

    # The user's next move: run the same merge again (--overwrite if a complete merged/ is there).
    argv = [*merge_argv(step), "--no-progress"]
    assert cli.main(argv + (["--overwrite"] if merged.exists() else [])) == 0, capsys.readouterr().err
    assert integrity.verify_merged(merged).ok
    assert not output.leftovers(merged)
    assert {p: d for p, d in tree_digest(step).items() if not p.startswith("merged/")} == original
