"""Which device a job computes on, how much memory it may use there, and the check of a job's plan against it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from app.config import Settings
from app.plan import Plan, Shapes, compute_dtype, format_bytes, make_plan, safetensors_bytes, stored_dtype
from worker.errors import DeviceUnavailableError, InsufficientMemoryFailure


@dataclass(frozen=True)
class DeviceBudget:
    device: str  # "cpu" or "cuda:N": where the job computes
    name: str  # what the device is, in words
    device_bytes: int  # memory the job may use on the device (the host's, on the CPU; each GPU's, when several)
    host_bytes: int
    devices: tuple[str, ...] = ()  # every GPU a model may be split over (the first is ``device``)
    each_bytes: int | None = None  # memory a split model may use on each of ``devices`` (the smallest GPU's)


def job_devices(settings: Settings | None = None) -> list[str]:
    """The devices a job may use, the one it computes on first: RESTORELCC_DEVICE ('cpu', 'cuda' for every GPU,
    'cuda:N', or a list), by default every GPU when there is one, else the CPU. A CUDA device that is not there is
    a failure, never a silent move to the CPU."""
    import torch

    wanted = (settings or Settings()).device
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if wanted == "cpu" or (wanted is None and count == 0):
        return ["cpu"]
    if wanted is None or wanted == "cuda":
        indices = list(range(count))
    else:
        indices = [int(part.partition(":")[2]) for part in wanted.split(",")]
    missing = [i for i in indices if i >= count]
    if not indices or missing:
        raise DeviceUnavailableError(f"RESTORELCC_DEVICE={wanted}, but this worker has {count or 'no'} CUDA "
                                     "device(s)")
    return [f"cuda:{i}" for i in dict.fromkeys(indices)]


def job_device(settings: Settings | None = None) -> str:
    """The device a job computes on (the first of :func:`job_devices`)."""
    return job_devices(settings)[0]


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


def budget(device: str, settings: Settings | None = None, devices: list[str] | None = None) -> DeviceBudget:
    """What a job may use on ``device``, and with ``devices`` (GPUs a model may be split over) on each of them."""
    import torch

    settings = settings or Settings()
    host = host_available_bytes()
    gpus = list(devices or [device]) if device.startswith("cuda") else [device]
    if device.startswith("cuda"):
        props = [torch.cuda.get_device_properties(torch.device(d)) for d in gpus]
        dev_bytes, name = int(props[0].total_memory), props[0].name
        each = min(int(p.total_memory) for p in props)
    else:
        dev_bytes, name = host, "CPU (host memory)"
        each = dev_bytes
    if settings.max_device_memory is not None:
        dev_bytes, each = min(dev_bytes, settings.max_device_memory), min(each, settings.max_device_memory)
        if device == "cpu":
            host = dev_bytes
    return DeviceBudget(device, name, dev_bytes, host, tuple(gpus), each)


def check_plan(plan: Plan, available: DeviceBudget) -> None:
    """Refuse a job whose plan does not fit, naming the stage and the numbers."""
    stage, need = plan.peak("device")
    split = plan.mode == "split"
    how = {"streaming": "streamed, ", "split": f"split over {plan.devices} GPUs, "}.get(plan.mode, "")
    where = f"the fullest of {plan.devices} GPUs" if split else available.device
    limit = available.each_bytes if split and available.each_bytes is not None else available.device_bytes
    if need > limit:
        raise InsufficientMemoryFailure(
            f"{how}the {stage} stage needs about {format_bytes(need)} on {where} ({available.name}), "
            f"which has {format_bytes(limit)}: {plan.params / 1e9:.2f}B parameters in {plan.dtype} "
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


def choose_plan(spec: Any, source: Any, config: Any, available: DeviceBudget, streaming_problem: str | None,
                measure: bool = True) -> Plan:
    """The plan this worker runs the job by: the whole model on its device; spread over its GPUs (``model.split``:
    'on', 'off', or 'auto': when the whole model does not fit on one but fits across them); or its layers streamed
    (``model.streaming``: 'on', 'off', or 'auto': streamed only when neither of those fits). Raises
    InsufficientMemoryFailure when nothing fits, with the plans' numbers. ``measure``: as for :func:`plan_job`."""

    plan = job_planner(spec, source, config, available.device, measure)

    gpus = len(available.devices) if available.device.startswith("cuda") else 1
    if spec.model.split == "on":
        if gpus < 2:
            raise DeviceUnavailableError(f"model.split 'on' spreads the model over two or more GPUs; this worker uses "
                                         f"{gpus if available.device.startswith('cuda') else 'none'} "
                                         f"(RESTORELCC_DEVICE={Settings().device or 'unset: every GPU it sees'})")
        split = plan(devices=gpus)
        check_plan(split, available)
        return split
    wanted = spec.model.streaming
    whole = plan()
    split_note = ""
    if wanted != "on" and gpus > 1 and spec.model.split == "auto" and not fits(whole, available):
        split = plan(devices=gpus)
        if fits(split, available):
            return split
        split_note = f"; split over {gpus} GPUs, the fullest would need about {format_bytes(split.peak()[1])}"
    if wanted == "off" or (wanted == "auto" and (fits(whole, available) or streaming_problem is not None)):
        try:
            check_plan(whole, available)
        except InsufficientMemoryFailure as exc:
            raise InsufficientMemoryFailure(exc.message + split_note) from None
        return whole
    streamed = plan(streaming=True)
    if wanted == "auto" and not fits(streamed, available):
        stage, need = streamed.peak("device")
        try:
            check_plan(whole, available)
        except InsufficientMemoryFailure as exc:
            raise InsufficientMemoryFailure(f"{exc.message}{split_note}; streamed one layer at a time, the {stage} "
                                            f"stage would still need about {format_bytes(need)}") from None
    check_plan(streamed, available)
    return streamed


def plan_job(spec: Any, source: Any, config: Any, device: str, streaming: bool = False, measure: bool = True,
             devices: int = 1) -> Plan:
    """The job's plan (app.plan) from the model's config (as worker.model.load reads it); no weights. ``measure``:
    time it at this worker's measured speed on ``device`` (worker.run.speed), else at the device kind's nominal
    one."""
    return job_planner(spec, source, config, device, measure)(streaming=streaming, devices=devices)


def job_planner(spec: Any, source: Any, config: Any, device: str, measure: bool = True) -> Callable[..., Plan]:
    """:func:`plan_job` with what every plan of the job shares (shapes, file sizes, the device's speed) read once;
    call it with ``streaming`` or ``devices``."""
    gguf = source.kind == "gguf"
    path = source.path
    file_bytes = path.stat().st_size if gguf else safetensors_bytes(path) if path.is_dir() else None
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))  # transformers' or config.json's
    stored = None if gguf or not path.is_dir() else stored_dtype(path)
    shapes = Shapes.from_config(raw, stored)
    speed = None
    if measure:
        from worker.run.speed import device_speed

        speed = device_speed(device, compute_dtype(spec, shapes, gguf))
    return partial(make_plan, spec, shapes, device, gguf=gguf, file_bytes=file_bytes, speed=speed)
