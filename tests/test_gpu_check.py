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
from tests.fake_nvml import fake_node, h100_table

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check

SMI_XML = ROOT / "tests" / "data" / "nvidia-smi-q-x-2xh100.xml"
DOC = ROOT / "docs" / "real-gpu.md"
# Every command docs/real-gpu.md shows, each run by a test below.
DOC_COMMANDS = {
    "python tools/gpu_check.py",
    "python tools/gpu_check.py --json",
    "python tools/gpu_check.py --save gpu-check",
    "python tools/gpu_check.py --agent-json gpu-check/agent.json --smi-xml gpu-check/nvidia-smi.xml",
}
NOT_SUPPORTED_BY_THE_FAKE = {"fan_speed"}


def h100_pair() -> list[dict[str, Any]]:
    """The node the recorded document describes: two H100s, each with its own serial."""
    first, second = h100_table(), h100_table()
    second["serial"] = "1654922001235"
    return [first, second]


def agent_json(tables: list[dict[str, Any]], lost: tuple[int, ...] = ()) -> str:
    """What `gpufleet-agent --once` prints for a node with these fake GPUs."""
    nvml = fake_node(*tables)
    for index in lost:
        nvml.gpus[index].lost = True
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


def rows_for(agent: str, smi: str) -> list[gpu_check.Row]:
    return gpu_check.compare(gpu_check.parse_agent(agent), gpu_check.parse_smi(smi))


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


def test_one_sample_is_timed_per_gpu() -> None:
    ms, gpus = gpu_check.time_sample(fake_node(*h100_pair()), repeats=3)
    assert gpus == 2
    assert 0 < ms < 1000


def test_recorded_files_on_the_command_line(tmp_path: Path) -> None:
    # Covers the doc's `python tools/gpu_check.py --agent-json gpu-check/agent.json
    # --smi-xml gpu-check/nvidia-smi.xml`.
    command = next(c for c in DOC_COMMANDS if "--agent-json" in c)
    (tmp_path / "gpu-check").mkdir()
    (tmp_path / "gpu-check" / "agent.json").write_text(agent_json(h100_pair()))
    shutil.copy(SMI_XML, tmp_path / "gpu-check" / "nvidia-smi.xml")
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
    """An environment whose nvidia-smi prints the recorded document and whose pynvml is the fake."""
    env = path_without_nvidia_smi(tmp_path)
    fake_smi = tmp_path / "empty-bin" / "nvidia-smi"
    fake_smi.write_text(f"#!/bin/sh\nexec {shutil.which('cat')} {SMI_XML}\n")
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
    assert re.search(r"^2 GPUs, \d+ values: \d+ match, 0 mismatch, 0 only agent", done.stdout, re.M)
    assert re.search(r"^one sample: \d+\.\d+ ms per GPU \(mean of 5 samples of 2 GPUs\)$", done.stdout, re.M)
    saved = tmp_path / "gpu-check"
    if "--save" in command:
        assert (
            gpu_check.parse_agent((saved / "agent.json").read_text())["node"]["driver_version"] == "565.57.01"
        )
        assert (saved / "nvidia-smi.xml").read_text() == smi_xml()
        result = json.loads((saved / "result.json").read_text())
        assert result["sample_ms_per_gpu"] > 0
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


def test_the_doc_shows_only_commands_these_tests_run() -> None:
    shown = {line.strip() for line in DOC.read_text().splitlines() if line.strip().startswith("python ")}
    assert shown == DOC_COMMANDS
