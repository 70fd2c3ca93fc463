"""The launch recipes, run for real on CPU ranks (gloo) with DeepSpeed 0.19.8's launcher:

- `deepspeed --num_gpus 2 --module vlm_dist.train` (the README's command) trains on two CPU ranks;
- `launch/no_ssh_node.sh` run twice (NODE_RANK 0 and 1, two hostfile "nodes" on loopback) trains
  with world size 2, and gives the same losses;
- `launch/slurm.sbatch` under a fake srun/scontrol, and `launch/multi_node_pdsh.sh` under a fake
  pdsh/ssh, form a world of 2 across their two launchers;
- a DeepSpeed config that disagrees with the run is refused before training (exit 2, both values
  named, nothing written);
- every script in launch/ passes `bash -n`, and the launcher's CPU resource rules hold.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_launch.py
"""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, losses, make_demo_shards, train_env

pytestmark = pytest.mark.slow

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
STEPS = 3
# Tiny model, fp32, global batch 8 on two ranks; no periodic checkpoints (the last step still saves).
TRAIN = ["--max-steps", str(STEPS), "--ds-set", "train_micro_batch_size_per_gpu=4", "--ds-set", "bf16.enabled=false",
         "--save-every", "100"]
LOOPBACK_HOSTS = "127.0.0.1 slots=1\nlocalhost slots=1\n"  # two "nodes" of one rank, both this machine


@pytest.fixture(scope="module")
def shards(module_dir) -> Path:
    return make_demo_shards(module_dir("launch") / "data", n_train=32, n_val=8, shard_size=8)


def run(cmd: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=train_env(**env), capture_output=True, text=True, timeout=timeout)


def script_env(shards: Path, run_dir: Path, **extra: str) -> dict[str, str]:
    """The variables at the top of the launch scripts, set through the environment."""
    return dict(CONFIG="tiny", DS_CONFIG="ds_configs/zero2.json", TRAIN_SHARDS=str(shards / "train"), VAL_SHARDS="",
                RUN_DIR=str(run_dir), DEEPSPEED=DEEPSPEED, MASTER_PORT=str(free_port()), **extra)


def assert_trained(out: str, run_dir: Path) -> dict[int, float]:
    assert "world size 2 on cpu" in out, out[-4000:]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in got.values()), got
    assert (run_dir / "checkpoints" / f"step{STEPS}").is_dir()
    return got


def assert_refused(r: subprocess.CompletedProcess, run_dir: Path, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    assert all(n in r.stderr for n in needles), (needles, r.stderr[-3000:])
    assert not list((run_dir / "checkpoints").glob("*")) and not (run_dir / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def num_gpus_run(shards, module_dir):
    run_dir, port = module_dir("num_gpus") / "run", free_port()
    r = run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), "--module", "vlm_dist.train",
             "--config", "tiny", "--ds", "ds_configs/zero2.json", "--train-shards", str(shards / "train"),
             "--run-dir", str(run_dir), *TRAIN])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    return r, run_dir, port


def test_deepspeed_num_gpus_two_cpu_ranks(num_gpus_run):
    r, run_dir, _ = num_gpus_run
    assert "dist_world_size=2" in r.stdout + r.stderr  # the launcher's own count
    assert_trained(r.stdout, run_dir)


def test_cpu_run_leaves_no_shared_memory_behind(num_gpus_run):
    """DeepSpeed's launcher sets LOCAL_SIZE, so its CPU shared-memory allreduce makes a ~66 MB /dev/shm
    segment per rank, which DeepSpeed never unlinks; init_distributed unlinks them once every rank has
    mapped them (train/engine.py unlink_shm_buffer)."""
    r, _, port = num_gpus_run
    assert "deepspeed_shm_comm_op built successfully" in r.stdout + r.stderr  # DeepSpeed made the segments
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"left in /dev/shm: {left}"


def test_no_ssh_two_nodes_on_loopback(shards, num_gpus_run, tmp_path):
    """launch/no_ssh_node.sh on each "node": same world of 2, same data order, so the same losses."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(LOOPBACK_HOSTS)
    env = script_env(shards, tmp_path / "run", HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1")
    procs = [subprocess.Popen(["bash", "launch/no_ssh_node.sh", *TRAIN], cwd=REPO,
                              env=train_env(**env, NODE_RANK=str(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (1, 0)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-6000:]
    node1, node0 = outs
    assert "nnodes=2, num_local_procs=1, node_rank=0" in node0 and "node_rank=1" in node1
    got = assert_trained(node0, tmp_path / "run")
    ref = losses(num_gpus_run[1])
    assert all(abs(got[s] - ref[s]) <= 1e-5 for s in ref), (got, ref)


def test_refuses_train_batch_size_mismatch(shards, tmp_path):
    """Through launch/single_node.sh with two CPU ranks: 999 != 4 x 1 x 2 = 8, refused before training."""
    run_dir = tmp_path / "run"
    r = run(["bash", "launch/single_node.sh", *TRAIN, "--ds-set", "train_batch_size=999"],
            **script_env(shards, run_dir, NUM_GPUS="2"))
    assert_refused(r, run_dir, "train_batch_size=999", "world size 2 = 8")


def test_refuses_schedule_length_mismatch(shards, tmp_path):
    """A declared scheduler length that is not the run's step count (one rank, plain python)."""
    run_dir = tmp_path / "run"
    r = run([sys.executable, "-m", "vlm_dist.train", "--config", "tiny", "--train-shards", str(shards / "train"),
             "--run-dir", str(run_dir), *TRAIN, "--ds-set", "scheduler.params.total_num_steps=50"])
    assert_refused(r, run_dir, "total_num_steps=50", f"takes {STEPS} optimizer steps")


def fake_commands(bin_dir: Path, **scripts: str) -> str:
    """Write executable stand-ins (srun, scontrol, pdsh, ssh) into bin_dir; returns a PATH that finds them first."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_slurm_sbatch_forms_world_across_nodes(shards, tmp_path):
    """slurm.sbatch with srun/scontrol faked: two tasks (SLURM_NODEID 0, 1) run the launcher in --no_ssh
    mode on loopback and reach world size 2 (the refusal message shows it, after a full rendezvous)."""
    path = fake_commands(
        tmp_path / "bin",
        scontrol='case "$1" in show) printf "127.0.0.1\\nlocalhost\\n";; *) ;; esac\n',
        # srun: drop its options, run the command once per "node", return the worst exit code.
        srun='while [[ "$1" == --* ]]; do shift; done\npids=()\n'
             'for n in 0 1; do SLURM_NODEID=$n SLURM_PROCID=$n "$@" & pids+=($!); done\n'
             'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc\n')
    run_dir = tmp_path / "run"
    env = script_env(shards, run_dir, PATH=path, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="fake[0-1]",
                     SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_PER_TASK="1", SLURM_GPUS_ON_NODE="1")
    r = run(["bash", "launch/slurm.sbatch", *TRAIN, "--ds-set", "train_batch_size=999"], **env)
    assert "nnodes=2, num_local_procs=1, node_rank=1" in r.stdout, r.stdout[-4000:]
    assert_refused(r, run_dir, "train_batch_size=999", "world size 2 = 8")
    assert (run_dir / "hostfile.4242").read_text() == LOOPBACK_HOSTS


def test_multi_node_pdsh_forms_world_and_forwards_env(shards, tmp_path):
    """multi_node_pdsh.sh with pdsh/ssh faked: pdsh runs its command per host in a bare environment
    (as ssh would), so the ranks see only what the launcher exports, env file included."""
    log = tmp_path / "pdsh_cmd"
    path = fake_commands(
        tmp_path / "bin",
        ssh="exit 0\n",  # the launcher's reachability check
        pdsh='while getopts "Sf:w:" o; do [[ $o == w ]] && hosts=$OPTARG; done; shift $((OPTIND - 1))\n'
             f'echo "$*" > {log}\n'
             'IFS=, read -ra hs <<< "$hosts"; pids=()\n'
             'for i in "${!hs[@]}"; do env -i HOME="$HOME" PATH=/usr/bin:/bin bash -c "${*//%n/$i}" & pids+=($!); done\n'
             'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc\n')
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(LOOPBACK_HOSTS)
    run_dir = tmp_path / "run"
    r = run(["bash", "launch/multi_node_pdsh.sh", *TRAIN, "--ds-set", "train_batch_size=999"],
            **script_env(shards, run_dir, PATH=path, HOSTFILE=str(hostfile)))
    cmd = log.read_text()
    assert "export OMP_NUM_THREADS=1;" in cmd and "export HF_HUB_OFFLINE=1;" in cmd, cmd
    assert f"export TORCH_EXTENSIONS_DIR={os.environ.get('TORCH_EXTENSIONS_DIR', REPO / '.torch_extensions')};" in cmd
    assert "--master_addr=127.0.0.1" in cmd  # the hostfile's first host
    assert_refused(r, run_dir, "train_batch_size=999", "world size 2 = 8")


def test_launcher_resource_rules_on_cpu():
    """Why the scripts say `--module` and why `--num_gpus` is the way to get N CPU ranks."""
    from deepspeed.launcher import runner

    with pytest.raises(SystemExit):  # "unrecognized arguments: -m"
        runner.parse_args(["--num_gpus", "2", "-m", "vlm_dist.train"])
    assert runner.parse_args(["--num_gpus", "2", "--module", "vlm_dist.train", "--x"]).user_args == ["--x"]
    pool = {"localhost": 1}  # the CPU accelerator's count: NUMA nodes (or $LOCAL_SIZE)
    active = runner.parse_inclusion_exclusion(pool, "", "")
    assert runner.apply_num_nodes_and_gpus(active, -1, 2) == {"localhost": [0, 1]}
    with pytest.raises(ValueError, match="No slot '1'"):
        runner.parse_inclusion_exclusion(pool, "localhost:0,1", "")


def test_scripts_parse():
    scripts = sorted((REPO / "launch").glob("*.sh")) + sorted((REPO / "launch").glob("*.sbatch"))
    assert len(scripts) == 5, scripts
    for script in scripts:
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, (script.name, r.stderr)
        text = script.read_text()
        assert "set -euo pipefail" in text and '"$@"' in text, script.name
