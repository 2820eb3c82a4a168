"""What this machine offers: GPUs (NVML, else torch), CPU and RAM, local addresses. No external services.

``detect_gpus`` tries NVML first (``pynvml``/``nvidia-ml-py``: cheap, no CUDA context), then torch; on a
machine with neither it returns ``[]`` and the node serves on CPU.
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
    index: int
    name: str
    vram_total_gb: float

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


def _nvml_gpus() -> Optional[list[Gpu]]:
    try:
        import pynvml  # type: ignore
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            gpus.append(Gpu(index, name, pynvml.nvmlDeviceGetMemoryInfo(handle).total / GB))
        return gpus
    finally:
        try:
            pynvml.nvmlShutdown()
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
    return [Gpu(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory / GB)
            for i in range(torch.cuda.device_count())]


def detect_gpus() -> list[Gpu]:
    gpus = _nvml_gpus()
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


def gpu_stats(index: int = 0) -> dict:
    """Live VRAM use (GB) and temperature (°C) of one GPU through NVML; {} when NVML is not available."""
    try:
        import pynvml  # type: ignore

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            temp = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
            return {"vram_used_gb": memory.used / GB, "vram_total_gb": memory.total / GB, "gpu_temp_c": float(temp)}
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return {}


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


def default_dtype(device: str, gpu_name: Optional[str] = None) -> str:
    if device == "cpu":
        return "float32"
    name = (gpu_name or "").upper()
    # bfloat16 needs Ampere or newer; older cards get float16
    if any(tag in name for tag in ("A100", "H100", "A10", "A40", "A6000", "RTX 30", "RTX 40", "RTX 50", "L4", "L40")):
        return "bfloat16"
    return "float16"
