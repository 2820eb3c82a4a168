"""What this machine offers: GPUs (NVML, else torch), CPU and RAM, local addresses. No external services.

``detect_gpus`` tries NVML first (``pynvml``/``nvidia-ml-py``: cheap, no CUDA context), then torch; on a
machine with neither it returns ``[]`` and the node serves on CPU. The NVML functions take the bindings as an
argument (default: ``import pynvml``), so their parsing is tested over recorded readings on machines without a GPU.
"""

from __future__ import annotations

import ipaddress
import os
import platform
import socket
from dataclasses import dataclass
from typing import Optional

import psutil

GB = 1024**3


@dataclass(frozen=True)
class Gpu:
    index: int  # CUDA index, as torch numbers devices in this process (after CUDA_VISIBLE_DEVICES)
    name: str
    vram_total_gb: float
    compute_capability: Optional[tuple[int, int]] = None

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"


@dataclass(frozen=True)
class Address:
    address: str
    interface: str
    kind: str  # "public" | "private" | "loopback"

    def label(self) -> str:
        return f"{self.address}  ({self.interface}, {self.kind})"


def load_nvml():
    """The NVML bindings (``nvidia-ml-py``, module ``pynvml``; requirements/gpu.txt), or None if not installed."""
    try:
        import pynvml  # type: ignore
    except ImportError:
        return None
    return pynvml


def nvml_targets(visible: Optional[str], count: int) -> list:
    """NVML devices behind CUDA indices 0, 1, ...: NVML numbers every GPU of the machine, CUDA only those in
    ``CUDA_VISIBLE_DEVICES`` (indices or GPU-/MIG- UUIDs, in that order). Ints are NVML indices, strings UUIDs."""
    if visible is None:
        return list(range(count))
    targets: list = []
    for item in (part.strip() for part in visible.split(",")):
        if item.startswith(("GPU-", "MIG-")):
            targets.append(item)
        elif item.isdigit() and int(item) < count:
            targets.append(int(item))
        else:  # CUDA stops at the first invalid entry ("", "-1", "NoDevFiles" hide every GPU)
            break
    return targets


def _nvml_handle(nvml, target):
    return nvml.nvmlDeviceGetHandleByUUID(target) if isinstance(target, str) else nvml.nvmlDeviceGetHandleByIndex(target)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_gpus(nvml=None, visible: Optional[str] = None) -> Optional[list[Gpu]]:
    """GPUs through NVML; None when NVML is unusable here (bindings or driver missing): then torch decides."""
    nvml = nvml if nvml is not None else load_nvml()
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded: no NVIDIA driver on this machine
        return None
    try:
        gpus = []
        targets = nvml_targets(visible if visible is not None else os.environ.get("CUDA_VISIBLE_DEVICES"),
                               nvml.nvmlDeviceGetCount())
        for index, target in enumerate(targets):
            handle = _nvml_handle(nvml, target)
            try:
                capability = tuple(int(v) for v in nvml.nvmlDeviceGetCudaComputeCapability(handle))
            except Exception:  # older drivers: the name decides the default dtype instead
                capability = None
            gpus.append(Gpu(index, _text(nvml.nvmlDeviceGetName(handle)),
                            nvml.nvmlDeviceGetMemoryInfo(handle).total / GB, capability))
        return gpus
    except Exception:
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def _torch_gpus() -> list[Gpu]:
    if os.environ.get("FAR_NODE_NO_TORCH_PROBE"):  # tests: skip a 3 s import on machines known to have no GPU
        return []
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [Gpu(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory / GB,
                tuple(torch.cuda.get_device_capability(i)))
            for i in range(torch.cuda.device_count())]


def detect_gpus(nvml=None) -> list[Gpu]:
    """GPUs this process can use: NVML first (no CUDA context), else torch; [] on a machine without either."""
    gpus = _nvml_gpus(nvml)
    return gpus if gpus is not None else _torch_gpus()


def ram_total_gb() -> float:
    return psutil.virtual_memory().total / GB


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def cpu_label() -> str:
    return f"{cpu_name()}, {psutil.cpu_count(logical=True)} threads, {ram_total_gb():.1f} GB RAM"


def gpu_stats(index: int = 0, nvml=None, visible: Optional[str] = None) -> dict:
    """Live readings of the GPU behind CUDA index ``index`` through NVML: VRAM used/total (GB, whole GPU: every
    process on it) and temperature (°C). {} when NVML is not available; a reading the GPU does not support (some
    report no temperature) is left out rather than failing the rest."""
    nvml = nvml if nvml is not None else load_nvml()
    if nvml is None:
        return {}
    try:
        nvml.nvmlInit()
    except Exception:
        return {}
    try:
        targets = nvml_targets(visible if visible is not None else os.environ.get("CUDA_VISIBLE_DEVICES"),
                               nvml.nvmlDeviceGetCount())
        if index >= len(targets):
            return {}
        handle = _nvml_handle(nvml, targets[index])
        stats: dict = {}
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            stats.update(vram_used_gb=memory.used / GB, vram_total_gb=memory.total / GB)
        except Exception:
            pass
        try:
            stats["gpu_temp_c"] = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        except Exception:
            pass
        return stats
    except Exception:
        return {}
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def _kind(address: str) -> str:
    ip = ipaddress.ip_address(address)
    if ip.is_loopback:
        return "loopback"
    return "public" if ip.is_global else "private"


def local_addresses() -> list[Address]:
    """IPv4/IPv6 addresses of the local interfaces, public first, then private, then loopback.

    Only what the interfaces carry: behind NAT the public address is not among them, and the operator types it
    (or the router's port forward) by hand. No external "what is my IP" service is asked."""
    found: list[Address] = []
    for interface, addrs in psutil.net_if_addrs().items():
        for addr in addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            text = addr.address.split("%", 1)[0]
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            if ip.is_link_local or ip.is_multicast or ip.is_unspecified:
                continue
            found.append(Address(text, interface, _kind(text)))
    order = {"public": 0, "private": 1, "loopback": 2}
    found.sort(key=lambda a: (order[a.kind], ":" in a.address, a.interface))
    seen, unique = set(), []
    for address in found:
        if address.address not in seen:
            seen.add(address.address)
            unique.append(address)
    return unique


# bfloat16 needs compute capability 8.0 (Ampere) or newer; these names tell it when the capability is unknown
BF16_NAME_TAGS = ("A100", "A10", "A30", "A40", "A6000", "RTX 30", "RTX 40", "RTX 50", "L4", "L40", "H100", "H200",
                  "GH200", "B100", "B200", "GB200")


def default_dtype(device: str, gpu_name: Optional[str] = None,
                  compute_capability: Optional[tuple[int, int]] = None) -> str:
    """The dtype a node serves in when none is given: float32 on CPU; on a GPU half precision as Petals supports
    it, bfloat16 where the GPU has it (compute capability >= 8.0), else float16 (docs/provider.md "GPU providers")."""
    if device == "cpu":
        return "float32"
    if compute_capability is not None:
        return "bfloat16" if compute_capability[0] >= 8 else "float16"
    name = (gpu_name or "").upper()
    return "bfloat16" if any(tag in name for tag in BF16_NAME_TAGS) else "float16"


def default_dtype_for(device: str, nvml=None) -> str:
    """``default_dtype`` for a device, looking the GPU up (NVML, else torch) only when it is a CUDA device."""
    if not device.startswith("cuda"):
        return default_dtype(device)
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    gpu = next((g for g in detect_gpus(nvml) if g.index == index), None)
    return default_dtype(device, gpu.name if gpu else None, gpu.compute_capability if gpu else None)
