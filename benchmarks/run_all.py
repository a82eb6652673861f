"""Run every JAX-vs-torch benchmark on the pinned harness, store the last lines, refresh the README's table.

    python benchmarks/run_all.py [--smoke] [--threads N] [--only vae vision ...] [--repeats 3] [--no-readme]

Runs the benchmarks one after the other (each one runs its sides one after the other, see benchmarks/harness.py),
writes ``benchmarks/results/summary.json`` (``summary_smoke.json`` with ``--smoke``): each benchmark's last-line JSON
(with its ``load``/``busy``) plus the load before and after the whole run. A full run (not ``--smoke``) also rewrites
the measured column of README.md's benchmark table between ``<!-- benchmarks:begin -->`` and
``<!-- benchmarks:end -->`` for the benchmarks it ran; other rows (conversion, plan reports) are kept as they are.

``--repeats N`` runs the list N times over (round 1 of every benchmark, then round 2, ...: a slow spell of the VM
hits one round of several benchmarks, not every round of one) and keeps, per benchmark, the run whose first headline
key is the median; ``runs`` records every run's headline values, and the README cell gives their range. On the
shared 2-core VMs single runs of one benchmark moved by up to 20% within minutes (each side runs once, in turn).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"

# name -> (the README's headline keys, extra arguments of the full run)
BENCHMARKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text_decoder": (("forward_ratio", "decode_ratio", "decode_batch_scaling"), ()),
    "vision": (("ratio",), ()),
    "prefill_slots": (("ratio",), ()),
    "decoder": (("step_ratio", "sample_ratio"), ()),
    "vae": (("ratio",), ()),
    "train_step": (("ratio", "loader_headroom"), ()),
    "inference": (("ratio_b1", "ratio_b4", "ratio_b8"), ()),
    "unipic": (("ratio",), ("--no-write",)),
}
SMOKE_ARGS = {"unipic": ("--no-write",)}


def run_one(name: str, smoke: bool, threads: int | None) -> dict:
    """Run ``benchmarks/<name>.py``; its last stdout line as a dict (plus ``wall_s``)."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py")]
    cmd += ["--smoke", *SMOKE_ARGS.get(name, ())] if smoke else list(BENCHMARKS[name][1])
    if threads:
        cmd += ["--threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        return {"error": f"exited {proc.returncode}", "wall_s": round(wall, 1)}
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"wall_s": round(wall, 1)}


def median_run(runs: list[dict], keys: tuple[str, ...]) -> dict:
    """The run whose ``keys[0]`` is the median (the lower middle of an even count) plus ``runs``: every run's
    ``keys`` values, load and busy flag. Failed runs are kept in ``runs`` and skipped; all failed: the first run."""
    ok = sorted((r for r in runs if "error" not in r and isinstance(r.get(keys[0]), (int, float))),
                key=lambda r: r[keys[0]])
    chosen = dict(ok[(len(ok) - 1) // 2] if ok else runs[0])
    if len(runs) > 1:
        chosen["runs"] = [{k: r.get(k) for k in (*keys, "load", "busy", "error") if k in r} for r in runs]
    return chosen


def measured_cell(result: dict, keys: tuple[str, ...]) -> str:
    """The README's measured column for one result: headline values (with ``runs``: each key's median and range),
    threads and load."""
    if "error" in result:
        return f"failed ({result['error']})"
    runs = [r for r in result.get("runs", []) if "error" not in r]

    def value(k: str) -> str:  # one run: its value; several: each key's own (lower) median and range
        seen = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        if len(seen) > 1:
            return f"{statistics.median_low(seen):.2f} [{min(seen):.2f}-{max(seen):.2f}]"
        v = result.get(k)
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    values = ", ".join(value(k) for k in keys)
    load = "/".join(f"{x:.1f}" for x in result.get("load", []))
    busy = "; BUSY machine, do not quote" if result.get("busy") or any(r.get("busy") for r in runs) else ""
    median = f"median of {len(runs)} runs [range], " if len(runs) > 1 else ""
    return f"{values} ({median}pinned harness, {result.get('threads')} thread(s) per side, load {load}{busy})"


def render_table(lines: list[str], results: dict[str, dict]) -> list[str]:
    """Replace the measured column of the table rows for ``results``; keep every other line."""
    out = []
    for line in lines:
        cells = line.split("|")
        name = cells[1].strip().strip("`").split(".py")[0] if len(cells) > 3 else ""
        if name in results and name in BENCHMARKS:
            cells[3] = f" {measured_cell(results[name], BENCHMARKS[name][0])} "
            line = "|".join(cells)
        out.append(line)
    return out


def update_readme(results: dict[str, dict], path: str = README) -> None:
    """Rewrite the table between the markers of ``path`` (atomically)."""
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} lacks the {BEGIN} / {END} markers around the benchmark table")
    head, rest = text.split(BEGIN, 1)
    table, tail = rest.split(END, 1)
    new = "\n".join(render_table(table.split("\n"), results))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(head + BEGIN + new + END + tail)
    os.replace(tmp, path)


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="each benchmark's --smoke mode (no README update)")
    ap.add_argument("--threads", type=int, default=None, help="threads per side (default: each script's default)")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=sorted(BENCHMARKS))
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the list; per benchmark the median run "
                                                            "(by its first headline key) is kept, all runs listed")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite README.md's table")
    ap.add_argument("--from-summary", action="store_true",
                    help="run nothing: rewrite README.md's table from the stored benchmarks/results/summary.json")
    args = ap.parse_args(argv)
    if args.from_summary:
        with open(os.path.join(RESULTS, "summary.json")) as f:
            summary = json.load(f)
        update_readme(summary["results"])
        return summary
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    load_before = [round(x, 2) for x in os.getloadavg()]
    names = [n for n in BENCHMARKS if n in args.only]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for round_ in range(args.repeats):
        for name in names:
            print(f"=== {name}" + (f" (round {round_ + 1} of {args.repeats})" if args.repeats > 1 else ""), flush=True)
            runs[name].append(run_one(name, args.smoke, args.threads))
    results = {name: median_run(runs[name], BENCHMARKS[name][0]) for name in names}
    summary = {"mode": "smoke" if args.smoke else "full", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime()),
               "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
               "cpus": len(os.sched_getaffinity(0)), "results": results}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "summary_smoke.json" if args.smoke else "summary.json")
    for r in results.values():
        r["date_utc"] = summary["date_utc"]
    if set(args.only) != set(BENCHMARKS) and os.path.exists(path):  # a partial run updates its rows only
        with open(path) as f:
            summary["results"] = json.load(f)["results"] | results
    write_json(path, summary)
    if not args.smoke and not args.no_readme:
        update_readme(results)
    print(json.dumps({k: {"wall_s": v.get("wall_s"), "busy": v.get("busy"), "error": v.get("error")}
                      for k, v in results.items()}))
    return summary


if __name__ == "__main__":
    main()
