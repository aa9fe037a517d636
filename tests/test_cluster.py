"""Cluster operation against the real thing on localhost: a Ray head started by `ray start --head` on
127.0.0.1 (stopped by its process group id), jobs submitted through the Jobs API with `apexdistill
submit` and with `ray job submit`, a real PostgreSQL server (Debian's package, on 127.0.0.1, stopped by
PID) behind a real MLflow server, the cluster definition validated against Ray's autoscaler schema,
and the multi-node configuration rules."""

from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from apexdistill.cli import main
from apexdistill.cluster import check_multinode, is_remote_address, is_shared_path, mount_of
from apexdistill.config import ConfigError, build_config
from apexdistill.report.serve import free_port, start_mlflow_ui, stop

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)


# ----------------------------------------------------------------------------- the cluster definition


def test_ray_cluster_yaml_validates_against_rays_autoscaler_schema():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(fillout_defaults(copy.deepcopy(config)))
    assert config["head_node_type"] in config["available_node_types"]
    gpu = [t for t, spec in config["available_node_types"].items() if "GPU" in str(spec) or "g6e" in str(spec)]
    assert gpu, "a GPU worker node type"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head_start and "postgresql://" in head_start and "--host $(hostname -I" in head_start
    assert any("apexdistill" in c and "pip install" in c for c in config["setup_commands"])

    # the on-prem variant described in its comments validates too
    local = copy.deepcopy(config)
    local["provider"] = {"type": "local", "head_ip": "10.0.0.10", "worker_ips": ["10.0.0.11", "10.0.0.12"]}
    for spec in local["available_node_types"].values():
        spec["node_config"] = {}
    validate_config(fillout_defaults(local))

    # and the schema is really applied: a misspelled key is refused
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = 1
    with pytest.raises(Exception, match="min_worker"):
        validate_config(fillout_defaults(bad))


def test_kuberay_rayjob_example_runs_a_shipped_entry_point():
    job = yaml.safe_load((ROOT / "jobs" / "kuberay_rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    words = job["spec"]["entrypoint"].split()
    assert words[:2] == ["python", "jobs/train.py"] and (ROOT / words[1]).is_file()
    config = ROOT / words[words.index("-c") + 1]
    assert config.is_file()
    build_config(yaml.safe_load(config.read_text()))  # the config it names is valid
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == __import__("ray").__version__
    for entry in ("train", "preprocess", "sweep", "evaluate"):
        assert (ROOT / "jobs" / f"{entry}.py").is_file()


# ----------------------------------------------------------------------------- multi-node rules

MOUNTS = """overlay / overlay rw 0 0
/dev/sda1 /home ext4 rw 0 0
fs-1.efs.us-west-2.amazonaws.com:/ /mnt/shared nfs4 rw,vers=4.1 0 0
tmpfs /tmp tmpfs rw 0 0
"""


def test_mount_table_lookup():
    assert mount_of("/mnt/shared/apex-runs/runs/x", MOUNTS) == ("/mnt/shared", "nfs4")
    assert mount_of("/home/u/apex-runs", MOUNTS) == ("/home", "ext4")
    assert mount_of("/mnt/sharedish", MOUNTS) == ("/", "overlay")  # a prefix of the name is not the mount
    assert is_shared_path("/mnt/shared/x", MOUNTS) and not is_shared_path("/tmp/x", MOUNTS)


def test_remote_addresses():
    assert not is_remote_address(None) and not is_remote_address("auto")
    assert not is_remote_address("127.0.0.1:6379") and not is_remote_address("ray://localhost:10001")
    assert is_remote_address("ray://10.20.30.40:10001") and is_remote_address("10.20.30.40:6379")


def test_multi_node_config_errors_say_what_to_use_instead(tmp_path):
    base = [f"run.workdir={tmp_path}"]
    sqlite = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ConfigError) as err:
        check_multinode(build_config({}, base), sqlite, "Ray address ray://10.20.30.40:10001", MOUNTS)
    text = str(err.value)
    assert "ray://10.20.30.40:10001" in text
    assert f"tracking.uri={sqlite}" in text and "http://<head private IP>:5000" in text
    assert f"run.workdir={tmp_path}" in text and "node-local" in text and "run.shared_storage=true" in text

    cache = build_config({}, [*base, "run.shared_storage=true", "data.cache_uri=memory://apex-cache"])
    with pytest.raises(ConfigError, match=r"data.cache_uri=memory://apex-cache lives in one process's memory"):
        check_multinode(cache, "http://10.0.0.10:5000", "x", MOUNTS)

    # what works: a tracking server, a workdir on the NFS mount, a cache in an object store
    ok = build_config({}, ["run.workdir=/mnt/shared/apex-runs", "data.cache_uri=s3://bucket/apex-cache"])
    check_multinode(ok, "http://10.0.0.10:5000", "x", MOUNTS)
    check_multinode(ok, "postgresql://mlflow@10.0.0.10/mlflow", "x", MOUNTS)
    # a local cache path on a node-local disk is refused even when the workdir is shared
    with pytest.raises(ConfigError, match=r"data.cache_uri=/home/u/cache is on a node-local filesystem \(ext4 at /home\)"):
        check_multinode(build_config({}, ["run.workdir=/mnt/shared/apex-runs", "data.cache_uri=/home/u/cache"]),
                        "http://10.0.0.10:5000", "x", MOUNTS)


def test_remote_address_with_local_storage_fails_before_connecting(tmp_path, capsys):
    """The CLI refuses at config time: no connection to 10.20.30.40 is attempted (it would hang)."""
    started = time.time()
    code = main(["train", "-c", str(ROOT / "jobs" / "configs" / "teacher_digits.yaml"), "--workdir", str(tmp_path),
                 "--address", "ray://10.20.30.40:10001", "train.steps=2"])
    err = capsys.readouterr().err
    assert code == 2 and time.time() - started < 10
    assert "multi-node run (Ray address ray://10.20.30.40:10001)" in err and "tracking.uri=sqlite:///" in err
    assert not (tmp_path / "runs").exists()  # nothing was written


# ----------------------------------------------------------------------------- a real Ray head, real jobs


def _short_tmp(prefix: str) -> Path:
    # Ray's and PostgreSQL's unix sockets need short paths (pytest's tmp_path can exceed 107 bytes)
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # SIGTERM makes the head drain for 30 s
        proc.wait(30)


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on 127.0.0.1 with its own temp dir and ports; yields the Jobs API address.
    Token authentication is on (Ray 2.60's default for local clusters): the clients here send the session's
    token, as users must send their cluster's."""
    from ray.job_submission import JobSubmissionClient

    temp = _short_tmp("rayh")
    dashboard = free_port()
    cmd = [f"{BIN}/ray", "start", "--head", "--block", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=2", f"--temp-dir={temp}",
           "--include-dashboard=true", "--disable-usage-stats"]
    assert os.environ.get("RAY_AUTH_MODE") == "token" and os.environ.get("RAY_AUTH_TOKEN")  # conftest: one token for all
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    log = (temp / "head.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline, last = time.time() + 90, None
        while True:
            assert proc.poll() is None, (temp / "head.log").read_text()[-3000:]
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                assert time.time() < deadline, f"the Ray head did not answer in 90 s: {last!r}"
                time.sleep(1)
        yield address
    finally:
        _kill_group(proc)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_mlflow():
    """PostgreSQL from Debian's package (initdb in a temp dir, 127.0.0.1 only) and an MLflow server using
    it as its backend store; yields (tracking URI, database URI). Both stopped by PID afterwards."""
    bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
    data = _short_tmp("pg")
    port = free_port()
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_pg:
        shutil.chown(data, "postgres")
    subprocess.run([*as_pg, f"{bindir}/initdb", "-D", str(data / "db"), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    server = subprocess.Popen([*as_pg, f"{bindir}/postgres", "-D", str(data / "db"), "-p", str(port), "-k", str(data),
                               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ui = None
    try:
        deadline = time.time() + 60
        while subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", "CREATE DATABASE mlflow"],
                             capture_output=True).returncode:
            assert server.poll() is None and time.time() < deadline, "PostgreSQL did not start"
            time.sleep(0.5)
        db = f"postgresql://postgres@127.0.0.1:{port}/mlflow"
        mlflow_port = free_port()
        ui = start_mlflow_ui(db, mlflow_port, data / "mlflow.log")
        yield f"http://127.0.0.1:{mlflow_port}", db, port
    finally:
        if ui is not None:
            stop(ui)
        pid = int((data / "db" / "postmaster.pid").read_text().split()[0]) if (data / "db" / "postmaster.pid").exists() else server.pid
        os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        server.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def _job_config(workdir: Path) -> Path:
    """A tiny fm job in local mode (the driver trains): the cluster machinery is what is under test."""
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "tiny", "workdir": str(workdir)},
        "objective": {"name": "fm"},
        "train": {"steps": 4, "batch_size": 16, "log_every": 2, "checkpoint_every": 0},
        "eval": {"at_end": False},
        "tracking": {"experiment": "cluster-test", "sample_every": 0},
    }))
    return path


@pytest.fixture(scope="module")
def job_workdir():
    path = _short_tmp("jobs")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_apexdistill_submit_logs_into_postgres_backed_mlflow(ray_head, postgres_mlflow, job_workdir, capsys):
    """One job, submitted three times: without --follow (returns at once); with another command under the
    same run name while it runs (refused, nothing submitted); with the same command and --follow (it follows
    the running job instead of starting a copy). The run lands in MLflow through the server, in PostgreSQL."""
    from ray.job_submission import JobSubmissionClient

    tracking, db, pg_port = postgres_mlflow
    cfg = _job_config(job_workdir)
    head = ["submit", "--address", ray_head, "--working-dir", str(ROOT)]
    command = ["--", "train", "-c", str(cfg), "--tracking-uri", tracking, "run.name=tiny-pg"]
    assert main([*head, *command]) == 0  # returns at once, the job pending or running
    assert "[submit] apexdistill-tiny-pg: apexdistill train" in capsys.readouterr().out
    # the same run name with another command while it runs: refused, nothing submitted
    assert main([*head, *command, "train.log_every=1"]) == 2
    refused = capsys.readouterr().err
    assert "apexdistill-tiny-pg is still" in refused and "with another command" in refused
    # the same command again: followed, not submitted twice
    assert main([*head, "--follow", *command]) == 0, capsys.readouterr().out[-4000:]
    out = capsys.readouterr().out
    assert "apexdistill-tiny-pg is already" in out and "following it" in out and "finished: SUCCEEDED" in out
    assert "[train] step 4/4" in out  # the followed logs

    client = JobSubmissionClient(ray_head)
    ids = [j.submission_id for j in client.list_jobs()]
    assert ids.count("apexdistill-tiny-pg") == 1 and "apexdistill-tiny-pg-2" not in ids
    assert str(client.get_job_status("apexdistill-tiny-pg")) == "SUCCEEDED"
    assert "[train] step 4/4" in client.get_job_logs("apexdistill-tiny-pg")
    # the run is in MLflow, through the server, and really in PostgreSQL's tables
    ml = MlflowClient(tracking)
    (run,) = ml.search_runs([ml.get_experiment_by_name("cluster-test").experiment_id], "attributes.run_name = 'tiny-pg'")
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "4"
    assert [m.step for m in ml.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    rows = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "-d", "mlflow", "-tAc",
                           f"SELECT status FROM runs WHERE run_uuid = '{run.info.run_id}'"], capture_output=True, text=True)
    assert rows.stdout.strip() == "FINISHED"

    # submitting the same finished run again makes a new job id (a resumed run logging into the same MLflow
    # run is test_distributed's drill); stopped at once, so it does not train in the background of later tests
    assert main([*head, *command]) == 0
    assert "[submit] apexdistill-tiny-pg-2:" in capsys.readouterr().out
    client.stop_job("apexdistill-tiny-pg-2")
    deadline = time.time() + 60
    while str(client.get_job_status("apexdistill-tiny-pg-2")) not in ("STOPPED", "SUCCEEDED", "FAILED") and time.time() < deadline:
        time.sleep(0.5)
    assert str(client.get_job_status("apexdistill-tiny-pg-2")) in ("STOPPED", "SUCCEEDED")
    # an unknown job id is a clear error
    assert main(["job", "status", "no-such-job", "--address", ray_head]) == 2
    assert "job status no-such-job" in capsys.readouterr().err


def test_ray_job_submit_runs_the_jobs_entry_point(ray_head, job_workdir):
    cfg = _job_config(job_workdir)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.run([f"{BIN}/ray", "job", "submit", "--address", ray_head, "--submission-id", "plain-ray-job",
                           "--working-dir", str(ROOT), "--", "python", "jobs/train.py", "-c", str(cfg), "run.name=tiny-ray"],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from ray.job_submission import JobSubmissionClient

    assert str(JobSubmissionClient(ray_head).get_job_status("plain-ray-job")) == "SUCCEEDED"
    ml = MlflowClient(f"sqlite:///{job_workdir / 'mlflow.db'}")
    (run,) = ml.search_runs([ml.get_experiment_by_name("cluster-test").experiment_id], "attributes.run_name = 'tiny-ray'")
    assert run.info.status == "FINISHED"
    assert main(["job", "logs", "plain-ray-job", "--address", ray_head]) == 0


def test_a_bad_config_job_fails_fast_with_the_error_in_its_logs(ray_head, job_workdir, capsys):
    from ray.job_submission import JobSubmissionClient

    cfg = _job_config(job_workdir)
    started = time.time()
    code = main(["submit", "--address", ray_head, "--working-dir", str(ROOT), "--follow", "--",
                 "train", "-c", str(cfg), "run.name=tiny-bad", "train.stpes=3"])
    assert code == 1 and time.time() - started < 90
    logs = JobSubmissionClient(ray_head).get_job_logs("apexdistill-tiny-bad")
    assert "unknown key 'train.stpes'" in logs and "did you mean 'train.steps'" in logs
    assert str(JobSubmissionClient(ray_head).get_job_status("apexdistill-tiny-bad")) == "FAILED"
    assert main(["job", "status", "apexdistill-tiny-bad", "--address", ray_head]) == 0
    assert "apexdistill-tiny-bad: FAILED" in capsys.readouterr().out


def test_single_node_clusters_that_will_grow_are_checked_too(tmp_path):
    """ray_cluster.yaml's head has no CPUs for training and no GPUs, and no workers at first
    (min_workers 0): a GPU job that joins it sees one node, and its workers will run elsewhere."""
    from apexdistill.cluster import check_cluster

    sqlite = f"sqlite:///{tmp_path}/mlflow.db"
    gpu = build_config({}, [f"run.workdir={tmp_path}", "train.num_workers=8", "train.use_gpu=true", "train.strategy=fsdp2"])
    head = {"Alive": True, "Resources": {"CPU": 8.0}}
    with pytest.raises(ConfigError, match=r"needs 8 GPUs .* has 0 and 8, so they will run on nodes the autoscaler adds"):
        check_cluster(gpu, sqlite, "10.0.0.10:6379", nodes=[head])
    with pytest.raises(ConfigError, match="has 2 nodes"):
        check_cluster(build_config({}, [f"run.workdir={tmp_path}"]), sqlite, None, nodes=[head, head])
    # what one node can hold stays a single-machine run: local storage and SQLite are fine
    cpu = build_config({}, [f"run.workdir={tmp_path}", "train.num_workers=2", "train.cpus_per_worker=0.45", "train.strategy=ddp"])
    check_cluster(cpu, sqlite, "127.0.0.1:6379", nodes=[{"Alive": True, "Resources": {"CPU": 2.0}}])
    check_cluster(gpu, sqlite, None, nodes=[{"Alive": True, "Resources": {"CPU": 64.0, "GPU": 8.0}}])
