"""Slurm jobs and GPU processes: who holds each GPU on a node without Kubernetes.

Two sources, merged per node:

- dcgm-exporter's job-mapping directory: one file per GPU, named by GPU index (``0``) or
  ``<gpu>.<gpu instance id>`` for a MIG instance, one job id a line, written by the scheduler
  (a Slurm prolog and epilog). The scheduler's word on which jobs hold which GPUs.
- The environment of each GPU process (``/proc/<pid>/environ``), as Meta's GCM reads it:
  ``SLURM_JOB_ID`` and the job's user, account, partition and name. A process outside Slurm
  still names its owner. Process ids are NVML's, so the agent must see the host's processes
  (run it in the host's PID namespace: ``hostPID: true``, or no container at all).

Both are written by others and read as hostile: bounded reads, anything malformed counted and
skipped, never fatal.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gpufleet.agent.attribution.base import AttributionFailed, Target, Targets
from gpufleet.v1 import allocation_pb2

log = logging.getLogger(__name__)

SOURCE_SLURM = "slurm"
SOURCE_PROCESS = "process"

# The agent's flag naming the directory (dcgm-exporter calls its own --hpc-job-mapping-dir).
JOB_MAPPING_DIR_FLAG = "--job-mapping-dir"
# A file holds a few job ids; a GPU shared by a thousand jobs is not a real node.
MAX_JOB_FILE_BYTES = 64 * 1024
# Eight GPUs of seven MIG instances need 64 names.
MAX_JOB_FILES = 1024
# Slurm job ids are numbers, ``<array job>_<task>`` or ``<het job>+<offset>``: far shorter.
MAX_JOB_ID_CHARS = 64
# Linux allows environments of megabytes; Slurm's variables are a few kilobytes of them.
MAX_ENVIRON_BYTES = 256 * 1024

# "3" (GPU 3) or "3.1" (GPU 3, GPU instance 1); digits bounded so int() stays cheap.
_JOB_FILE_NAME = re.compile(r"([0-9]{1,9})(?:\.([0-9]{1,9}))?")
_JOB_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_JOB_ID_CHARS}}}")

# The values of an Allocation that say who holds it (gpufleet.allocations.VALUE_FIELDS, less
# source and the Kubernetes ones).
_VALUES = ("job", "user", "account", "partition", "job_name")

_PRIVILEGE_HINT = "reading other users' environments needs root or CAP_SYS_PTRACE"


class JobMapping(Protocol):
    """Where the scheduler says which jobs hold which GPUs."""

    def read(self) -> dict[str, bytes]:
        """File name -> content; raises AttributionFailed when the mapping cannot be read at all."""
        ...


class Environs(Protocol):
    """The environment and owner of a process."""

    def environ(self, pid: int) -> dict[str, str]:
        """The process's environment; raises AttributionFailed (or OSError) when it cannot be read."""
        ...

    def owner(self, pid: int) -> str:
        """The user name of the process's owner, or its uid as a string; raises as ``environ``."""
        ...


def _sort_key(target: Target) -> tuple[int, int]:
    """Whole GPUs before their MIG instances, each in index order."""
    return target.gpu_index, -1 if target.gpu_instance_id is None else target.gpu_instance_id


def _target_of(allocation: allocation_pb2.Allocation) -> Target:
    gpu_instance_id = allocation.gpu_instance_id if allocation.HasField("gpu_instance_id") else None
    return Target(allocation.gpu_index, gpu_instance_id)


# -- the job-mapping directory ----------------------------------------------------------


class JobMappingDir:
    """The job-mapping directory: its regular files, each read up to MAX_JOB_FILE_BYTES.

    ``errors`` counts, since this object was made, every entry skipped: one that is not a
    regular file (symbolic links are not followed, so a link cannot make the agent report the
    lines of a file elsewhere), one that cannot be read, one cut at the size limit (its
    complete lines are still returned), and every name past the first MAX_JOB_FILES. The
    agent adds it to its attribution errors. Each kind of failure is logged once per name.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_files: int = MAX_JOB_FILES,
        max_file_bytes: int = MAX_JOB_FILE_BYTES,
    ) -> None:
        self.path = Path(path)
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self.errors = 0
        self._logged: set[tuple[str, str]] = set()

    def read(self) -> dict[str, bytes]:
        try:
            names = sorted(os.listdir(self.path))
        except FileNotFoundError as exc:
            raise AttributionFailed(
                f"the job-mapping directory {self.path} does not exist; "
                f"create it or point {JOB_MAPPING_DIR_FLAG} at the scheduler's"
            ) from exc
        except OSError as exc:
            raise AttributionFailed(
                f"cannot list the job-mapping directory {self.path} ({JOB_MAPPING_DIR_FLAG}): "
                f"{exc.strerror or exc}"
            ) from exc
        extra = len(names) - self.max_files
        if extra > 0:
            self.errors += extra
            self._log_once("the last", f"{extra} names skipped: more than {self.max_files} files")
            names = names[: self.max_files]
        files: dict[str, bytes] = {}
        for name in names:
            content = self._read_file(name)
            if content is not None:
                files[name] = content
        return files

    def _read_file(self, name: str) -> bytes | None:
        path = self.path / name
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must not block
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            why = "a symbolic link, not followed" if exc.errno == errno.ELOOP else exc.strerror
            self._skip(name, str(why or exc))
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                self._skip(name, "not a regular file")
                return None
            content = _read_up_to(fd, self.max_file_bytes + 1)
        except OSError as exc:
            self._skip(name, str(exc.strerror or exc))
            return None
        finally:
            os.close(fd)
        if len(content) > self.max_file_bytes:
            self._skip(name, f"longer than {self.max_file_bytes} bytes; its first lines are read")
            content = content[: self.max_file_bytes]
            content = content[: content.rfind(b"\n") + 1]  # a line cut in two is no job id
        return content

    def _skip(self, name: str, why: str) -> None:
        self.errors += 1
        self._log_once(repr(name), why)

    def _log_once(self, what: str, why: str) -> None:
        if (what, why) not in self._logged:
            self._logged.add((what, why))
            log.warning("job-mapping directory %s: skipping %s: %s", self.path, what, why)


def _read_up_to(fd: int, limit: int) -> bytes:
    """At most ``limit`` bytes from ``fd``: /proc files answer a page or so a read."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _job_id(value: bytes | str) -> str | None:
    """A job id (printable ASCII, no spaces, at most MAX_JOB_ID_CHARS), or None."""
    text = value.decode("ascii", errors="replace") if isinstance(value, bytes) else value
    text = text.strip()
    return text if _JOB_ID.fullmatch(text) else None


def _job_file_target(name: str, targets: Targets) -> Target | None:
    match = _JOB_FILE_NAME.fullmatch(name)
    if match is None:
        return None
    gpu_index = int(match[1])
    if match[2] is None:
        return Target(gpu_index) if gpu_index in targets.gpu_indices else None
    gpu_instance_id = int(match[2])
    return Target(gpu_index, gpu_instance_id) if (gpu_index, gpu_instance_id) in targets.mig else None


def allocations_from_job_files(
    files: dict[str, bytes], targets: Targets
) -> tuple[list[allocation_pb2.Allocation], int]:
    """One ``slurm`` allocation per (GPU or MIG instance, job id) the files name.

    Returns them, whole GPUs and MIG instances in index order and each file's jobs in its
    order, with the count of what was rejected: a name that is no GPU or MIG instance of this
    node (one each), a non-empty line that is no job id (one each).
    """
    jobs: dict[Target, dict[str, None]] = {}  # ordered sets
    rejected = 0
    for name, content in files.items():
        target = _job_file_target(name, targets)
        if target is None:
            rejected += 1
            log.debug("job-mapping file %r names no GPU or MIG instance of this node", name)
            continue
        for line in content.split(b"\n"):
            if not line.strip():
                continue
            job = _job_id(line)
            if job is None:
                rejected += 1
                continue
            jobs.setdefault(target, {})[job] = None
    allocations = [
        target.allocation(SOURCE_SLURM, job=job)
        for target in sorted(jobs, key=_sort_key)
        for job in jobs[target]
    ]
    return allocations, rejected


# -- GPU processes' environments --------------------------------------------------------


class ProcEnvirons:
    """Processes' environments and owners, read from ``/proc`` (or ``proc``, for a mounted host's).

    The first environment denied is logged as a warning (the agent lacks a privilege), once.
    """

    def __init__(self, proc: str | os.PathLike[str] = "/proc", *, max_bytes: int = MAX_ENVIRON_BYTES) -> None:
        self.proc = Path(proc)
        self.max_bytes = max_bytes
        self._warned = False

    def _path(self, pid: int, name: str) -> Path:
        if pid <= 0:
            raise AttributionFailed(f"{pid} is no process id")
        return self.proc / str(pid) / name

    def environ(self, pid: int) -> dict[str, str]:
        """The environment the process started with, up to ``max_bytes`` of it.

        Raises AttributionFailed when the process has exited or its environment may not be read.
        """
        path = self._path(pid, "environ")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                raw = _read_up_to(fd, self.max_bytes + 1)
            finally:
                os.close(fd)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise AttributionFailed(f"process {pid} has exited") from exc
        except PermissionError as exc:
            message = f"cannot read {path}: permission denied; {_PRIVILEGE_HINT}"
            if not self._warned:
                self._warned = True
                log.warning("GPU process attribution: %s (logged once)", message)
            raise AttributionFailed(message) from exc
        except OSError as exc:
            raise AttributionFailed(f"cannot read {path}: {exc.strerror or exc}") from exc
        entries = raw.split(b"\0")
        if len(raw) > self.max_bytes:
            entries.pop()  # cut off in the middle
        environment: dict[str, str] = {}
        for entry in entries:
            name, equals, value = entry.partition(b"=")
            if equals and name:
                environment.setdefault(
                    name.decode(errors="replace"), value.decode(errors="replace")
                )  # the C library's getenv finds the first of a name given twice
        return environment

    def owner(self, pid: int) -> str:
        """The user name of the process's real uid (its uid as a string if the name is unknown).

        Read from ``/proc/<pid>/status`` rather than the owner of ``/proc/<pid>``, which is root
        for a process that made itself undumpable.
        """
        path = self._path(pid, "status")
        try:
            status = path.read_bytes()
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise AttributionFailed(f"process {pid} has exited") from exc
        except OSError as exc:
            raise AttributionFailed(f"cannot read {path}: {exc.strerror or exc}") from exc
        uid = _real_uid(status)
        if uid is None:
            raise AttributionFailed(f"{path} has no Uid line")
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return str(uid)


def _real_uid(status: bytes) -> int | None:
    for line in status.splitlines():
        if line.startswith(b"Uid:"):
            fields = line.split()
            if len(fields) > 1 and fields[1].isdigit():
                return int(fields[1])
    return None


@dataclass(frozen=True)
class _Found:
    """What one process says about its GPU's holder."""

    source: str
    job: str = ""
    user: str = ""
    account: str = ""
    partition: str = ""
    job_name: str = ""


class _Processes:
    """Each pid read once, however many GPUs it uses; a pid counted once however it failed."""

    def __init__(self, environs: Environs) -> None:
        self.environs = environs
        self.failed: set[int] = set()
        self._found: dict[int, _Found | None] = {}

    def found(self, pid: int) -> _Found | None:
        if pid not in self._found:
            self._found[pid] = self._read(pid)
        return self._found[pid]

    def _fail(self, pid: int, exc: Exception) -> None:
        self.failed.add(pid)
        log.debug("GPU process attribution: %s", exc)  # routine: processes exit

    def _read(self, pid: int) -> _Found | None:
        try:
            environment = self.environs.environ(pid)
        except (AttributionFailed, OSError) as exc:
            self._fail(pid, exc)
            return self._owner_only(pid)
        raw_job = environment.get("SLURM_JOB_ID", "")
        if not raw_job.strip():
            return self._owner_only(pid)
        job = _job_id(raw_job)
        if job is None:
            self._fail(pid, AttributionFailed(f"process {pid}: SLURM_JOB_ID {raw_job[:80]!r} is no job id"))
            return self._owner_only(pid)
        return _Found(
            SOURCE_SLURM,
            job=job,
            user=environment.get("SLURM_JOB_USER", "").strip() or self._owner(pid) or "",
            account=environment.get("SLURM_JOB_ACCOUNT", "").strip(),
            partition=environment.get("SLURM_JOB_PARTITION", "").strip(),
            job_name=environment.get("SLURM_JOB_NAME", "").strip(),
        )

    def _owner(self, pid: int) -> str | None:
        try:
            return self.environs.owner(pid)
        except (AttributionFailed, OSError) as exc:
            self._fail(pid, exc)
            return None

    def _owner_only(self, pid: int) -> _Found | None:
        owner = self._owner(pid)
        return None if owner is None else _Found(SOURCE_PROCESS, user=owner)


def allocations_from_processes(
    processes: dict[Target, list[int]], environs: Environs
) -> tuple[list[allocation_pb2.Allocation], int]:
    """One allocation per (GPU or MIG instance, distinct holder) of the GPUs' processes.

    A process with ``SLURM_JOB_ID`` gives a ``slurm`` allocation: the job id, the user
    (``SLURM_JOB_USER``, or the process's owner), account, partition and job name; any other a
    ``process`` allocation naming its owner. Returns them in index order (on each, in the order
    of its pids) with the number of processes that could not be read in full: one whose
    environment cannot be read still gives its owner when that can be read, and one that has
    exited gives nothing.
    """
    reader = _Processes(environs)
    allocations: list[allocation_pb2.Allocation] = []
    for target in sorted(processes, key=_sort_key):
        seen: set[_Found] = set()
        for pid in processes[target]:
            found = reader.found(pid)
            if found is None or found in seen:
                continue
            seen.add(found)
            values = {name: getattr(found, name) for name in _VALUES if getattr(found, name)}
            allocations.append(target.allocation(found.source, **values))
    return allocations, len(reader.failed)


# -- one node's Slurm allocations -------------------------------------------------------


def merge_slurm(
    from_job_files: Iterable[allocation_pb2.Allocation],
    from_processes: Iterable[allocation_pb2.Allocation],
) -> list[allocation_pb2.Allocation]:
    """The node's Slurm and process allocations, one per (GPU or MIG instance, job).

    The job-mapping files say which jobs hold which GPU; the processes' environments fill in
    what the files do not say (user, account, partition, job name), from a process of the same
    job on the same GPU first, else from one anywhere on the node (they are the job's, not the
    GPU's). A job only the environments name is kept. A ``process`` allocation is dropped
    where a Slurm allocation of the same GPU names the same user. Whole GPUs and MIG instances
    come in index order; on each, the job files' jobs, then the environments', then processes.
    """
    processes = list(from_processes)
    slurm = list(from_job_files) + [a for a in processes if a.source == SOURCE_SLURM]
    merged: dict[tuple[Target, str], allocation_pb2.Allocation] = {}
    jobs: dict[str, allocation_pb2.Allocation] = {}  # each job's values, from wherever found
    for allocation in slurm:
        target = _target_of(allocation)
        key = (target, allocation.job)
        if key not in merged:
            merged[key] = target.allocation(SOURCE_SLURM, job=allocation.job)
        _fill(merged[key], allocation)
    for allocation in sorted(slurm, key=lambda a: _sort_key(_target_of(a))):
        _fill(jobs.setdefault(allocation.job, allocation_pb2.Allocation()), allocation)
    for (_, job), allocation in merged.items():
        _fill(allocation, jobs[job])
    result = list(merged.values())
    # (GPU, user) already named: by a Slurm allocation, or by a process allocation before.
    named = {(target, allocation.user) for (target, _), allocation in merged.items() if allocation.user}
    for allocation in processes:
        key = (_target_of(allocation), allocation.user)
        if allocation.source == SOURCE_SLURM or key in named:
            continue
        named.add(key)
        kept = allocation_pb2.Allocation()
        kept.CopyFrom(allocation)
        result.append(kept)
    return sorted(result, key=lambda allocation: _sort_key(_target_of(allocation)))  # stable


def _fill(allocation: allocation_pb2.Allocation, other: allocation_pb2.Allocation) -> None:
    """Set each of ``allocation``'s empty values that ``other`` has."""
    for name in _VALUES:
        if not getattr(allocation, name) and getattr(other, name):
            setattr(allocation, name, getattr(other, name))
