"""Every supported launcher starts a 2-rank job (docs/launching.md's command lines).

``test_launcher_joins`` runs tools/check_launch.py (a gloo all-reduce) so a launcher problem shows
up apart from trainer problems; ``test_launcher_trains`` runs pretrain_glm.py a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch.launchers import LAUNCHERS, REPO_ROOT, describe, launcher_commands, run_launcher

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_joins(launcher: str, tmp_path: Path) -> None:
    out = tmp_path / "ranks"
    commands = launcher_commands(
        launcher, REPO_ROOT / "tools" / "check_launch.py", ["--json-out", str(out)], tmp_path
    )
    runs = run_launcher(commands, tmp_path, timeout=90)
    assert all(run.returncode == 0 and not run.killed for run in runs), describe(runs)
    records = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    num_nodes, ranks_per_node = LAUNCHERS[launcher]
    for rank, record in enumerate(records):
        assert record["rank"] == rank and record["world_size"] == 2, record
        assert record["local_world_size"] == ranks_per_node, record
        assert record["all_reduce"] == 3.0 and record["ok"], record
    # Two "nodes" on one host: each rank is local rank 0 of its node.
    assert [r["local_rank"] for r in records] == ([0, 1] if num_nodes == 1 else [0, 0])
    assert records[0]["launcher"] == ("openmpi" if launcher == "mpirun" else "env")


TRAIN_ITERS = 4
MICRO_BATCH = 2  # tiny_corpus's DeepSpeed JSON


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def losses_by_launcher() -> dict[str, list[float]]:
    """Filled as the trainer tests run: every launcher must give the same losses."""
    return {}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_trains(
    launcher: str, tmp_path: Path, tiny_corpus, losses_by_launcher: dict[str, list[float]]
) -> None:
    args = tiny_corpus.trainer_args(tmp_path, train_iters=TRAIN_ITERS)
    if launcher == "torchrun-2node":
        args += [
            "--save",
            str(tmp_path / "checkpoints"),
        ]  # ranks on two "nodes" write one checkpoint
    probe_dir = tmp_path / "probe"
    env = {
        "MEGATRON_GLM_HOOKS": "tests.launch.rank_probe:register",
        "GLM_RANK_PROBE_DIR": str(probe_dir),
    }
    commands = launcher_commands(
        launcher, REPO_ROOT / "pretrain_glm.py", args, tmp_path, forward_env=tuple(env)
    )
    runs = run_launcher(commands, tmp_path, timeout=150, env=env)
    assert all(run.returncode == 0 and not run.killed for run in runs), describe(runs)

    # Rank 0's --log-json: every step, finite losses, samples consumed by 2 data-parallel ranks.
    train = [r for r in _read_jsonl(tmp_path / "log.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, TRAIN_ITERS + 1)), describe(runs)
    assert all(isinstance(r["loss"], float) and 0 < r["loss"] < 20 for r in train), train
    assert [r["consumed_samples"] for r in train] == [
        step * MICRO_BATCH * 2 for step in range(1, TRAIN_ITERS + 1)
    ]

    # Every rank trained every step in a world of 2 and saw the same (all-reduced) loss.
    num_nodes, ranks_per_node = LAUNCHERS[launcher]
    per_rank = [_read_jsonl(probe_dir / f"rank{rank}.jsonl") for rank in range(2)]
    for rank, records in enumerate(per_rank):
        assert [r["step"] for r in records] == list(range(1, TRAIN_ITERS + 1)), records
        assert {(r["rank"], r["world_size"], r["env_world_size"]) for r in records} == {
            (rank, 2, 2)
        }
        assert {r["local_rank"] for r in records} == {rank % ranks_per_node}
    assert [r["loss"] for r in per_rank[0]] == [r["loss"] for r in per_rank[1]]
    assert [r["loss"] for r in per_rank[0]] == [r["loss"] for r in train]

    if launcher == "torchrun-2node":
        assert (
            tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt"
        ).read_text().strip() == str(TRAIN_ITERS)

    # Same seed, same 2-rank layout: the launcher must not change the numbers.
    losses = [r["loss"] for r in train]
    for other, other_losses in losses_by_launcher.items():
        assert losses == pytest.approx(other_losses, rel=1e-6, abs=0), (launcher, other)
    losses_by_launcher[launcher] = losses
