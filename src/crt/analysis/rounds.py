"""Run `crt bench`'s cases, each in a fresh process, round after round, and merge the rounds."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from crt.analysis.bench import diagonal_summary, p95, run_case, run_diagonal


def _worker(case: dict[str, Any], queue: Any) -> None:
    try:
        queue.put(run_diagonal(case) if case.get("diagonal") else run_case(case))
    except Exception as e:  # reported in the table, the other cases still run
        queue.put({"name": case["name"], "precision": case["precision"], "error": f"{type(e).__name__}: {e}"})


@contextmanager
def busy_cores(n: int) -> Iterator[None]:
    """n background processes, each keeping one core busy in pure Python: another job on the machine."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def run_isolated(case: dict[str, Any]) -> dict[str, Any]:
    """One case in a fresh process (with case["busy"] cores kept busy beside it while it runs)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with busy_cores(case.get("busy", 0)):
        proc = ctx.Process(target=_worker, args=(case, queue))
        proc.start()
        result = queue.get()
        proc.join()
    return result


def run_rounds(cases: list[dict[str, Any]], rounds: int, log=print) -> list[dict[str, Any]]:
    """Every case once per round, each time in a fresh process; results merged over the rounds.

    Shared machines drift over minutes, so cases measured one after another are not comparable;
    taking each case once per round spreads the drift over all of them. Rates are the median
    over every timed group of every round, peak memory the largest seen, and MFU uses the
    median matmul peak of the case's rounds.
    """
    per_case: list[list[dict[str, Any]]] = [[] for _ in cases]
    for r in range(rounds):
        for i, case in enumerate(cases):
            result = run_isolated(case)
            per_case[i].append(result)
            if "error" in result:
                line = result["error"]
            elif case.get("diagonal"):
                d = diagonal_summary(result)
                line = f"sequential {d['sequential_s']:.3f} s, diagonal {d['diagonal_s']:.3f} s ({d['speedup']:.2f}x)"
            else:
                line = f"train {result['train_tokens_per_s']:,.0f} tok/s, infer {result['infer_tokens_per_s']:,.0f} tok/s"
            log(f"round {r + 1}/{rounds} {case['name']} {case['precision']}: {line}")
    merged = []
    for runs in per_case:
        failed = next((x for x in runs if "error" in x), None)
        if failed:
            merged.append(failed)
            continue
        if "seq_runs" in runs[0]:
            merged.append(
                {
                    **runs[0],
                    "seq_runs": [v for x in runs for v in x["seq_runs"]],
                    "diag_runs": [v for x in runs for v in x["diag_runs"]],
                    "max_logit_diff": max(x["max_logit_diff"] for x in runs),
                }
            )
            continue
        train = [v for x in runs for v in x["train_runs"]]
        infer = [v for x in runs for v in x["infer_runs"]]
        latency = [v for x in runs for v in x["token_latency_runs"] or []] or None
        peak = statistics.median(x["matmul_peak_flops"] for x in runs)
        merged.append(
            {
                **runs[0],
                "train_runs": train,
                "infer_runs": infer,
                "train_tokens_per_s": statistics.median(train),
                "infer_tokens_per_s": statistics.median(infer),
                "token_latency_runs": latency,
                "token_latency_ms": statistics.median(latency) * 1e3 if latency else None,
                "token_latency_p95_ms": p95(latency) * 1e3 if latency else None,
                "peak_memory_mib": max(x["peak_memory_mib"] for x in runs),
                "matmul_peak_flops": peak,
                "mfu": statistics.median(train) * runs[0]["train_flops_per_token"] / peak,
            }
        )
    return merged
