"""Generate the ahead-of-time plan reports in benchmarks/results/ (full-size configs, real TPU topologies).

    python benchmarks/plan_reports.py [--only NAME ...] [--fast]

Each report is the JSON of ``launch.plan.report`` (keys: topology, mesh, fits, bytes_per_device,
hbm_bytes_per_device, flops_per_step, estimated_mfu, ...) plus the jax / libtpu versions. Full-size compiles take
minutes each on a small CPU host.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.plans import get_plan  # noqa: E402
from launch.plan import fit_message, format_report, report  # noqa: E402
from launch.topology import parse_topology  # noqa: E402

# name -> (plan config, topology, mesh (data, fsdp, tensor), remat)
REPORTS: dict[str, tuple[str, str, tuple[int, int, int], str]] = {
    "ar_train_v5p-4x4x4": ("ar_train", "v5p:4x4x4", (1, 64, 1), "none"),
    "ar_train_v6e-8x8": ("ar_train_v6e", "v6e:8x8", (1, 64, 1), "full"),
    "generation_decoder_train_v6e-2x4": ("generation_decoder_train", "v6e:2x4", (1, 8, 1), "full"),
    "generation_sample_512_v6e-2x4": ("generation_sample_512", "v6e:2x4", (2, 1, 4), "none"),
    "flux_dev_sample_1024_v6e-2x2": ("flux_dev_sample_1024", "v6e:2x2", (4, 1, 1), "none"),
}


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help=f"subset of {sorted(REPORTS)}")
    p.add_argument("--fast", action="store_true", help="memory from reduced-depth compiles too (minutes faster)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    for name in args.only or sorted(REPORTS):
        config, topology, mesh, remat = REPORTS[name]
        start = time.time()
        rep = report(get_plan(config), parse_topology(topology), mesh, remat, full=not args.fast)
        rep["generated_by"] = "benchmarks/plan_reports.py"
        rep["wall_seconds"] = round(time.time() - start, 1)
        rep["versions"] = {"jax": _version("jax"), "jaxlib": _version("jaxlib"), "libtpu": _version("libtpu"),
                           "flax": _version("flax")}
        path = out / f"plan_{name}.json"
        path.write_text(json.dumps(rep, indent=2, sort_keys=True) + "\n")
        print(format_report(rep), flush=True)
        print(f"  -> {path}", flush=True)
        if not rep["fits"]:
            print("  " + fit_message(rep), flush=True)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
