"""GPU providers (issue 18): NVML readings, detection fallback, default dtype, and the --gpu install path.

There is no GPU here. NVML parsing runs over recorded readings through a small stand-in for the ``pynvml`` module
(the reader takes the bindings as an argument); the fallback runs for real: this machine has no NVML bindings or
driver and a CPU-only torch, so detection must end in "no GPU" without an error.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from node_server import hardware

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3


class NVMLError(Exception):
    pass


class RecordedNvml:
    """The pynvml calls node_server.hardware makes, answering from readings recorded on two machines (an H100 box
    with a T4 beside it). Old pynvml releases return names as bytes: the T4 does, to cover both."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, *, init_error: Exception | None = None, temperature_supported: bool = True):
        self.devices = [
            {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-5f3a1c9e-0b1d-4c7e-9a52-2d8e6f4b7a10",
             "memory": SimpleNamespace(total=85_520_809_984, used=3_087_007_744, free=82_433_802_240),
             "temp": 34, "cc": (9, 0)},
            {"name": b"Tesla T4", "uuid": "GPU-a1b2c3d4-e5f6-4711-8899-aabbccddeeff",
             "memory": SimpleNamespace(total=16_106_127_360, used=11_811_160_064, free=4_294_967_296),
             "temp": 71, "cc": (7, 5)},
        ]
        self.init_error, self.temperature_supported = init_error, temperature_supported
        self.initialized = 0

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error
        self.initialized += 1

    def nvmlShutdown(self):
        self.initialized -= 1

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < len(self.devices):
            raise NVMLError("Invalid Argument")
        return self.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for device in self.devices:
            if device["uuid"] == uuid:
                return device
        raise NVMLError("Not Found")

    def nvmlDeviceGetName(self, handle):
        return handle["name"]

    def nvmlDeviceGetMemoryInfo(self, handle):
        return handle["memory"]

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        if not self.temperature_supported:
            raise NVMLError("Not Supported")
        return handle["temp"]

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return handle["cc"]


@pytest.fixture(autouse=True)
def no_visible_devices_env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_nvml_gpus_from_recorded_readings():
    nvml = RecordedNvml()
    gpus = hardware.detect_gpus(nvml)
    assert [(g.device, g.name, round(g.vram_total_gb, 2), g.compute_capability) for g in gpus] == [
        ("cuda:0", "NVIDIA H100 80GB HBM3", 79.65, (9, 0)),
        ("cuda:1", "Tesla T4", 15.0, (7, 5)),
    ]
    assert nvml.initialized == 0  # every nvmlInit is paired with nvmlShutdown


def test_gpu_stats_from_recorded_readings():
    nvml = RecordedNvml()
    h100 = hardware.gpu_stats(0, nvml)
    assert h100 == {"vram_used_gb": 3_087_007_744 / GiB, "vram_total_gb": 85_520_809_984 / GiB, "gpu_temp_c": 34.0}
    t4 = hardware.gpu_stats(1, nvml)
    assert (round(t4["vram_used_gb"], 2), t4["vram_total_gb"], t4["gpu_temp_c"]) == (11.0, 15.0, 71.0)
    assert hardware.gpu_stats(2, nvml) == {}  # no such device: nothing, not an error
    # a GPU without a temperature sensor reading still reports its memory
    assert hardware.gpu_stats(0, RecordedNvml(temperature_supported=False)) == {
        "vram_used_gb": 3_087_007_744 / GiB, "vram_total_gb": 85_520_809_984 / GiB}
    assert nvml.initialized == 0


def test_cuda_visible_devices_maps_cuda_indices_to_nvml_devices():
    nvml = RecordedNvml()
    # the container / systemd unit exposes only the T4: it is cuda:0 to torch and Petals, NVML device 1
    assert hardware.gpu_stats(0, nvml, visible="1")["gpu_temp_c"] == 71.0
    assert hardware.gpu_stats(0, nvml, visible="GPU-a1b2c3d4-e5f6-4711-8899-aabbccddeeff")["gpu_temp_c"] == 71.0
    assert hardware.gpu_stats(1, nvml, visible="1,0")["gpu_temp_c"] == 34.0
    assert hardware.gpu_stats(0, nvml, visible="") == {}  # every GPU hidden
    os.environ["CUDA_VISIBLE_DEVICES"] = "1"  # removed again by the autouse fixture
    assert [(g.device, g.name) for g in hardware.detect_gpus(nvml)] == [("cuda:0", "Tesla T4")]
    assert hardware.nvml_targets("0,7,1", 2) == [0]  # CUDA stops at the first invalid entry
    assert hardware.nvml_targets("-1", 2) == []
    assert hardware.nvml_targets(None, 2) == [0, 1]


def test_detection_falls_back_cleanly_without_a_gpu(monkeypatch):
    monkeypatch.delenv("FAR_NODE_NO_TORCH_PROBE", raising=False)  # let torch really look for CUDA
    import torch

    assert not torch.cuda.is_available(), "this test describes a machine without a GPU"
    # NVML bindings present but no driver: nvmlInit fails, torch decides (CPU build here): no GPU, no error
    broken = RecordedNvml(init_error=NVMLError("NVML Shared Library Not Found"))
    assert hardware.detect_gpus(broken) == []
    assert hardware.gpu_stats(0, broken) == {}
    # this machine as it is: no pynvml installed (the CPU lock has none), torch without CUDA
    if hardware.load_nvml() is None:
        assert hardware.detect_gpus() == [] and hardware.gpu_stats(0) == {}
    assert hardware.default_dtype_for("cpu") == "float32"
    assert hardware.default_dtype_for("cuda:0", broken) == "float16"  # unknown GPU: the safe half precision


def test_default_dtype_on_gpu_is_half_precision_as_petals_supports():
    nvml = RecordedNvml()
    assert hardware.default_dtype_for("cuda:0", nvml) == "bfloat16"  # H100: compute capability 9.0
    assert hardware.default_dtype_for("cuda:1", nvml) == "float16"  # T4: 7.5 has no bfloat16
    assert hardware.default_dtype("cuda:0", "NVIDIA H200") == "bfloat16"  # no capability known: by name
    assert hardware.default_dtype("cuda:0", "Tesla V100-SXM2-16GB") == "float16"
    assert hardware.default_dtype("cuda:0", "Tesla V100-SXM2-16GB", (8, 6)) == "bfloat16"  # capability wins
    assert hardware.default_dtype("cpu", "NVIDIA H100") == "float32"


def _install_plan(*args: str, env: dict | None = None) -> list[str]:
    result = subprocess.run(["bash", "scripts/install.sh", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "FAR_MESH_INSTALL_DRY_RUN": "1", **(env or {})})
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith(("+ ", "  (left out"))]


def test_gpu_install_plan_swaps_cpu_torch_for_cuda_torch_and_nvml():
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    lock_torch = re.search(r"^torch==(\S+)$", lock, re.M).group(1)
    assert lock_torch.endswith("+cpu")  # the default set stays CPU-only
    gpu = (ROOT / "requirements" / "gpu.txt").read_text()
    assert re.search(r"^torch==(\S+)$", gpu, re.M).group(1) == lock_torch.removesuffix("+cpu")
    assert re.search(r"^nvidia-ml-py==\S+$", gpu, re.M)

    cpu = _install_plan()
    assert any(line.endswith("install -q --no-deps -r requirements/lock.txt") for line in cpu)
    assert not any("gpu.txt" in line for line in cpu)
    for plan in (_install_plan("--gpu"), _install_plan(env={"FAR_MESH_TORCH": "cuda"})):
        assert f"  (left out of the lock: torch=={lock_torch})" in plan
        assert not any(line.endswith("-r requirements/lock.txt") for line in plan)  # a copy without torch
        gpu_step = [line for line in plan if line.endswith("-r requirements/gpu.txt")]
        assert len(gpu_step) == 1 and "--no-deps" not in gpu_step[0]  # torch brings its CUDA libraries
        assert any(line.endswith("--no-deps petals==2.2.0.post1") for line in plan)
    bad = subprocess.run(["bash", "scripts/install.sh", "--cuda12"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "FAR_MESH_INSTALL_DRY_RUN": "1"})
    assert bad.returncode == 2 and "unknown option --cuda12" in bad.stderr
