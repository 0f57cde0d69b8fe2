"""Which device a job computes on, how much memory it may use there, and the check of a job's plan against it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from app.config import Settings
from app.plan import Plan, Shapes, format_bytes, make_plan, stored_dtype
from worker.errors import DeviceUnavailableError, InsufficientMemoryFailure


@dataclass(frozen=True)
class DeviceBudget:
    device: str  # "cpu" or "cuda:N"
    name: str  # what the device is, in words
    device_bytes: int  # memory the job may use on the device (the host's, on the CPU)
    host_bytes: int


def job_device(settings: Settings | None = None) -> str:
    """RESTORELCC_DEVICE, or CUDA when present, else the CPU. A CUDA device that is not there is a failure, never a
    silent move to the CPU."""
    import torch

    wanted = (settings or Settings()).device
    if wanted is None:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda"):
        index = int(wanted.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"RESTORELCC_DEVICE={wanted}, but this worker has "
                                         f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA "
                                         "device(s)")
        return f"cuda:{index}"
    return "cpu"


def host_available_bytes() -> int:
    """Memory this process could still use: what the kernel calls available (or the cgroup's limit, if lower), plus
    what the process already holds."""
    from worker.run.stagemeter import rss_bytes

    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as fh:
            text = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as fh:
            used = int(fh.read().strip())
        with open("/sys/fs/cgroup/memory.stat", encoding="ascii") as fh:  # page cache the kernel can drop
            cache = next((int(ln.split()[1]) for ln in fh if ln.startswith("inactive_file ")), 0)
        used -= cache
        if text != "max":
            available = min(available, int(text) - used)
    except (OSError, ValueError):
        pass
    return available + rss_bytes()


def budget(device: str, settings: Settings | None = None) -> DeviceBudget:
    import torch

    settings = settings or Settings()
    host = host_available_bytes()
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        dev_bytes, name = int(props.total_memory), props.name
    else:
        dev_bytes, name = host, "CPU (host memory)"
    if settings.max_device_memory is not None:
        dev_bytes = min(dev_bytes, settings.max_device_memory)
        if device == "cpu":
            host = dev_bytes
    return DeviceBudget(device, name, dev_bytes, host)


def check_plan(plan: Plan, available: DeviceBudget) -> None:
    """Refuse a job whose plan does not fit, naming the stage and the numbers."""
    stage, need = plan.peak("device")
    how = "streamed, " if plan.mode == "streaming" else ""
    if need > available.device_bytes:
        raise InsufficientMemoryFailure(
            f"{how}the {stage} stage needs about {format_bytes(need)} on {available.device} ({available.name}), "
            f"which has {format_bytes(available.device_bytes)}: {plan.params / 1e9:.2f}B parameters in {plan.dtype} "
            f"are {format_bytes(plan.weight_bytes)} of weights")
    if available.device.startswith("cuda"):
        stage, need = plan.peak("host")
        if need > available.host_bytes:
            raise InsufficientMemoryFailure(
                f"{how}the {stage} stage needs about {format_bytes(need)} of host memory; "
                f"{format_bytes(available.host_bytes)} is available")


def fits(plan: Plan, available: DeviceBudget) -> bool:
    try:
        check_plan(plan, available)
    except InsufficientMemoryFailure:
        return False
    return True


def choose_plan(spec: Any, source: Any, config: Any, available: DeviceBudget, streaming_problem: str | None
                ) -> Plan:
    """The plan this worker runs the job by: the whole model in memory, or its layers streamed (``model.streaming``:
    'on', 'off', or 'auto': streamed only when the whole model does not fit). Raises InsufficientMemoryFailure
    when neither fits, with both plans' numbers."""
    wanted = spec.model.streaming
    whole = plan_job(spec, source, config, available.device)
    if wanted == "off" or (wanted == "auto" and (fits(whole, available) or streaming_problem is not None)):
        check_plan(whole, available)
        return whole
    streamed = plan_job(spec, source, config, available.device, streaming=True)
    if wanted == "auto" and not fits(streamed, available):
        stage, need = streamed.peak("device")
        try:
            check_plan(whole, available)
        except InsufficientMemoryFailure as exc:
            raise InsufficientMemoryFailure(f"{exc.message}; streamed one layer at a time, the {stage} stage "
                                            f"would still need about {format_bytes(need)}") from None
    check_plan(streamed, available)
    return streamed


def plan_job(spec: Any, source: Any, config: Any, device: str, streaming: bool = False) -> Plan:
    """The job's memory plan (app.plan) from the model's config (as worker.model.load reads it); no weights."""
    gguf = source.kind == "gguf"
    path = source.path
    files = [path] if gguf else [*path.glob("*.safetensors")] if path.is_dir() else []
    file_bytes = sum(f.stat().st_size for f in files) if files else None
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))  # transformers' or config.json's
    stored = None if gguf or not path.is_dir() else stored_dtype(path)
    return make_plan(spec, Shapes.from_config(raw, stored), device, gguf=gguf, file_bytes=file_bytes,
                     streaming=streaming)
