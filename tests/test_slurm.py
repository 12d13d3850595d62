"""Multi-node launch: the project's sbatch script on a real one-node Slurm (Debian's slurm-wlm + munge,
started here as root in the test's own directories), and the same per-node logic as two "nodes" on this
machine talking over 127.0.0.1."""
import os
import shutil
import socket
import subprocess
import time

import pytest

from .test_train import ENV, ROOT, events, recipe

SLURM = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")
needs_slurm = pytest.mark.skipif(not all(shutil.which(p) for p in SLURM) or os.geteuid() != 0,
                                 reason="needs Debian's slurm-wlm and munge, run as root (.ci/run installs them)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logs(directory):
    return "\n".join(f"--- {name}\n{open(os.path.join(directory, name), errors='replace').read()[-1500:]}"
                     for name in sorted(os.listdir(directory)) if name.endswith(".log"))


@pytest.fixture
def slurm_cluster(tmp_path):
    d = tmp_path / "slurm"
    for sub in ("state", "spool"):
        (d / sub).mkdir(parents=True)
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    subprocess.run(["munged", f"--key-file={key}", f"--socket={d}/munge.socket", f"--pid-file={d}/munged.pid",
                    f"--log-file={d}/munged.log", f"--seed-file={d}/seed", "--force"], check=True, timeout=30)
    host = socket.gethostname()
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=clorae", f"SlurmctldHost={host}", "AuthType=auth/munge", f"AuthInfo=socket={d}/munge.socket",
        "CredType=cred/munge", "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={d}/state",
        f"SlurmdSpoolDir={d}/spool", f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
        f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.log", f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none", "SchedulerType=sched/builtin", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "ReturnToService=2", "MinJobAge=600",
        f"NodeName={host} CPUs=2 State=UNKNOWN", "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n")
    env = {**ENV, "SLURM_CONF": str(conf)}
    try:
        for daemon in ("slurmctld", "slurmd"):
            started = subprocess.run([daemon, "-f", str(conf)], env=env, capture_output=True, text=True, timeout=30)
            assert started.returncode == 0, f"{daemon} did not start: {started.stderr}\n{logs(d)}"
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
            if state in ("idle", "mixed"):
                break
            time.sleep(1)
        else:
            pytest.fail(f"the Slurm node never became idle (state {state!r}):\n{logs(d)}")
        yield env, d
    finally:
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = d / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass


@pytest.mark.slow
@needs_slurm
def test_sbatch_trains_two_ranks_on_a_real_slurm(slurm_cluster, tmp_path, tokenizer_dir):
    env, slurm_dir = slurm_cluster
    config = recipe(tmp_path, tokenizer_dir, schedule={"epochs": 1})
    out, log_dir = tmp_path / "run", tmp_path / "logs"
    log_dir.mkdir()  # Slurm opens --output before the script runs: the directory must exist
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", f"--chdir={ROOT}",
         f"--output={log_dir}/batch-%j.out", "--export=ALL,CLORAE_PROCS_PER_NODE=2,CLORAE_LOG_DIR=" + str(log_dir),
         os.path.join(ROOT, "launchers", "slurm", "train.sbatch"),
         "--config", config, "--deepspeed", "ds_configs/zero2.json", "--output-dir", str(out)],
        env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    deadline = time.time() + 300
    while time.time() < deadline:
        if not subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout.strip():
            break
        time.sleep(2)
    else:
        subprocess.run(["scancel", job], env=env)
        pytest.fail(f"job {job} did not finish in time:\n{logs(slurm_dir)}")
    info = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    assert os.listdir(log_dir), info + logs(slurm_dir)
    node_logs = sorted(p for p in os.listdir(log_dir) if "node" in p)
    text = "".join(open(log_dir / p).read() for p in os.listdir(log_dir))
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info + text[-3000:]
    assert node_logs == [f"clorae-{job}-node0.out"]
    summary = next(e for e in events(text) if e["event"] == "summary")
    assert summary["global_step"] == 8
    weights = next(e for e in events(text) if e["event"] == "task_weights")
    assert len(weights["per_rank"]) == 2  # two ranks started by the node's launcher
    assert (out / "checkpoints" / "latest").exists() and (out / "adapter" / "clorae_model.safetensors").exists()


@pytest.mark.slow
def test_two_nodes_on_one_machine_with_the_node_launcher(tmp_path, tokenizer_dir):
    config = recipe(tmp_path, tokenizer_dir, schedule={"epochs": 1})
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NNODES": "2",
               "NODE_RANK": str(node_rank), "NPROC_PER_NODE": "1"}
        nodes.append(subprocess.Popen(["bash", os.path.join(ROOT, "launchers", "slurm", "launch_node.sh"),
                                       "--config", config, "--deepspeed", os.path.join(ROOT, "ds_configs", "zero2.json"),
                                       "--output-dir", str(tmp_path / "run")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    log = events(outputs[0])
    assert next(e for e in log if e["event"] == "summary")["global_step"] == 8
    assert len(next(e for e in log if e["event"] == "task_weights")["per_rank"]) == 2
    assert not [e for e in events(outputs[1]) if e["event"] == "summary"]  # only global rank 0 reports
