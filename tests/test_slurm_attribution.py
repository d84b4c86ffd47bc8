"""Slurm and process attribution: job-mapping files on disk, and real child processes read through /proc."""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Protocol

import pytest

from gpufleet.agent.attribution.base import AttributionFailed, Target, Targets
from gpufleet.agent.attribution.slurm import (
    JOB_MAPPING_DIR_FLAG,
    MAX_JOB_FILE_BYTES,
    JobMappingDir,
    ProcEnvirons,
    allocations_from_job_files,
    allocations_from_processes,
    merge_slurm,
)
from gpufleet.agent.sources.nvml import NvmlSource
from gpufleet.v1 import allocation_pb2, inventory_pb2
from tests.conftest import wait_until
from tests.fake_nvml import a100_table, fake_node, h100_table

IS_ROOT = os.geteuid() == 0
NOBODY = 65534
# A uid no passwd entry names: its owner is reported as the number.
NAMELESS_UID = 54321
SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_USER": "alice",
    "SLURM_JOB_ACCOUNT": "physics",
    "SLURM_JOB_PARTITION": "gpu",
    "SLURM_JOB_NAME": "train-llm",
}


def node(gpus: int = 2, mig: dict[int, list[int]] | None = None) -> Targets:
    """A node of ``gpus`` GPUs; ``mig`` maps a GPU index to its GPU instance ids."""
    inventory = inventory_pb2.NodeInventory()
    for index in range(gpus):
        gpu = inventory.gpus.add(index=index, uuid=f"GPU-{index:08d}-aaaa-bbbb-cccc-dddddddddddd")
        for mig_index, gpu_instance_id in enumerate((mig or {}).get(index, [])):
            gpu.mig_instances.add(
                index=mig_index, uuid=f"MIG-{index}-{gpu_instance_id}", gpu_instance_id=gpu_instance_id
            )
    return Targets(inventory)


def alloc(gpu: int, gpu_instance_id: int | None = None, /, **values: str) -> allocation_pb2.Allocation:
    source = values.pop("source", "slurm")
    return Target(gpu, gpu_instance_id).allocation(source, **values)


def write(directory: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (directory / name).write_bytes(content)
    return directory


# -- the job-mapping directory ----------------------------------------------------------


def test_job_files_name_jobs_of_gpus_and_mig_instances(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "0": b"4242\n4243\n4242\n",  # several jobs share GPU 0; a repeat is one allocation
            "1": b"  88 \r\n\n\n",  # whitespace and blank lines around a job id are nothing
            "1.2": b"77_3\n",  # GPU 1, GPU instance 2: an array task
            "1.5": b"9001+1",  # a heterogeneous job's component, no final newline
        },
    )
    mapping = JobMappingDir(tmp_path)
    files = mapping.read()
    assert mapping.errors == 0
    assert files == {"0": b"4242\n4243\n4242\n", "1": b"  88 \r\n\n\n", "1.2": b"77_3\n", "1.5": b"9001+1"}
    allocations, rejected = allocations_from_job_files(files, node(2, mig={1: [2, 5]}))
    assert rejected == 0
    assert allocations == [
        alloc(0, job="4242"),
        alloc(0, job="4243"),
        alloc(1, job="88"),
        alloc(1, 2, job="77_3"),
        alloc(1, 5, job="9001+1"),
    ]
    assert not allocations[0].HasField("gpu_instance_id")
    assert allocations[3].gpu_instance_id == 2


def test_junk_in_job_files_is_counted_never_fatal(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "0": b"4242\n\xff\xfe\x00\x01junk\n" + b"9" * 65 + b"\n" + b"9" * 64 + b"\n12 34\n\x1b[31m\n",
            "7": b"1\n",  # no GPU 7 on this node
            "1.9": b"2\n",  # no GPU instance 9 on GPU 1
            "0.1": b"3\n",  # GPU 0 has no MIG instances at all
            "README": b"job files\n",
            "-1": b"4\n",
            "\uff11": b"5\n",  # a full-width digit one is no GPU index
            "1": b"\x00" * 10,  # one line, all NUL: no job id
        },
    )
    mapping = JobMappingDir(tmp_path)
    allocations, rejected = allocations_from_job_files(mapping.read(), node(2, mig={1: [1]}))
    assert allocations == [alloc(0, job="4242"), alloc(0, job="9" * 64)]
    # GPU 0: junk, 65 chars, a space, an escape; GPU 1: the NULs; six names that name nothing.
    assert rejected == 4 + 1 + 6
    assert mapping.errors == 0  # every file could be read; what was in them is another count


def test_entries_that_are_not_regular_files_are_skipped_and_counted(tmp_path: Path) -> None:
    write(tmp_path, {"0": b"4242\n", "elsewhere": b"root:secret\n"})
    os.mkfifo(tmp_path / "1")  # nobody writes it: reading must not block
    (tmp_path / "2").symlink_to(tmp_path / "gone")  # dangling
    (tmp_path / "3").symlink_to(tmp_path / "elsewhere")  # not followed: it could point anywhere
    (tmp_path / "4").mkdir()
    mapping = JobMappingDir(tmp_path)
    files = mapping.read()
    assert sorted(files) == ["0", "elsewhere"]
    assert mapping.errors == 4
    mapping.read()
    assert mapping.errors == 8  # counted each time, since the mapping was made
    allocations, rejected = allocations_from_job_files(files, node(5))
    assert allocations == [alloc(0, job="4242")]
    assert rejected == 1  # "elsewhere"


def test_an_oversized_file_gives_its_complete_lines(tmp_path: Path) -> None:
    line = b"%06d\n"
    count = MAX_JOB_FILE_BYTES // 7 + 100  # past the limit, the limit falling inside a line
    write(tmp_path, {"0": b"".join(line % i for i in range(count))})
    mapping = JobMappingDir(tmp_path)
    files = mapping.read()
    assert mapping.errors == 1
    assert len(files["0"]) <= MAX_JOB_FILE_BYTES
    assert files["0"].endswith(b"\n")
    allocations, rejected = allocations_from_job_files(files, node(1))
    assert rejected == 0
    assert len(allocations) == MAX_JOB_FILE_BYTES // 7
    assert allocations[-1].job == f"{MAX_JOB_FILE_BYTES // 7 - 1:06d}"


def test_past_the_file_limit_names_are_counted(tmp_path: Path) -> None:
    write(tmp_path, {str(i): f"{i}\n".encode() for i in range(5)})
    mapping = JobMappingDir(tmp_path, max_files=3)
    assert sorted(mapping.read()) == ["0", "1", "2"]
    assert mapping.errors == 2


def test_an_empty_directory_is_no_jobs(tmp_path: Path) -> None:
    mapping = JobMappingDir(tmp_path)
    assert mapping.read() == {}
    assert allocations_from_job_files({}, node()) == ([], 0)


def test_a_missing_directory_names_the_flag(tmp_path: Path) -> None:
    absent = re.escape(str(tmp_path / "absent"))
    with pytest.raises(AttributionFailed, match=f"{absent} does not exist.*{JOB_MAPPING_DIR_FLAG}"):
        JobMappingDir(tmp_path / "absent").read()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(AttributionFailed, match=f"cannot list .*{JOB_MAPPING_DIR_FLAG}.*Not a directory"):
        JobMappingDir(tmp_path / "file").read()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is root's alone)."""
    with tempfile.TemporaryDirectory() as name:
        os.chmod(name, 0o755)
        yield Path(name)


def as_nobody(read: Callable[[], object]) -> object:
    """``read()`` in a forked child that gave up root for uid 65534; what it returned, via JSON.

    Forked, not a new interpreter: another user may not run this venv's Python.
    """
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        status = 1
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(writer, json.dumps(read()).encode())
            status = 0
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(status)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(output)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run a reader as another user")
def test_a_file_the_agent_may_not_read_is_skipped_and_counted(shared_dir: Path) -> None:
    write(shared_dir, {"0": b"4242\n", "1": b"4343\n"})
    (shared_dir / "1").chmod(0o600)

    def read() -> object:
        mapping = JobMappingDir(shared_dir)
        return {"files": sorted(mapping.read()), "errors": mapping.errors}

    assert as_nobody(read) == {"files": ["0"], "errors": 1}


# -- GPU processes' environments --------------------------------------------------------


class Spawn(Protocol):
    def __call__(self, env: dict[str, str] | None = None, *, user: int | None = None) -> int: ...


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start real ``sleep`` processes with a given environment (and uid); all killed afterwards."""
    children: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str] | None = None, *, user: int | None = None) -> int:
        child = subprocess.Popen(
            ["sleep", "30"],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
            user=user,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        children.append(child)
        # Popen returns once exec began; the kernel sets the new environment up a moment later.
        environ = Path(f"/proc/{child.pid}/environ")
        wait_until(environ.read_bytes, timeout=5, interval=0.001, what="the child's exec")
        return child.pid

    try:
        yield start
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait(timeout=10)


def exited_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait(timeout=10)
    return child.pid


def never_a_pid() -> int:
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


ME = pwd.getpwuid(os.getuid()).pw_name


def test_environ_and_owner_of_a_real_process(spawn: Spawn) -> None:
    pid = spawn({**SLURM_ENV, "EQUALS": "a=b=c", "EMPTY": ""})
    environs = ProcEnvirons()
    environment = environs.environ(pid)
    assert {k: v for k, v in environment.items() if k != "PATH"} == {
        **SLURM_ENV,
        "EQUALS": "a=b=c",
        "EMPTY": "",
    }
    assert environs.owner(pid) == ME


def test_an_environment_is_read_up_to_its_limit(spawn: Spawn) -> None:
    pid = spawn({"A_FIRST": "1", "B_LONG": "x" * 5000, "C_LAST": "3"})
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    cut = raw.index(b"B_LONG=") + 100  # the limit falls inside B_LONG
    environment = ProcEnvirons(max_bytes=cut).environ(pid)
    assert "B_LONG" not in environment  # cut in two: dropped, not reported half
    assert "C_LAST" not in environment
    assert ProcEnvirons().environ(pid)["C_LAST"] == "3"


def test_environment_bytes_that_are_not_utf8_are_replaced(spawn: Spawn) -> None:
    pid = spawn({"SLURM_JOB_ID": "17", "SLURM_JOB_NAME": os.fsdecode(b"caf\xe9")})
    environment = ProcEnvirons().environ(pid)
    assert environment["SLURM_JOB_NAME"] == "caf\ufffd"
    allocations, failures = allocations_from_processes({Target(0): [pid]}, ProcEnvirons())
    assert failures == 0
    assert allocations[0].job_name == "caf\ufffd"


def test_a_process_that_has_exited_fails_with_a_reason() -> None:
    environs = ProcEnvirons()
    for pid in (exited_pid(), never_a_pid()):
        with pytest.raises(AttributionFailed, match=f"process {pid} has exited"):
            environs.environ(pid)
        with pytest.raises(AttributionFailed, match=f"process {pid} has exited"):
            environs.owner(pid)
    with pytest.raises(AttributionFailed, match="no process id"):
        environs.environ(0)


def test_gpu_processes_give_slurm_jobs_and_owners(spawn: Spawn) -> None:
    job_a = spawn(SLURM_ENV)
    job_a_again = spawn(SLURM_ENV)  # a second rank of the same job: the same allocation
    # No SLURM_JOB_USER, account or name: the owner is the user.
    job_b = spawn({"SLURM_JOB_ID": "5000", "SLURM_JOB_PARTITION": "debug"})
    plain = spawn({"HOME": "/root"})  # outside Slurm: only its owner is known
    mig_job = spawn({**SLURM_ENV, "SLURM_JOB_ID": "6000", "SLURM_JOB_NAME": "small"})
    junk_job = spawn({"SLURM_JOB_ID": "not a job id"})  # counted, and still its owner
    processes = {
        Target(1): [plain, job_b],
        Target(0): [job_a_again, job_a, exited_pid(), never_a_pid()],
        Target(1, 3): [mig_job, job_a],  # one process may use several GPUs
    }
    allocations, failures = allocations_from_processes(processes, ProcEnvirons())
    junk, junk_failures = allocations_from_processes({Target(1): [junk_job]}, ProcEnvirons())
    alice = {"user": "alice", "account": "physics", "partition": "gpu"}
    assert failures == 2  # the two gone processes; nothing else is fatal
    assert allocations == [  # in index order, and on each in the order of its processes
        alloc(0, job="4242", job_name="train-llm", **alice),
        alloc(1, source="process", user=ME),
        alloc(1, job="5000", user=ME, partition="debug"),
        alloc(1, 3, job="6000", job_name="small", **alice),
        alloc(1, 3, job="4242", job_name="train-llm", **alice),
    ]
    assert junk == [alloc(1, source="process", user=ME)]
    assert junk_failures == 1


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start processes as other users")
def test_owners_are_real_uids_by_name_or_number(spawn: Spawn) -> None:
    nobody = spawn({"HOME": "/"}, user=NOBODY)
    nameless = spawn({"SLURM_JOB_ID": "77"}, user=NAMELESS_UID)
    environs = ProcEnvirons()
    assert environs.owner(nobody) == "nobody"
    assert environs.owner(nameless) == str(NAMELESS_UID)
    allocations, failures = allocations_from_processes({Target(0): [nobody, nameless]}, environs)
    assert failures == 0
    assert sorted(allocations, key=lambda a: a.source) == [
        alloc(0, source="process", user="nobody"),
        alloc(0, job="77", user=str(NAMELESS_UID)),
    ]


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run a reader as another user")
def test_an_environment_another_user_may_not_read(spawn: Spawn) -> None:
    pid = spawn(SLURM_ENV)  # root's, read by nobody: EACCES, as for an agent without privileges

    def read() -> object:
        error = ""
        try:
            ProcEnvirons().environ(pid)
        except AttributionFailed as exc:
            error = str(exc)
        allocations, failures = allocations_from_processes({Target(0): [pid]}, ProcEnvirons())
        return {
            "error": error,
            "failures": failures,
            "allocations": [[a.source, a.user] for a in allocations],
        }

    result = as_nobody(read)
    assert isinstance(result, dict)
    assert f"cannot read /proc/{pid}/environ: permission denied" in result["error"]
    assert "needs root or CAP_SYS_PTRACE" in result["error"]
    assert result["failures"] == 1
    assert result["allocations"] == [["process", ME]]  # the owner is still known


@pytest.mark.skipif(IS_ROOT, reason="root may read every environment")
def test_an_environment_this_user_may_not_read() -> None:
    if os.stat("/proc/1").st_uid == os.getuid():
        pytest.skip("pid 1 is this user's own")
    with pytest.raises(AttributionFailed, match=r"permission denied.*needs root or CAP_SYS_PTRACE"):
        ProcEnvirons().environ(1)


class DeniedEnvirons:
    """Environs whose environments are denied (as without CAP_SYS_PTRACE) but whose owners are known."""

    def __init__(self, owners: dict[int, str]) -> None:
        self.owners = owners

    def environ(self, pid: int) -> dict[str, str]:
        raise PermissionError(13, "Permission denied")

    def owner(self, pid: int) -> str:
        if pid not in self.owners:
            raise AttributionFailed(f"process {pid} has exited")
        return self.owners[pid]


def test_denied_environments_still_give_owners() -> None:
    allocations, failures = allocations_from_processes(
        {Target(0): [1, 2, 3]}, DeniedEnvirons({1: "bob", 2: "bob"})
    )
    assert allocations == [alloc(0, source="process", user="bob")]
    assert failures == 3  # each pid once, however many of its reads failed


# -- one node's Slurm allocations -------------------------------------------------------


def test_merge_fills_job_files_from_processes() -> None:
    from_files = [alloc(0, job="4242"), alloc(0, job="4243"), alloc(1, job="4242"), alloc(1, 2, job="77")]
    from_processes = [
        alloc(0, job="4242", user="alice", account="physics"),
        alloc(0, job="4242", user="alice", partition="gpu", job_name="train"),  # a second rank
        alloc(0, source="process", user="alice"),  # said better by job 4242: dropped
        alloc(0, source="process", user="carol"),  # on the GPU outside any job: kept
        alloc(0, source="process", user="carol"),
        alloc(1, 2, job="77", user="dave"),
        alloc(1, 2, source="process", user="alice"),  # no Slurm allocation here names alice: kept
        alloc(2, job="9000", user="erin"),  # only the environment names it: kept
        alloc(2, source="process", user="erin"),
    ]
    assert merge_slurm(from_files, from_processes) == [
        alloc(0, job="4242", user="alice", account="physics", partition="gpu", job_name="train"),
        alloc(0, job="4243"),  # nothing said more
        alloc(0, source="process", user="carol"),
        # No process of job 4242 on GPU 1: its values are the job's, from GPU 0.
        alloc(1, job="4242", user="alice", account="physics", partition="gpu", job_name="train"),
        alloc(1, 2, job="77", user="dave"),
        alloc(1, 2, source="process", user="alice"),
        alloc(2, job="9000", user="erin"),
    ]


def test_merge_prefers_values_from_the_same_gpu() -> None:
    from_files = [alloc(1, job="5"), alloc(0, job="5")]
    from_processes = [alloc(0, job="5", user="x", job_name="on-0"), alloc(1, job="5", job_name="on-1")]
    merged = merge_slurm(from_files, from_processes)
    assert merged == [
        alloc(0, job="5", user="x", job_name="on-0"),
        alloc(1, job="5", user="x", job_name="on-1"),
    ]
    assert merge_slurm([], []) == []
    process_only = [alloc(0, source="process", user="u")]
    assert merge_slurm([], process_only) == process_only
    assert merge_slurm(from_files, from_processes) == merged  # the same every time


def test_gpu_processes_reported_by_nvml_map_to_jobs(spawn: Spawn, tmp_path: Path) -> None:
    """NVML reports real processes; their pids, read through /proc, name jobs merged with the job files."""
    job = spawn(SLURM_ENV)
    other_job = spawn({"SLURM_JOB_ID": "5000", "SLURM_JOB_USER": "bob"})
    outsider = spawn()
    h100, a100 = h100_table(), a100_table()
    h100["processes"] = [
        SimpleNamespace(pid=job, usedGpuMemory=30 * 2**30),
        SimpleNamespace(pid=outsider, usedGpuMemory=None),
    ]
    a100["processes"] = [SimpleNamespace(pid=other_job, usedGpuMemory=2**30)]
    source = NvmlSource(fake_node(h100, a100), watch_xids=False)
    try:
        targets = Targets(source.inventory())
        samples = source.sample(with_processes=True)
    finally:
        source.close()
    processes = {Target(s.index): [p.pid for p in s.processes.processes] for s in samples}
    assert processes == {Target(0): [job, outsider], Target(1): [other_job]}
    assert samples[0].processes.processes[0].name == "sleep"
    from_processes, failures = allocations_from_processes(processes, ProcEnvirons())
    assert failures == 0
    write(tmp_path, {"0": b"4242\n", "1": b"5000\n5001\n"})
    from_files, rejected = allocations_from_job_files(JobMappingDir(tmp_path).read(), targets)
    assert rejected == 0
    assert merge_slurm(from_files, from_processes) == [
        alloc(0, job="4242", user="alice", account="physics", partition="gpu", job_name="train-llm"),
        alloc(0, source="process", user=ME),
        alloc(1, job="5000", user="bob"),
        alloc(1, job="5001"),
    ]
