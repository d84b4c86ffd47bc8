"""tools/gpu_check.py: the agent's output against nvidia-smi's, on the fake NVML and a recorded document."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpufleet.agent.main import print_once
from gpufleet.agent.node import NodeIdentity
from gpufleet.agent.sources.nvml import NvmlSource
from tests.conftest import ROOT
from tests.fake_nvml import a100_table, fake_node, h100_table

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check

SMI_XML = ROOT / "tests" / "data" / "nvidia-smi-q-x-2xh100.xml"
SMI_LIST = ROOT / "tests" / "data" / "nvidia-smi-L-2xh100.txt"
# One H100 in MIG mode: the fake after set_mig(0, MIG_PROFILES).
MIG_XML = ROOT / "tests" / "data" / "nvidia-smi-q-x-h100-mig.xml"
MIG_LIST = ROOT / "tests" / "data" / "nvidia-smi-L-h100-mig.txt"
MIG_PROFILES = ["3g.40gb", "2g.20gb", "1g.10gb"]
DOC = ROOT / "docs" / "real-gpu.md"
# Every command docs/real-gpu.md shows, each run by a test below.
DOC_COMMANDS = {
    "python tools/gpu_check.py",
    "python tools/gpu_check.py --json",
    "python tools/gpu_check.py --save gpu-check",
    "python tools/gpu_check.py --agent-json gpu-check/agent.json --smi-xml gpu-check/nvidia-smi.xml "
    "--smi-list gpu-check/nvidia-smi-L.txt",
}
NOT_SUPPORTED_BY_THE_FAKE = {"fan_speed"}


def h100_pair() -> list[dict[str, Any]]:
    """The node the recorded document describes: two H100s, each with its own serial."""
    first, second = h100_table(), h100_table()
    second["serial"] = "1654922001235"
    return [first, second]


def agent_json(
    tables: list[dict[str, Any]], lost: tuple[int, ...] = (), mig: dict[int, list[str]] | None = None
) -> str:
    """What `gpufleet-agent --once` prints for a node with these fake GPUs (``mig``: profiles by GPU)."""
    nvml = fake_node(*tables)
    for index in lost:
        nvml.gpus[index].lost = True
    for index, profiles in (mig or {}).items():
        nvml.set_mig(index, profiles)
    source = NvmlSource(nvml, watch_xids=False)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            print_once(source, NodeIdentity(node_id="gpu-check", hostname="h100-node", boot_id="boot"))
    finally:
        source.close()
    return out.getvalue()


def smi_xml() -> str:
    return SMI_XML.read_text()


def rows_for(agent: str, smi: str, listing: str | None = None) -> list[gpu_check.Row]:
    return gpu_check.compare(gpu_check.parse_agent(agent), gpu_check.parse_smi(smi, listing))


def not_matching(rows: list[gpu_check.Row]) -> set[tuple[str, int | None, str]]:
    return {(row.field, row.gpu, row.verdict) for row in rows if row.verdict != gpu_check.MATCH}


def run_tool(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def doc_command(command: str, tmp_path: Path) -> list[str]:
    """A command from the doc as argv: this interpreter, its gpu-check/ folder under tmp_path."""
    argv = command.split()
    assert argv[:2] == ["python", "tools/gpu_check.py"]
    rest = [str(tmp_path / arg) if arg.startswith("gpu-check") else arg for arg in argv[2:]]
    return [sys.executable, str(ROOT / "tools" / "gpu_check.py"), *rest]


def path_without_nvidia_smi(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    return {**os.environ, "PATH": f"{empty}{os.pathsep}{Path(sys.executable).parent}"}


def nvml_starts() -> bool:
    """True on a host where the real NVML works (the no-GPU tests do not apply there)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


def test_recorded_h100_node_matches_the_fake_nvml() -> None:
    rows = rows_for(agent_json(h100_pair()), smi_xml())
    assert not_matching(rows) == set()
    compared = {field.name for field in gpu_check.GPU_FIELDS} - NOT_SUPPORTED_BY_THE_FAKE
    for gpu in (0, 1):
        assert {row.field for row in rows if row.gpu == gpu} == compared
    assert {row.field for row in rows if row.gpu is None} == {"driver_version", "cuda_version"}
    by_key = {(row.field, row.gpu): row for row in rows}
    # Units normalized to nvidia-smi's: bytes -> MiB, milliwatts -> W, ns -> ms, bytes/s -> KB/s.
    assert by_key["memory_total", 0].agent == 81_559
    assert by_key["power_limit_min", 1].agent == 200.0
    assert by_key["throttle_power_cap", 0].agent == 5.0
    assert by_key["pcie_rx", 0].agent == 3400
    assert by_key["ecc_corrected_aggregate", 1].smi == 2  # SRAM and DRAM counts summed


def test_a_different_serial_and_a_power_limit_100_w_off_are_exactly_the_mismatches(tmp_path: Path) -> None:
    altered = smi_xml().replace("<serial>1654922001235</serial>", "<serial>1654922009999</serial>")
    # The first default limit in the document is GPU 0's.
    altered = altered.replace(
        "<default_power_limit>700.00 W</default_power_limit>",
        "<default_power_limit>600.00 W</default_power_limit>",
        1,
    )
    rows = rows_for(agent_json(h100_pair()), altered)
    assert not_matching(rows) == {
        ("serial", 1, gpu_check.MISMATCH),
        ("power_limit_default", 0, gpu_check.MISMATCH),
    }
    (tmp_path / "agent.json").write_text(agent_json(h100_pair()))
    (tmp_path / "nvidia-smi.xml").write_text(altered)
    code = gpu_check.main(
        ["--agent-json", str(tmp_path / "agent.json"), "--smi-xml", str(tmp_path / "nvidia-smi.xml")]
    )
    assert code == gpu_check.EXIT_MISMATCH


def test_the_fan_the_fake_does_not_support_is_skipped_or_only_nvidia_smi() -> None:
    agent = agent_json(h100_pair())
    rows = rows_for(agent, smi_xml())
    assert not [row for row in rows if row.field == "fan_speed"]
    assert gpu_check.not_reported(rows) == ["fan_speed"]
    with_fan = smi_xml().replace("<fan_speed>N/A</fan_speed>", "<fan_speed>0 %</fan_speed>")
    rows = rows_for(agent, with_fan)
    assert not_matching(rows) == {("fan_speed", 0, gpu_check.ONLY_SMI), ("fan_speed", 1, gpu_check.ONLY_SMI)}
    assert gpu_check.summary(rows)[gpu_check.MISMATCH] == 0


def test_live_values_get_a_tolerance_identity_values_none() -> None:
    altered = smi_xml()
    for old, new in (
        ("<average_power_draw>612.34 W", "<average_power_draw>630.00 W"),  # GPU 0: 18 W off
        ("<average_power_draw>612.34 W", "<average_power_draw>400.00 W"),  # GPU 1: 212 W off
        ("<gpu_temp>64 C</gpu_temp>", "<gpu_temp>66 C</gpu_temp>"),  # GPU 0
        ("<total>81559 MiB</total>", "<total>81561 MiB</total>"),  # GPU 0
    ):
        altered = altered.replace(old, new, 1)
    rows = rows_for(agent_json(h100_pair()), altered)
    assert not_matching(rows) == {
        ("power_draw", 1, gpu_check.MISMATCH),
        ("memory_total", 0, gpu_check.MISMATCH),
    }
    live = {row.field for row in rows if row.live}
    assert {"power_draw", "gpu_temperature", "memory_used", "sm_clock", "gpu_utilization"} <= live
    assert not live & {"serial", "uuid", "memory_total", "power_limit_default", "ecc_corrected_aggregate"}


def test_a_gpu_the_agent_lost_is_paired_by_index_and_reported_only_by_nvidia_smi() -> None:
    rows = rows_for(agent_json(h100_pair(), lost=(1,)), smi_xml())
    assert gpu_check.summary(rows)[gpu_check.MISMATCH] == 0
    second = [row for row in rows if row.gpu == 1]
    assert second and {row.verdict for row in second} == {gpu_check.ONLY_SMI}
    assert {row.verdict for row in rows if row.gpu == 0} == {gpu_check.MATCH}


OLDER_LAYOUT = """<?xml version="1.0" ?>
<!DOCTYPE nvidia_smi_log SYSTEM "nvsmi_device_v11.dtd">
<nvidia_smi_log>
  <driver_version>470.182.03</driver_version>
  <cuda_version>11.4</cuda_version>
  <attached_gpus>1</attached_gpus>
  <gpu id="0000:3B:00.0">
    <product_name>Tesla V100-SXM2-32GB</product_name>
    <persistence_mode>Disabled</persistence_mode>
    <mig_mode><current_mig>N/A</current_mig></mig_mode>
    <serial>0323618012345</serial>
    <uuid>GPU-5f0b6b35-0000-1111-2222-333344445555</uuid>
    <pci><replay_counter>0</replay_counter><tx_util>[N/A]</tx_util></pci>
    <fan_speed>N/A</fan_speed>
    <performance_state>P8</performance_state>
    <clocks_throttle_reasons>
      <clocks_throttle_reason_gpu_idle>Active</clocks_throttle_reason_gpu_idle>
      <clocks_throttle_reason_sw_power_cap>Not Active</clocks_throttle_reason_sw_power_cap>
      <clocks_throttle_reason_hw_slowdown>Active</clocks_throttle_reason_hw_slowdown>
    </clocks_throttle_reasons>
    <fb_memory_usage><total>32510 MiB</total><used>0 MiB</used><free>32510 MiB</free></fb_memory_usage>
    <ecc_mode><current_ecc>Enabled</current_ecc></ecc_mode>
    <ecc_errors>
      <volatile>
        <single_bit><device_memory>3</device_memory><register_file>0</register_file><total>3</total></single_bit>
        <double_bit><device_memory>0</device_memory><total>0</total></double_bit>
      </volatile>
      <aggregate>
        <single_bit><total>12</total></single_bit>
        <double_bit><total>1</total></double_bit>
      </aggregate>
    </ecc_errors>
    <remapped_rows>N/A</remapped_rows>
    <temperature><gpu_temp>35 C</gpu_temp><memory_temp>[N/A]</memory_temp></temperature>
    <power_readings>
      <power_state>P8</power_state>
      <power_draw>41.23 W</power_draw>
      <power_limit>300.00 W</power_limit>
      <default_power_limit>300.00 W</default_power_limit>
      <enforced_power_limit>250.00 W</enforced_power_limit>
      <min_power_limit>150.00 W</min_power_limit>
      <max_power_limit>300.00 W</max_power_limit>
    </power_readings>
    <clocks><sm_clock>135 MHz</sm_clock><mem_clock>877 MHz</mem_clock></clocks>
    <max_clocks><sm_clock>1530 MHz</sm_clock><mem_clock>877 MHz</mem_clock></max_clocks>
  </gpu>
</nvidia_smi_log>
"""


def test_older_nvidia_smi_layouts_are_read_too() -> None:
    snapshot = gpu_check.parse_smi(OLDER_LAYOUT)
    assert snapshot["node"] == {"driver_version": "470.182.03", "cuda_version": "11.4"}
    gpu = snapshot["00000000:3B:00.0"]  # the bus id from the id attribute, in NVML's form
    assert gpu["power_draw"] == 41.23
    assert gpu["power_limit_enforced"] == 250.0  # not <power_limit>, the requested one
    assert gpu["clock_event_reasons"] == 0x1 | 0x8
    assert gpu["performance_state"] == 8
    assert (gpu["ecc_corrected_volatile"], gpu["ecc_uncorrected_aggregate"]) == (3, 1)
    assert gpu["persistence_enabled"] is False
    absent = {"memory_reserved", "memory_temperature", "pcie_tx", "mig_enabled", "fan_speed"}
    absent |= {"remapped_rows_correctable", "row_remap_pending", "throttle_power_cap"}
    assert not absent & set(gpu)


def test_newer_layouts_sum_sram_and_dram_counts() -> None:
    xml = """<nvidia_smi_log><gpu id="00000000:01:00.0"><ecc_errors>
        <volatile><sram_correctable>1</sram_correctable><sram_uncorrectable>2</sram_uncorrectable>
        <dram_correctable>3</dram_correctable><dram_uncorrectable>N/A</dram_uncorrectable></volatile>
        <aggregate><sram_uncorrectable_parity>1</sram_uncorrectable_parity>
        <sram_uncorrectable_secded>1</sram_uncorrectable_secded><dram_uncorrectable>1</dram_uncorrectable>
        </aggregate></ecc_errors>
        <gpu_recovery_action>Drain and Reset</gpu_recovery_action></gpu></nvidia_smi_log>"""
    gpu = gpu_check.parse_smi(xml)["00000000:01:00.0"]
    assert (gpu["ecc_corrected_volatile"], gpu["ecc_uncorrected_volatile"]) == (4, 2)
    assert gpu["ecc_uncorrected_aggregate"] == 3
    assert gpu["recovery_action"] == "drain and reset"


def test_json_output_has_the_rows_and_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "agent.json").write_text(agent_json(h100_pair()))
    code = gpu_check.main(["--json", "--agent-json", str(tmp_path / "agent.json"), "--smi-xml", str(SMI_XML)])
    result = json.loads(capsys.readouterr().out)
    assert code == gpu_check.EXIT_OK
    assert result["summary"][gpu_check.MISMATCH] == 0
    assert result["summary"][gpu_check.MATCH] == len(result["rows"])
    assert result["not_reported"] == ["fan_speed"]
    assert result["sample_ms_per_gpu"] is None  # recorded inputs: nothing to time
    assert result["first_sample_ms_per_gpu"] is None and result["gpm"] is None
    assert result["notes"] == []
    row = next(r for r in result["rows"] if r["field"] == "power_limit_max" and r["gpu"] == 0)
    assert row == {
        "field": "power_limit_max",
        "gpu": 0,
        "agent": 700.0,
        "nvidia_smi": 700.0,
        "unit": "W",
        "live": False,
        "verdict": "match",
    }


def test_the_first_sample_and_the_later_ones_with_gpm_are_timed_per_gpu() -> None:
    nvml = fake_node(*h100_pair())
    measured = gpu_check.measure(nvml, 3, interval_s=0.15, gap_s=0.11)
    assert (measured.gpus, measured.later_samples, measured.gpus_with_gpm) == (2, 3, 2)
    assert 0 < measured.first_ms < 1000 and 0 < measured.later_ms < 1000
    # Every later sample computed GPM metrics, one call per GPU: they are timed with GPM's cost.
    assert nvml.calls["nvmlGpmMetricsGet"] == 3 * 2
    assert nvml.gpm_samples_in_use() == 0  # the source was closed


def test_recorded_files_on_the_command_line(tmp_path: Path) -> None:
    # Covers the doc's `python tools/gpu_check.py --agent-json gpu-check/agent.json
    # --smi-xml gpu-check/nvidia-smi.xml --smi-list gpu-check/nvidia-smi-L.txt`.
    command = next(c for c in DOC_COMMANDS if "--agent-json" in c)
    (tmp_path / "gpu-check").mkdir()
    (tmp_path / "gpu-check" / "agent.json").write_text(agent_json(h100_pair()))
    shutil.copy(SMI_XML, tmp_path / "gpu-check" / "nvidia-smi.xml")
    shutil.copy(SMI_LIST, tmp_path / "gpu-check" / "nvidia-smi-L.txt")
    done = subprocess.run(
        doc_command(command, tmp_path), capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == gpu_check.EXIT_OK, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["field", "gpu", "agent", "nvidia-smi", "verdict"]
    assert re.search(
        r"^2 GPUs, \d+ values: \d+ match, 0 mismatch, 0 only agent, 0 only nvidia-smi$", done.stdout, re.M
    )
    assert "serial  1  1654922001235  1654922001235  match" in re.sub(r" {2,}", "  ", done.stdout)
    assert "GPM" not in done.stdout  # recorded outputs: no samples of the check's own


@pytest.mark.parametrize("command", sorted(c for c in DOC_COMMANDS if "--agent-json" not in c))
def test_without_nvidia_smi_the_doc_commands_say_so_in_one_line(command: str, tmp_path: Path) -> None:
    # Covers the doc's live commands: `python tools/gpu_check.py`, with `--json`, with `--save gpu-check`.
    done = subprocess.run(
        doc_command(command, tmp_path),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=path_without_nvidia_smi(tmp_path),
        timeout=120,
    )
    assert done.returncode == gpu_check.EXIT_NO_GPU
    assert done.stderr == ""
    (line,) = done.stdout.splitlines()
    if "--json" in command:
        assert json.loads(line) == {"result": "no GPU", "reason": "nvidia-smi not found"}
    else:
        assert line == "no NVIDIA GPU here: nvidia-smi not found; nothing to check"
    assert not (tmp_path / "gpu-check").exists()


PYNVML_STAND_IN = f"""\"\"\"pynvml for a subprocess: the two fake H100s the recorded document describes.\"\"\"
import sys

sys.path.insert(0, {str(ROOT)!r})
from tests.fake_nvml import fake_node, h100_table

_second = h100_table()
_second["serial"] = "1654922001235"
_node = fake_node(h100_table(), _second)
NVMLError = _node.NVMLError


def __getattr__(name):
    return getattr(_node, name)
"""


def stand_ins(tmp_path: Path) -> dict[str, str]:
    """An environment whose nvidia-smi prints the recorded outputs and whose pynvml is the fake."""
    env = path_without_nvidia_smi(tmp_path)
    fake_smi = tmp_path / "empty-bin" / "nvidia-smi"
    cat = shutil.which("cat")
    fake_smi.write_text(
        f'#!/bin/sh\nif [ "$1" = -L ]; then exec {cat} {SMI_LIST}; fi\nexec {cat} {SMI_XML}\n'
    )
    fake_smi.chmod(0o755)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "pynvml.py").write_text(PYNVML_STAND_IN)
    return {**env, "PYTHONPATH": str(tmp_path / "site")}


@pytest.mark.parametrize(
    "command", ["python tools/gpu_check.py", "python tools/gpu_check.py --save gpu-check"]
)
def test_the_live_path_with_stand_ins_for_nvidia_smi_and_nvml(command: str, tmp_path: Path) -> None:
    # Covers the doc's `python tools/gpu_check.py` and `--save gpu-check` as they run on a GPU host:
    # both commands run for real, only nvidia-smi and the NVML library are stand-ins.
    env = stand_ins(tmp_path)
    done = subprocess.run(
        doc_command(command, tmp_path), capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert done.returncode == gpu_check.EXIT_OK, done.stdout + done.stderr
    assert done.stderr == ""  # what NVML logs in the check's own samples is in its output
    assert re.search(r"^2 GPUs, \d+ values: \d+ match, 0 mismatch, 0 only agent", done.stdout, re.M)
    assert re.search(r"^GPM from the check's own NVML samples, 1 s apart \(informational", done.stdout, re.M)
    gpm_rows = re.findall(
        r"^gpm +(\d) +present \(graphics 0\.97, sm_active 0\.62, .*\); within 0-1$", done.stdout, re.M
    )
    assert gpm_rows == ["0", "1"]
    assert re.search(r"^first sample: \d+\.\d+ ms per GPU \(no GPM metrics yet", done.stdout, re.M)
    assert re.search(
        r"^later samples: \d+\.\d+ ms per GPU \(mean of 5 samples of 2 GPUs, with GPM metrics on 2\)$",
        done.stdout,
        re.M,
    )
    saved = tmp_path / "gpu-check"
    if "--save" in command:
        assert (
            gpu_check.parse_agent((saved / "agent.json").read_text())["node"]["driver_version"] == "565.57.01"
        )
        assert (saved / "nvidia-smi.xml").read_text() == smi_xml()
        assert (saved / "nvidia-smi-L.txt").read_text() == SMI_LIST.read_text()
        result = json.loads((saved / "result.json").read_text())
        assert result["sample_ms_per_gpu"] > 0 and result["first_sample_ms_per_gpu"] > 0
        assert result["samples_timed"] == 5 and result["gpm_interval_s"] == 1.0
        assert [(r["gpu"], r["present"], r["within_0_1"]) for r in result["gpm"]] == [
            (0, True, True),
            (1, True, True),
        ]
        assert result["gpm"][0]["shares"]["tensor"] == 0.455
        assert result["nvidia_smi_list"] == "nvidia-smi -L"
    else:
        assert not saved.exists()


@pytest.mark.skipif(nvml_starts(), reason="NVML works on this host")
def test_an_agent_that_cannot_start_nvml_is_one_line(tmp_path: Path) -> None:
    env = path_without_nvidia_smi(tmp_path)
    # Against a recorded nvidia-smi document, an agent without NVML means there is no GPU here.
    done = run_tool("--smi-xml", str(SMI_XML), env=env)
    assert done.returncode == gpu_check.EXIT_NO_GPU, done.stdout + done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith("no NVIDIA GPU here: NVML could not start")
    # Where nvidia-smi answers, the agent failing to is an error, not an empty host.
    env = stand_ins(tmp_path)
    del env["PYTHONPATH"]  # nvidia-smi prints the recorded document; the agent gets the real NVML
    done = run_tool(env=env)
    assert done.returncode == gpu_check.EXIT_ERROR
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: gpufleet-agent --once failed: NVML could not start")


def test_save_writes_what_was_compared(tmp_path: Path) -> None:
    recorded = agent_json(h100_pair())
    (tmp_path / "agent.json").write_text(recorded)
    saved = tmp_path / "saved"
    args = ["--agent-json", str(tmp_path / "agent.json"), "--smi-xml", str(SMI_XML), "--save", str(saved)]
    assert gpu_check.main(args) == gpu_check.EXIT_OK
    assert (saved / "agent.json").read_text() == recorded
    assert (saved / "nvidia-smi.xml").read_text() == smi_xml()
    assert json.loads((saved / "result.json").read_text())["summary"][gpu_check.MISMATCH] == 0


def test_an_unreadable_input_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "agent.json").write_text(agent_json(h100_pair()))
    (tmp_path / "bad.xml").write_text("nvidia-smi: command not found\n")
    done = run_tool("--agent-json", str(tmp_path / "agent.json"), "--smi-xml", str(tmp_path / "bad.xml"))
    assert done.returncode == gpu_check.EXIT_ERROR
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: not an nvidia-smi XML document")


def mig_node() -> Any:
    """The fake node the recorded MIG document describes."""
    nvml = fake_node(h100_table())
    nvml.set_mig(0, MIG_PROFILES)
    return nvml


def mig_rows(xml: str | None = None, listing: str | None = None) -> list[gpu_check.Row]:
    agent = agent_json([h100_table()], mig={0: MIG_PROFILES})
    return rows_for(agent, MIG_XML.read_text() if xml is None else xml, listing)


def test_a_mig_gpu_matches_the_recorded_mig_document() -> None:
    rows = mig_rows(listing=MIG_LIST.read_text())
    assert not_matching(rows) == set()
    by_field = {row.field: row for row in rows if row.gpu == 0}
    assert by_field["mig_enabled"].agent is True
    assert by_field["mig_instances"].agent == by_field["mig_instances"].smi == "1/0 3/0 7/0"
    mig = [row.field for row in rows if row.field.startswith("mig[")]
    assert mig == [
        f"mig[{ids}].{name}"
        for ids in ("1/0", "3/0", "7/0")
        for name in ("index", "uuid", "profile", "memory_total")
    ]
    assert (by_field["mig[1/0].profile"].smi, by_field["mig[7/0].memory_total"].agent) == ("3g.40gb", 9984)
    assert by_field["mig[3/0].uuid"].smi == "MIG-00000001-eeee-ffff-0000-111111111111"
    assert by_field["mig[3/0].index"].smi == 1
    # In MIG mode NVML reads no utilization and no row remapping, and nvidia-smi shows N/A.
    assert {"gpu_utilization", "row_remap_pending"} <= set(gpu_check.not_reported(rows))


def test_a_missing_mig_device_a_wrong_memory_total_and_profile_are_mismatches(tmp_path: Path) -> None:
    xml = MIG_XML.read_text()
    # nvidia-smi sees GPU instance 8 where the agent has 7, and 40000 MiB on instance 1.
    xml = xml.replace("<gpu_instance_id>7</gpu_instance_id>", "<gpu_instance_id>8</gpu_instance_id>")
    xml = xml.replace("<total>40448 MiB</total>", "<total>40000 MiB</total>")
    listing = MIG_LIST.read_text().replace("MIG 2g.20gb", "MIG 1c.2g.20gb")
    rows = mig_rows(xml, listing)
    only_7 = {
        (f"mig[7/0].{name}", 0, gpu_check.ONLY_AGENT) for name in ("index", "uuid", "profile", "memory_total")
    }
    only_8 = {
        (f"mig[8/0].{name}", 0, gpu_check.ONLY_SMI) for name in ("index", "uuid", "profile", "memory_total")
    }
    assert not_matching(rows) == {
        ("mig_instances", 0, gpu_check.MISMATCH),
        ("mig[1/0].memory_total", 0, gpu_check.MISMATCH),
        ("mig[3/0].profile", 0, gpu_check.MISMATCH),
        *only_7,
        *only_8,
    }
    by_field = {row.field: row for row in rows}
    assert (by_field["mig_instances"].agent, by_field["mig_instances"].smi) == ("1/0 3/0 7/0", "1/0 3/0 8/0")
    (tmp_path / "agent.json").write_text(agent_json([h100_table()], mig={0: MIG_PROFILES}))
    (tmp_path / "nvidia-smi.xml").write_text(xml)
    (tmp_path / "nvidia-smi-L.txt").write_text(listing)
    files = ["--agent-json", "agent.json", "--smi-xml", "nvidia-smi.xml", "--smi-list", "nvidia-smi-L.txt"]
    done = run_tool(*files, cwd=tmp_path)
    assert done.returncode == gpu_check.EXIT_MISMATCH, done.stdout + done.stderr
    assert "mig[1/0].memory_total  0  40448 MiB  40000 MiB  mismatch" in re.sub(r" {2,}", "  ", done.stdout)


def test_without_nvidia_smi_l_mig_profiles_and_uuids_are_only_the_agents() -> None:
    rows = mig_rows()
    assert not_matching(rows) == {
        (f"mig[{ids}].{name}", 0, gpu_check.ONLY_AGENT)
        for ids in ("1/0", "3/0", "7/0")
        for name in ("uuid", "profile")
    }
    assert gpu_check.summary(rows)[gpu_check.MISMATCH] == 0


def test_mig_mode_without_mig_devices_is_none_on_both_sides() -> None:
    xml = MIG_XML.read_text()
    xml = re.sub(
        r"<mig_devices>\n.*</mig_devices>", "<mig_devices>\n\t\t\tNone\n\t\t</mig_devices>", xml, flags=re.S
    )
    rows = rows_for(agent_json([h100_table()], mig={0: []}), xml)
    assert not_matching(rows) == set()
    assert [(row.field, row.agent, row.smi) for row in rows if row.field.startswith("mig")] == [
        ("mig_enabled", True, True),
        ("mig_instances", "none", "none"),
    ]


def test_nvidia_smi_l_gives_each_mig_devices_profile_and_uuid_by_index() -> None:
    listing = gpu_check.parse_smi_list(
        MIG_LIST.read_text()
        + "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-5f0b6b35-0000-1111-2222-333344445555)\n"
        + "  MIG 1c.3g.20gb Device 0: (UUID: MIG-GPU-5f0b6b35-0000-1111-2222-333344445555/1/0)\n"
        + "No devices were found\n"
    )
    assert listing["GPU-00000000-aaaa-bbbb-cccc-dddddddddddd"][2] == gpu_check.ListedMig(
        "1g.10gb", "MIG-00000002-eeee-ffff-0000-111111111111"
    )
    # Older drivers name a MIG device by its GPU's UUID and its ids.
    assert listing["GPU-5f0b6b35-0000-1111-2222-333344445555"] == {
        0: gpu_check.ListedMig("1c.3g.20gb", "MIG-GPU-5f0b6b35-0000-1111-2222-333344445555/1/0")
    }
    assert gpu_check.parse_smi_list(SMI_LIST.read_text()) == {
        "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd": {},
        "GPU-00000001-aaaa-bbbb-cccc-dddddddddddd": {},
    }


def test_the_agents_once_sample_has_no_gpm_so_the_check_samples_twice() -> None:
    # --once takes one sample; GPM needs an earlier one at least 100 ms before.
    once = json.loads(agent_json(h100_pair(), mig={1: MIG_PROFILES}))
    readings = [reading for sample in once["gpus"] for reading in gpu_check.gpm_readings(sample)]
    assert [(r.name, r.gpu, r.describe()) for r in readings] == [
        ("gpm", 0, "absent"),
        ("gpm", 1, "absent"),
        ("mig[1/0].gpm", 1, "absent"),
        ("mig[3/0].gpm", 1, "absent"),
        ("mig[7/0].gpm", 1, "absent"),
    ]


def test_gpm_is_present_on_the_h100_and_absent_on_the_a100() -> None:
    measured = gpu_check.measure(fake_node(h100_table(), a100_table()), 1, interval_s=0.15)
    h100, a100 = measured.gpm
    assert h100.describe() == (
        "present (graphics 0.97, sm_active 0.62, sm_occupancy 0.31, tensor 0.46, dram 0.38, fp64 0.00, "
        "fp32 0.12, fp16 0.04, nvlink_tx 180000.0 MiB/s, nvlink_rx 175000.5 MiB/s); within 0-1"
    )
    assert h100.shares["sm_active"] == 0.625 and h100.rates["nvlink_rx"] == 175_000.5
    assert (a100.gpu, a100.describe(), a100.as_dict()["within_0_1"]) == (1, "absent", None)
    assert measured.gpus_with_gpm == 1 and measured.messages == ()
    text = gpu_check.render_measurement(measured)
    assert re.search(r"^gpm +1 +absent$", text, re.M)
    assert re.search(r"with GPM metrics on 1\)$", text, re.M)


def test_gpm_of_each_mig_instance_and_a_parent_gpu_whose_gpm_fails() -> None:
    nvml = mig_node()
    nvml.gpus[0].migs[0].table["gpm"]["SM_UTIL"] = 53.0
    measured = gpu_check.measure(nvml, 1, interval_s=0.15)
    assert [(r.name, r.present) for r in measured.gpm] == [
        ("gpm", True),
        ("mig[1/0].gpm", True),
        ("mig[3/0].gpm", True),
        ("mig[7/0].gpm", True),
    ]
    assert measured.gpm[1].shares["sm_active"] == 0.53
    # Whether nvmlGpmSampleGet works on a GPU in MIG mode is open: where it fails, the GPU's
    # row says absent, its instances' rows still have theirs, and NVML's message is shown.
    nvml = mig_node()
    nvml.raises["nvmlGpmSampleGet"] = nvml.NVMLError(nvml.NVML_ERROR_UNKNOWN)
    measured = gpu_check.measure(nvml, 1, interval_s=0.15)
    assert [(r.name, r.present) for r in measured.gpm][:2] == [("gpm", False), ("mig[1/0].gpm", True)]
    assert len(measured.messages) == 1 and "nvmlGpmSampleGet failed" in measured.messages[0]
    assert "\nnvml: NVML nvmlGpmSampleGet failed" in gpu_check.render_measurement(measured)


def test_gpm_values_out_of_0_1_and_unread_gpus_are_shown() -> None:
    sample = {
        "index": 0,
        "read_status": "GPU_READ_STATUS_OK",
        "sm_active_ppm": 530_000,
        "tensor_active_ppm": 1_200_000,
    }
    (reading,) = gpu_check.gpm_readings(sample)
    assert reading.describe() == "present (sm_active 0.53, tensor 1.20); out of 0-1: tensor 1.20"
    assert reading.as_dict()["within_0_1"] is False
    lost = {"index": 1, "read_status": "GPU_READ_STATUS_LOST", "read_error": "GPU is lost"}
    assert [r.describe() for r in gpu_check.gpm_readings(lost)] == ["not read (LOST: GPU is lost)"]


def test_gpm_rows_never_fail_the_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = gpu_check.GpmReading(0, shares={"tensor": 1.2})
    measured = gpu_check.Measurement(2, 1.0, 2.0, 5, 1.0, (odd, gpu_check.GpmReading(1)), ())
    monkeypatch.setattr(gpu_check, "run_agent", lambda: (agent_json(h100_pair()), []))
    monkeypatch.setattr(gpu_check, "measure", lambda samples: measured)
    code = gpu_check.main(["--smi-xml", str(SMI_XML), "--smi-list", str(SMI_LIST)])
    out = capsys.readouterr().out
    assert code == gpu_check.EXIT_OK
    assert re.search(r"^gpm +0 +present \(tensor 1\.20\); out of 0-1: tensor 1\.20$", out, re.M)
    assert "first sample: 1.000 ms per GPU" in out and "later samples: 2.000 ms per GPU" in out


def test_samples_that_cannot_be_taken_are_a_note(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_nvml(samples: int) -> gpu_check.Measurement:
        raise RuntimeError("NVML could not start")

    monkeypatch.setattr(gpu_check, "run_agent", lambda: (agent_json(h100_pair()), []))
    monkeypatch.setattr(gpu_check, "measure", no_nvml)
    assert gpu_check.main(["--json", "--smi-xml", str(SMI_XML)]) == gpu_check.EXIT_OK
    result = json.loads(capsys.readouterr().out)
    assert result["gpm"] is None and result["sample_ms_per_gpu"] is None
    assert result["notes"] == ["no samples of the check's own (GPM, sample times): NVML could not start"]


def test_the_doc_shows_only_commands_these_tests_run() -> None:
    shown = {line.strip() for line in DOC.read_text().splitlines() if line.strip().startswith("python ")}
    assert shown == DOC_COMMANDS
