"""Multi-process tests on the CPU with gloo: a launcher (pytest side) and the worker it starts (this file run as a
script), few launches with many checks each.

A test module registers *scenarios* with ``@scenario(worlds=(2, 3))``: functions ``(rank, world) -> None`` that every
rank runs in the same order (each must make the same collectives on every rank, and assert only after its last
collective, so that a failed check cannot leave another rank waiting). ``launch(module, world, tmp)`` starts
``world`` processes that run every scenario of the module registered for that world size and returns, per
scenario, ``None`` or the failures of each rank. A launch that does not end in time is killed, and every scenario it
did not finish fails with the name of the one it hung in: a timeout is a failure, never a skip.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
_SCENARIOS: dict[str, list] = {}  # module name -> [(name, worlds, fn)]

# A collective that waits longer than this raises in the worker (the rank that is absent hung or failed); the
# launcher's own timeout is larger and kills whatever is left.
COLLECTIVE_TIMEOUT_S = 40
CRASH_GRACE_S = 5  # after a rank dies, how long the others get to write their results


def scenario(worlds=(2, 3)):
    def register(fn):
        _SCENARIOS.setdefault(fn.__module__, []).append((fn.__name__, tuple(worlds), fn))
        return fn
    return register


def scenario_names(module: str, world: int) -> list[str]:
    mod = importlib.import_module(module)
    return [name for name, worlds, _ in _SCENARIOS.get(mod.__name__, []) if world in worlds]


def scenario_tests(module: str, worlds, prefix: str = "world"):
    """The pytest side of a scenario module: ``(pytest_generate_tests, test_scenario)``, to bind at module level.
    One launch per world size (cached), one test per scenario that reads its result."""
    import pytest

    results: dict = {}

    def pytest_generate_tests(metafunc):  # after the module (and so every scenario) is loaded
        if metafunc.function is test_scenario:
            metafunc.parametrize("world, name", [pytest.param(world, name, id=f"{name}-world{world}")
                                                 for world in worlds for name in scenario_names(module, world)])

    def test_scenario(world, name, tmp_path_factory):
        if world not in results:
            results[world] = launch(module, world, tmp_path_factory.mktemp(f"{prefix}{world}"))
        failure = results[world][name]
        assert failure is None, failure

    return pytest_generate_tests, test_scenario


_GROUP = None


def scenario_group():
    """The process group of the running scenario (all ranks, new for each scenario)."""
    return _GROUP


# --- the launcher -------------------------------------------------------------------------------------------------

def launch(module: str, world: int, tmp: Path, timeout_s: float = 150.0, env: dict | None = None) -> dict:
    """Run every scenario of ``module`` for ``world`` ranks; ``{scenario: None | "failure text"}``."""
    tmp.mkdir(parents=True, exist_ok=True)
    store = tmp / "store"
    store.unlink(missing_ok=True)
    names = scenario_names(module, world)
    procs, logs = [], []
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    child_env = {**os.environ, **(env or {}), "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    for rank in range(world):
        log = open(tmp / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "distributed_helpers.py"), module, str(rank), str(world), str(store), str(tmp)],
            stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=str(HERE.parent)))
    deadline = time.monotonic() + timeout_s
    timed_out = False
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            timed_out = True
            break
        if any(p.returncode not in (None, 0) for p in procs):  # a rank died: the others cannot finish
            deadline = min(deadline, time.monotonic() + CRASH_GRACE_S)
        time.sleep(0.1)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    for log in logs:
        log.close()
    return _collect(names, world, tmp, timed_out, timeout_s, [p.returncode for p in procs])


def _collect(names, world, tmp: Path, timed_out: bool, timeout_s: float, codes) -> dict:
    per_rank = []
    for rank in range(world):
        path = tmp / f"rank{rank}.json"
        per_rank.append(json.loads(path.read_text()) if path.exists() else {})
    results = {}
    for name in names:
        failures = []
        for rank, done in enumerate(per_rank):
            status = done.get(name)
            if status is None:
                tail = (tmp / f"rank{rank}.log").read_text()[-3000:]
                why = f"timed out after {timeout_s:.0f} s" if timed_out else f"exited with code {codes[rank]}"
                current = done.get("__current__")
                failures.append(f"rank {rank}: no result ({why}; it was running {current!r}). Log tail:\n{tail}")
            elif status != "ok":
                failures.append(f"rank {rank}:\n{status}")
        results[name] = "\n".join(failures) or None
    # A rank that reported every scenario and then died (at exit, say) fails the launch's last scenario.
    crashed = [f"rank {rank} exited with code {code}; log tail:\n{(tmp / f'rank{rank}.log').read_text()[-2000:]}"
               for rank, code in enumerate(codes) if code != 0 and all(name in per_rank[rank] for name in names)]
    if crashed and names:
        results[names[-1]] = "\n".join(filter(None, [results[names[-1]], *crashed]))
    return results


# --- the worker ---------------------------------------------------------------------------------------------------

def _worker(module: str, rank: int, world: int, store_path: str, out_dir: str) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    mod = importlib.import_module(module)
    out = Path(out_dir) / f"rank{rank}.json"
    done: dict = {}
    for name, worlds, fn in _SCENARIOS.get(mod.__name__, []):
        if world not in worlds:
            continue
        done["__current__"] = name
        out.write_text(json.dumps(done))
        # A group of its own per scenario: if a failure leaves the ranks out of step, a collective of one scenario
        # never pairs with another's; it times out, and the next scenario starts in step.
        global _GROUP
        _GROUP = dist.new_group(list(range(world)))
        torch.manual_seed(0)
        started = time.monotonic()
        try:
            fn(rank, world)
            done[name] = "ok"
        except BaseException:  # noqa: BLE001 - every failure is reported, the next scenario still runs
            done[name] = traceback.format_exc()
        print(f"rank {rank}: {name} {'ok' if done[name] == 'ok' else 'FAILED'} in {time.monotonic() - started:.1f} s",
              flush=True)
        done.pop("__current__")
        out.write_text(json.dumps(done))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    import distributed_helpers  # the module the scenarios registered with (this script is __main__)

    sys.exit(distributed_helpers._worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]))
