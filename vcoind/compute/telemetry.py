"""Device telemetry: NVIDIA GPUs through NVML (package nvidia-ml-py), CPU figures otherwise.

Never raises for a missing GPU or driver: the node then reports its CPU.
Imports nothing from the daemon, so it runs on a GPU box with torch alone.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
from dataclasses import dataclass
from typing import Any

import psutil

log = logging.getLogger("vcoind.telemetry")


@dataclass(frozen=True)
class DeviceSample:
    kind: str  # "cuda" | "cpu"
    name: str
    count: int
    memory_total_mb: int
    memory_used_mb: int
    utilization: float  # percent
    temperature_c: float | None
    cuda_version: str


@dataclass(frozen=True)
class HostSample:
    cpu_percent: float
    memory_percent: float
    device: DeviceSample


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


class Telemetry:
    """Samples the host. NVML is initialised once; failures fall back to CPU figures."""

    def __init__(self, gpu_index: int = 0) -> None:
        self._gpu_index = gpu_index
        self._nvml: Any = None
        self._cpu_name = platform.processor() or platform.machine() or "cpu"
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > gpu_index:
                self._nvml = pynvml
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
            log.debug("no NVIDIA GPU via NVML (%s); reporting CPU figures", exc)
        psutil.cpu_percent(None)  # prime: the first call always returns 0.0

    @property
    def has_gpu(self) -> bool:
        return self._nvml is not None

    def sample(self) -> HostSample:
        cpu = float(psutil.cpu_percent(None))
        mem = float(psutil.virtual_memory().percent)
        device = self._gpu_sample() if self._nvml is not None else None
        if device is None:
            vm = psutil.virtual_memory()
            device = DeviceSample(
                kind="cpu",
                name=self._cpu_name,
                count=psutil.cpu_count() or 1,
                memory_total_mb=vm.total // (1 << 20),
                memory_used_mb=vm.used // (1 << 20),
                utilization=cpu,
                temperature_c=_cpu_temperature(),
                cuda_version="",
            )
        return HostSample(cpu_percent=cpu, memory_percent=mem, device=device)

    def _gpu_sample(self) -> DeviceSample | None:
        nv = self._nvml
        try:
            h = nv.nvmlDeviceGetHandleByIndex(self._gpu_index)
            name = nv.nvmlDeviceGetName(h)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            util = nv.nvmlDeviceGetUtilizationRates(h)
            temp = nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
            cuda = nv.nvmlSystemGetCudaDriverVersion_v2()
            return DeviceSample(
                kind="cuda",
                name=name.decode() if isinstance(name, bytes) else str(name),
                count=int(nv.nvmlDeviceGetCount()),
                memory_total_mb=int(mem.total) // (1 << 20),
                memory_used_mb=int(mem.used) // (1 << 20),
                utilization=float(util.gpu),
                temperature_c=float(temp),
                cuda_version=f"{cuda // 1000}.{(cuda % 1000) // 10}",
            )
        except Exception as exc:  # a GPU that falls off the bus must not kill the heartbeat
            log.warning("NVML query failed (%s); reporting CPU figures", exc)
            return None


def _cpu_temperature() -> float | None:
    try:
        temps = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        return None
    for entries in temps.values():
        for e in entries:
            if e.current:
                return float(e.current)
    return None
