"""The service's own costs: checkpoint writes per stage on SmolLM2, and status polling under 16 concurrent pollers.

    python -m bench service [--samples 64] [--eval-limit 32] [--seconds 20] [--pollers 16] [--again]
    python -m bench service --render-only       # rewrite docs/speed.md from the stored measurements

1. checkpoints: one job at the service default (Wanda 50%, RestoreLCC, 50 steps; smaller sample counts) through
   the pipeline with checkpoints in a local artifact store at the default interval: bytes and seconds written at
   each stage, as a fraction of that stage's time;
2. polling: one API process (`restorelcc serve`, PostgreSQL) and 16 pollers of GET /v1/jobs/{id} on one job,
   requests per second and latency percentiles, /healthz beside it; and the time of a running job's progress write
   (from a process of its own, as a worker's) with and without the pollers (polling must never slow a job's
   progress writes).

Both land in docs/speed.md as its part "The service's own costs" (bench/speed.py writes the rows above it).
Measurements are kept as bench/results/service-*.json and reused while their settings match; --again measures
anew.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import harness

CHECKPOINTS = harness.RESULTS / "service-checkpoints.json"
POLLING = harness.RESULTS / "service-polling.json"
PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--samples", type=int, default=64, help="calibration, probe and training samples")
    ap.add_argument("--eval-limit", type=int, default=32, help="rows per evaluation set")
    ap.add_argument("--seconds", type=float, default=20.0, help="polling time per measurement")
    ap.add_argument("--pollers", type=int, default=16)
    ap.add_argument("--only", choices=["checkpoints", "polling"], help="measure one of the two")
    ap.add_argument("--again", action="store_true", help="measure anew even when a measurement is stored")


# ── 1. checkpoint overhead ──────────────────────────────────────────────────────────────────────────────────


def measure_checkpoints(a: dict[str, Any], model_dir: str) -> dict[str, Any]:
    from app.schemas import JobSpec
    from worker.run.pipeline import run_pipeline
    from worker.run.resume import POINT_STAGE, local_resumer

    n = a["samples"]
    spec = JobSpec.model_validate({
        "model": {"id": model_dir},
        "pruning": {"method": "wanda", "sparsity": 0.5, "calibration_samples": n},
        "restoration": {"method": "restorelcc", "objective": "sft", "probe_samples": n, "train_samples": n},
        "data": {"train": harness.data("alpaca/train.jsonl")},
        "evaluation": {"perplexity": [harness.data("eval/wikitext_sentences.jsonl")],
                       "response_perplexity": [harness.data("alpaca/valid.jsonl")], "limit": a["eval_limit"]},
    })
    with tempfile.TemporaryDirectory() as tmp:
        resumer = local_resumer(Path(tmp) / "checkpoints", spec)
        report = run_pipeline(spec, Path(tmp) / "out", harness.LogReporter("checkpoints"), resumer)
    stages: dict[str, dict[str, float]] = {}
    for w in report["attempts"][-1]["checkpoints"]:
        s = stages.setdefault(POINT_STAGE[w["point"]].value, {"writes": 0, "bytes": 0, "seconds": 0.0})
        s["writes"] += 1
        s["bytes"] += w["bytes"]
        s["seconds"] += w["seconds"]
    for name, s in stages.items():
        s["stage_seconds"] = report["stages"][name]["seconds"]
    return {"settings": a, "stages": stages, "steps": spec.restoration.max_steps, "machine": harness.machine(),
            "date": time.strftime("%Y-%m-%d")}


# ── 2. polling ──────────────────────────────────────────────────────────────────────────────────────────────


def measure_polling(a: dict[str, Any]) -> dict[str, Any]:
    """Everything on every core, as a small deployment runs; then (``isolated``) with the job's writer process and
    its database connection on the last core, and the API, its poll connections and the load generator on the
    others — what is left of the slowdown then is contention inside the database, not shared CPU."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG, isolation_level="AUTOCOMMIT")
    try:
        out: dict[str, Any] = {"isolated": None}
        for isolate in (False, True):
            if isolate and not (hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2):
                break  # one core (or no affinity control): nothing to isolate the writer on
            schema = f"bench_{uuid.uuid4().hex[:10]}"
            with admin.connect() as c:
                c.execute(text(f"CREATE SCHEMA {schema}"))
            try:
                result = _poll_service(a, f"{PG}?options=-csearch_path%3D{schema}", isolate)
            finally:
                with admin.connect() as c:
                    c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            if not isolate:
                out.update(result)
            elif result["cores"] is not None:
                out["isolated"] = {k: result[k] for k in ("job", "write_quiet", "write_polled", "cores")}
        return out
    finally:
        admin.dispose()


def _cores() -> tuple[set[int], set[int]]:
    """(the service's and load generator's cores, the job writer's core: the last one)."""
    cores = sorted(os.sched_getaffinity(0))
    return set(cores[:-1]), {cores[-1]}


def _pin_backends(db_url: str, application_name: str, cores: set[int]) -> int:
    """Pin the PostgreSQL backends of this run's API (connected as ``application_name``) to ``cores``; they end
    with the API. Raises OSError when they are not this machine's processes (a server in a container, another
    host) or may not be moved."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    with engine.connect() as c:
        pids = c.scalars(text("SELECT pid FROM pg_stat_activity WHERE application_name = :n"),
                         {"n": application_name}).all()
    engine.dispose()
    for pid in pids:
        if not Path(f"/proc/{pid}/comm").read_text().startswith("postgres"):
            raise OSError(f"process {pid} is not a PostgreSQL backend of this machine")
        os.sched_setaffinity(pid, cores)
    return len(pids)


def _poll_service(a: dict[str, Any], db_url: str, isolate: bool = False) -> dict[str, Any]:

    from app.schemas import JobSpec
    from app.store.db import make_engine, upgrade
    from app.store.jobs import JobStore

    engine = make_engine(db_url)
    upgrade(engine)
    jobs = JobStore(engine)
    spec = JobSpec.model_validate({"model": {"id": "bench/model"}, "data": {"train": "train.jsonl"}})
    job, _ = jobs.create("bench", spec.model_dump(mode="json"))
    jobs.claim(job.id, "bench")  # running: the job whose progress a worker would write
    from worker.cli.demo import free_port, wait_healthy

    port = free_port()
    name = f"restorelcc-bench-{uuid.uuid4().hex[:8]}"  # this run's API connections, and no one else's
    env = {**os.environ, "DATABASE_URL": f"{db_url}&application_name={name}", "REDIS_URL": "redis://127.0.0.1:6379/0",
           "RESTORELCC_API_KEYS": "bench:bench-key", "RESTORELCC_PORT": str(port)}
    served, writer = _cores() if isolate else (None, None)
    pinned: int | None = None
    with tempfile.TemporaryDirectory() as tmp:
        env["RESTORELCC_DATA_DIR"] = tmp
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=(lambda: os.sched_setaffinity(0, served)) if served else None)
        url = f"http://127.0.0.1:{port}"
        own = os.sched_getaffinity(0) if served else None
        try:
            wait_healthy(url, proc)
            headers = {"Authorization": "Bearer bench-key"}
            _load(f"{url}/v1/jobs/{job.id}", headers, a["pollers"], 1.0)  # every poll connection open
            if served:
                try:
                    pinned = _pin_backends(db_url, name, served)
                except OSError as exc:
                    print(f"polling: the writer cannot be isolated here ({exc})", file=sys.stderr)
                    served = writer = None
            quiet_write = _load_free_writes(db_url, job.id, a["seconds"] / 2, writer)
            if served:
                os.sched_setaffinity(0, served)  # the load generator beside the API
            job_poll = _load(f"{url}/v1/jobs/{job.id}", headers, a["pollers"], a["seconds"],
                             (_progress_writes, (db_url, job.id, a["seconds"], writer)))
            health = _load(f"{url}/healthz", {}, a["pollers"], a["seconds"] / 2)
        finally:
            if own is not None:
                os.sched_setaffinity(0, own)
            proc.terminate()
            proc.wait(timeout=30)
    engine.dispose()
    return {"settings": a, "job": job_poll["load"], "healthz": health["load"], "write_quiet": quiet_write,
            "write_polled": job_poll["during"], "machine": harness.machine(), "date": time.strftime("%Y-%m-%d"),
            "cores": {"service": sorted(served), "writer": sorted(writer), "pinned_api_connections": pinned}
            if served and writer else None}


def _load_free_writes(db_url: str, job_id: str, seconds: float, core: set[int] | None = None) -> dict[str, float]:
    """:func:`_progress_writes` in a process of its own, nothing else running."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_progress_writes, (db_url, job_id, seconds, core))


def _progress_writes(db_url: str, job_id: str, seconds: float, core: set[int] | None = None) -> dict[str, float]:
    """A worker's progress writes (every 50 ms, as a job reports), from a process of its own as a worker's are:
    median and p99 milliseconds per write. ``core``: this process and its one database connection run there."""
    from sqlalchemy import text

    from app.store.db import make_engine
    from app.store.jobs import JobStore

    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    if core is not None:
        os.sched_setaffinity(0, core)
        with engine.connect() as c:
            os.sched_setaffinity(int(c.scalar(text("SELECT pg_backend_pid()"))), core)
    jobs = JobStore(engine)
    jobs.set_progress(job_id, 0.0, "warm-up")
    times = []
    end = time.monotonic() + seconds
    k = 0
    while time.monotonic() < end:
        t0 = time.perf_counter()
        jobs.set_progress(job_id, min(1.0, k / 1e6), f"step {k}")
        times.append(time.perf_counter() - t0)
        k += 1
        time.sleep(0.05)
    engine.dispose()
    return _summary(times)


def _summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"n": len(times), "median_ms": 1000 * statistics.median(times),
            "p99_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))]}


def _load(url: str, headers: dict[str, str], pollers: int, seconds: float, beside: Any = None) -> dict[str, Any]:
    """``pollers`` concurrent keep-alive connections sending GET ``url`` for ``seconds``; ``beside()`` runs meanwhile
    in another process and its result is returned as ``during``.

    The client is a minimal HTTP/1.1 one on asyncio streams (a request written, the head read, the body read by its
    Content-Length), so that the load generator takes as little as it can of the CPU it shares with the API.
    """
    import asyncio
    import multiprocessing
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    request = (f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    latencies: list[float] = []
    errors = 0

    async def poller(end: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                errors += head[9:12] != b"200"
        finally:
            writer.close()

    async def run() -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(poller(t0 + seconds) for _ in range(pollers)))
        return time.monotonic() - t0

    during: dict[str, Any] = {}
    pool = None
    if beside is not None:
        pool = multiprocessing.get_context("spawn").Pool(1)
        pending = pool.apply_async(beside[0], beside[1])
    elapsed = asyncio.run(run())
    if pool is not None:
        during = pending.get()
        pool.close()
        pool.join()
    load = {"requests": len(latencies), "errors": errors, "per_s": len(latencies) / elapsed, **_summary(latencies)}
    return {"load": load, "during": during}


# ── the page section ────────────────────────────────────────────────────────────────────────────────────────


def section(checkpoints: dict[str, Any] | None, polling: dict[str, Any] | None, command: str) -> str:
    """The service's part of docs/speed.md."""
    out = ["## The service's own costs", ""]
    targets = harness.TARGETS["service"]
    if checkpoints is None:
        out += ["Checkpoint overhead: not measured yet (`python -m bench service --only checkpoints`).", ""]
    else:
        c = checkpoints
        rows = []
        for stage, s in c["stages"].items():
            share = s["seconds"] / s["stage_seconds"] if s["stage_seconds"] else 0.0
            rows.append([stage, s["writes"], f"{s['bytes'] / 2**20:,.1f} MiB", f"{s['seconds']:.2f} s",
                         f"{s['stage_seconds']:.1f} s", f"{100 * share:.2f} %",
                         "yes" if share <= targets["checkpoint_share"] else "**no**"])
        out += [f"**Checkpoints** (SmolLM2-135M-Instruct, float32, {c['machine']['threads']} threads, "
                f"{c['date']}): one job at the service default — Wanda 50%, RestoreLCC (objective sft), "
                f"{c['steps']} steps, "
                f"checkpoints at the default interval (every 50 steps) into a local artifact store; "
                f"{c['settings']['samples']} calibration, probe and training samples, {c['settings']['eval_limit']} "
                f"rows per evaluation set. Goal: each stage's writes ≤ {100 * targets['checkpoint_share']:g} % of "
                "that stage's time.", "",
                harness.markdown_table(["stage", "checkpoints", "size", "write time", "stage time", "share", "met"],
                                       rows), "",
                "The pruning stage's checkpoint holds the pruned Linears' weights (float32 here: half that in "
                "bf16); the others hold the dense and pruned captures, the chosen heads and directions, or the "
                "training state (trained values, AdamW's moments, random states). Every write goes through a "
                "scratch file and the artifact store's atomic put, which reads it once more to hash it.", ""]
    if polling is None:
        out += ["Polling: not measured yet (`python -m bench service --only polling`).", ""]
    else:
        p = polling
        j, h = p["job"], p["healthz"]
        slow = p["write_polled"]["median_ms"] / p["write_quiet"]["median_ms"]
        met = j["per_s"] >= targets["poll_per_s"] and j["p99_ms"] < targets["poll_p99_ms"]
        out += [f"**Polling** ({p['date']}, {p['machine']['cpus']} CPUs shared by the API process, PostgreSQL and "
                f"the load generator; no job running): {p['settings']['pollers']} concurrent pollers, keep-alive, "
                f"{p['settings']['seconds']:g} s each. Goal: ≥ {targets['poll_per_s']:,} req/s and p99 < "
                f"{targets['poll_p99_ms']} ms for `GET /v1/jobs/{{id}}`.", "",
                harness.markdown_table(["request", "req/s", "median", "p99", "errors", "goal met"], [
                    ["GET /v1/jobs/{id}", f"{j['per_s']:,.0f}", f"{j['median_ms']:.1f} ms", f"{j['p99_ms']:.1f} ms",
                     j["errors"], "yes" if met else "**no**"],
                    ["GET /healthz", f"{h['per_s']:,.0f}", f"{h['median_ms']:.1f} ms", f"{h['p99_ms']:.1f} ms",
                     h["errors"], "—"],
                ]), "",
                f"`/healthz` touches neither the database nor the key ring; a job's status runs at "
                f"{j['per_s'] / h['per_s']:.2f}× its rate, so " + (
                    "most of a status request's cost is its read of the job store (one autocommit SELECT from the "
                    "event loop on a pooled read connection: a round trip to a PostgreSQL that shares the cores "
                    "here)."
                    if j["per_s"] < 0.5 * h["per_s"] else
                    "most of a status request's cost is the HTTP stack of one Python process; the key check, the job "
                    "lookup and its JSON add the rest."),
                "",
                f"A worker's progress write (one UPDATE, every 50 ms): median {p['write_quiet']['median_ms']:.2f} ms "
                f"without pollers, {p['write_polled']['median_ms']:.2f} ms under them ({slow:.2f}×; p99 "
                f"{p['write_quiet']['p99_ms']:.1f} → {p['write_polled']['p99_ms']:.1f} ms). The polls take no locks "
                "(autocommit snapshots on read-only connections): what the write shares with them is the cores.", ""]
        iso = p.get("isolated")
        if iso is not None:
            c, w = iso["cores"], iso["job"]
            n = len(c["service"])
            out += [f"The same with the job's writer process and its database connection on core "
                    f"{', '.join(map(str, c['writer']))} and the API, its {c['pinned_api_connections']} database "
                    f"connections and the load generator on {'core' if n == 1 else 'cores'} "
                    f"{', '.join(map(str, c['service']))} (the rest of PostgreSQL unpinned): the write's median "
                    f"{iso['write_quiet']['median_ms']:.2f} ms without pollers, "
                    f"{iso['write_polled']['median_ms']:.2f} ms under them "
                    f"({iso['write_polled']['median_ms'] / iso['write_quiet']['median_ms']:.2f}×; p99 "
                    f"{iso['write_quiet']['p99_ms']:.1f} → {iso['write_polled']['p99_ms']:.1f} ms), while the "
                    f"pollers got {w['per_s']:,.0f} req/s (p99 {w['p99_ms']:.1f} ms) on "
                    f"{'that core' if n == 1 else 'those cores'}.", ""]
    out += [f"Produced by `{command}`.", ""]
    return "\n".join(out)


def stored() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    store = harness.Store(harness.RESULTS)
    return store.read(CHECKPOINTS), store.read(POLLING)


def main(args: argparse.Namespace, argv: list[str]) -> int:
    store = harness.Store(harness.RESULTS)
    if not args.render_only:
        if args.only in (None, "checkpoints"):
            a = {"samples": args.samples, "eval_limit": args.eval_limit}
            if args.again:
                CHECKPOINTS.unlink(missing_ok=True)
            model = harness.model_path(harness.models()[0])
            store.get(CHECKPOINTS, {"settings": a}, lambda: measure_checkpoints(a, model), "checkpoints")
        if args.only in (None, "polling"):
            a = {"seconds": args.seconds, "pollers": args.pollers}
            if args.again:
                POLLING.unlink(missing_ok=True)
            store.get(POLLING, {"settings": a}, lambda: measure_polling(a), "polling")
    checkpoints, polling = stored()
    settings = {**(checkpoints or {}).get("settings", {}), **(polling or {}).get("settings", {})}
    flags = [f"--{k.replace('_', '-')}={v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')}={v}"
             for k, v in settings.items()]
    text = section(checkpoints, polling, harness.page_command("service", flags))
    harness.write_part(harness.DOCS / "speed.md", "service", text)
    return 0
