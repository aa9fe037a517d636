"""Multi-node rules: what must be shared when the Ray cluster has more than one machine.

On one machine everything may live in the work directory: a SQLite MLflow store, checkpoints and
caches on the local disk. On a cluster a worker on another node can see none of that, and the
failure would come late (a rank-0 worker on node B logging into a SQLite file that exists only on
node A, a restarted worker that cannot read its checkpoint). So before any worker starts:

- the MLflow store must be a server (``http(s)://``) or a database (``postgresql://``...), not SQLite;
- ``run.workdir`` must be on a filesystem every node mounts (NFS, Lustre, ...: read from /proc/mounts,
  or declared with ``run.shared_storage=true``);
- ``data.cache_uri`` likewise, or an object-store URI (``s3://``, ``gs://``, ...) read through
  fsspec/pyarrow; ``memory://`` lives in one process and is refused.

Checked twice: when ``--address`` names another machine (before connecting), and after connecting
when the cluster reports more than one alive node or the run needs more than its only node has (an
autoscaling cluster whose workers are not up yet).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from apexdistill.config import Config, ConfigError

# filesystems whose files every client sees (fuse-based object-store mounts included)
NETWORK_FS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "cephfs", "glusterfs", "fuse.glusterfs",
    "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.mountpoint-s3", "fuse.sshfs", "fuse.cephfs", "wekafs", "panfs",
    "orangefs", "ocfs2", "gfs2", "fuse.lizardfs", "fuse.moosefs", "9p",
}
# fsspec protocols that reach the same bytes from every node
SHARED_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "hdfs", "viewfs", "oci", "oss", "http", "https"}


def mount_of(path: str | Path, mounts: str | None = None) -> tuple[str, str]:
    """(mount point, filesystem type) that holds ``path`` (which need not exist yet), from /proc/mounts."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "/", "unknown"
    target = os.path.realpath(Path(path).expanduser().absolute())  # symlinks of the existing part resolved
    best = ("/", "unknown")
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, parts[2])
    return best


def is_shared_path(path: str | Path, mounts: str | None = None) -> bool:
    return mount_of(path, mounts)[1] in NETWORK_FS


def _is_this_machine(host: str) -> bool:
    """Can a socket bind to ``host``? Only an address of one of this machine's interfaces allows it."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr[0], 0))
            return True
        except OSError:
            continue
    return False


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_remote_address(address: str | None) -> bool:
    """Does this Ray address (``ray://host:port``, ``host:port``, ``http://host:8265``) name another machine?
    ``None``, ``auto`` and ``local`` mean this machine's cluster: the node count decides after connecting."""
    if not address or address in ("auto", "local"):
        return False
    host = urlparse(address if "://" in address else f"ray://{address}").hostname
    if not host:
        return False
    return not (_loopback(host) or _is_this_machine(host))


def _storage_problem(field: str, uri: str, cfg: Config, mounts: str | None) -> str | None:
    scheme = urlparse(uri).scheme if "://" in uri else ""
    if scheme in SHARED_PROTOCOLS:
        return None
    if scheme == "memory":
        return f"{field}={uri} lives in one process's memory: use s3://, gs:// or a shared filesystem path"
    if scheme not in ("", "file", "local"):
        return None  # another fsspec protocol: trust it
    local = urlparse(uri).path if scheme else uri
    if cfg.run.shared_storage:
        return None
    point, fstype = mount_of(local, mounts)
    if fstype in NETWORK_FS:
        return None
    return (f"{field}={uri} is on a node-local filesystem ({fstype} at {point}): workers on other nodes cannot read it. "
            f"Put it on a filesystem every node mounts (NFS, Lustre, EFS... e.g. /mnt/shared/...)" +
            (", or use an object store (s3://bucket/..., gs://...)" if field == "data.cache_uri" else "") +
            "; if it already is one that apexdistill does not recognise, set run.shared_storage=true")


def check_multinode(cfg: Config, tracking_uri: str | None, where: str, mounts: str | None = None) -> None:
    """Refuse, with every problem listed, what cannot work across machines. ``where`` says why this is
    a multi-node run (the remote address, or the node count), for the message."""
    problems = []
    if cfg.tracking.enabled and tracking_uri is not None:
        scheme = urlparse(tracking_uri).scheme if "://" in tracking_uri else "file"
        if scheme in ("sqlite", "file", ""):
            problems.append(
                f"tracking.uri={tracking_uri} is a file on this node that workers elsewhere cannot log into: point "
                f"--tracking-uri (tracking.uri / MLFLOW_TRACKING_URI) at the cluster's MLflow server, e.g. "
                f"http://<head private IP>:5000 (ray_cluster.yaml starts one, PostgreSQL-backed), or set tracking.enabled=false")
    problems.append(_storage_problem("run.workdir", cfg.run.workdir, cfg, mounts))
    if cfg.data.cache_uri:
        problems.append(_storage_problem("data.cache_uri", cfg.data.cache_uri, cfg, mounts))
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(f"multi-node run ({where}):\n  - " + "\n  - ".join(problems))


def check_cluster(cfg: Config, tracking_uri: str | None, address: str | None = None, nodes: list[dict] | None = None) -> None:
    """After connecting: the same rules when the cluster has more than one alive node, or when the run
    needs more than its only node has (an autoscaling cluster such as ``ray_cluster.yaml``, whose CPU-only
    head starts alone, will bring the GPU workers up on other machines)."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    nodes = [n for n in nodes if n.get("Alive")]
    where = address or "RAY_ADDRESS"
    if len(nodes) > 1:
        check_multinode(cfg, tracking_uri, f"the Ray cluster at {where} has {len(nodes)} nodes")
    elif len(nodes) == 1:
        have = nodes[0].get("Resources") or {}
        t = cfg.train
        need_gpus = t.num_workers if t.use_gpu and t.num_workers else 0
        need_cpus = t.num_workers * t.cpus_per_worker
        if need_gpus > have.get("GPU", 0) or need_cpus > have.get("CPU", 0):
            check_multinode(cfg, tracking_uri, f"the run needs {need_gpus:g} GPUs and {need_cpus:g} CPUs for its workers; the "
                                               f"only node of the Ray cluster at {where} has {have.get('GPU', 0):g} and "
                                               f"{have.get('CPU', 0):g}, so they will run on nodes the autoscaler adds")
