"""Run Stage-1 searches for several models and budgets at once, one `rstr search` process each.

Made for a lent GPU (16 cores, one H200): small models leave the GPU mostly idle, so searches run
side by side.  Each search writes ``<out>/<model>/budget-<pct>/`` (schedule, report, plots) and its
log; after every finished search the whole ``<out>`` tree is packed into ``--archive`` (when given),
so a run cut short still returns what finished.

    python tools/search_all.py --models digits-pixart digits-flux --budgets 0.5 0.3 --device cuda \\
        --out docs/search --archive $OUT/searches.tar.gz
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path


def job_dir(out: Path, model: str, budget: float) -> Path:
    return out / Path(model).name / f"budget-{round(budget * 100)}"


def run_one(model: str, budget: float, args: argparse.Namespace) -> tuple[str, float, int, float]:
    """One search; returns (model, budget, exit code, seconds)."""
    d = job_dir(args.out, model, budget)
    d.mkdir(parents=True, exist_ok=True)
    images = args.teacher_images if budget >= 1.0 and args.teacher_images else args.images
    cmd = [
        sys.executable,
        "-m",
        "rstr.cli",
        "search",
        "--model",
        model,
        "--budget",
        str(budget),
        "--preset",
        args.preset,
        "--device",
        args.device,
        "--seed",
        str(args.seed),
        "--out",
        str(d / "schedule.json"),
    ]
    if images:
        cmd += ["--images", str(images)]
    t0 = time.perf_counter()
    with open(d / "search.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    return model, budget, rc, time.perf_counter() - t0


def pack(out: Path, archive: Path) -> None:
    tmp = archive.with_suffix(".part")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name, filter=lambda m: None if m.name.endswith(".search") or "/." in m.name else m)
    tmp.replace(archive)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="model paths or reference model names")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
    p.add_argument("--preset", default="full")
    p.add_argument("--images", type=int, default=None, help="images per candidate (default: the preset's)")
    p.add_argument("--teacher-images", type=int, default=None, help="images per candidate for budget-1.0 (teacher) searches")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=4, help="searches at once")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--archive", type=Path, default=None, help=".tar.gz to refresh after every finished search")
    args = p.parse_args()
    jobs = [(m, b) for m in args.models for b in args.budgets]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, m, b, args) for m, b in jobs]
        for f in as_completed(futures):
            model, budget, rc, seconds = f.result()
            print(f"{model} budget {budget:g}: exit {rc} in {seconds:.0f} s", flush=True)
            if args.archive is not None:
                pack(args.out, args.archive)


if __name__ == "__main__":
    main()
