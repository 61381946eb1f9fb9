"""Memory and speed against dataset size: peak RSS and images/s of train, tune's feature extraction and
predict on synthetic IDC-scale folders.

Each size is a folder in a temp dir made of the developer IDC patches, symlinked again and again under
new patient ids (``<copy><patient>``), so that patients, labels and the class balance keep the real
set's shape. Every command runs as its own process (as a user runs it); its peak resident memory is the
process's ``ru_maxrss`` from ``os.wait4`` and its rate is images over the command's wall time
(discovery, decoding and caching included). The table's ratio column compares each command with the
same command at the smallest size, measured in the same run: flat memory reads ~1.0, and so does
throughput that does not degrade with size.

    python bench/scale.py --sizes 10000,70000,277000
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import absolute  # noqa: E402

IDC_MATCH = "_idx5_"
EXTRACT = """
import sys
from histoflow.data.step import prepare_data
from histoflow.modeling.variants import make_train_config
from pathlib import Path
from histoflow.modeling.features import load_or_extract
from histoflow.modeling.training_run import stain_normalizer
config = make_train_config("transfer", data_dir=sys.argv[1], image_size=int(sys.argv[2]), unfrozen_blocks=0,
                           weights=sys.argv[3])
prepared = prepare_data(config)
load_or_extract(config, prepared, Path(sys.argv[4]) / "features", stain_normalizer(config, prepared))
"""


def synthetic_idc(source: Path, target: Path, size: int) -> Path:
    """`size` symlinks to the IDC patches under `target`, copy c of patient p as patient <c><p>."""
    files = sorted(source.rglob("*.png"))
    made = 0
    for copy in range(math.ceil(size / len(files))):
        for f in files:
            if made == size:
                return target
            patient = f"{copy + 1}{f.parent.parent.name}"
            dest = target / patient / f.parent.name / f.name.replace(f.parent.parent.name + IDC_MATCH,
                                                                       patient + IDC_MATCH, 1)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(f.resolve())
            made += 1
    return target


def measure(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS in GiB, exit code) of one command run as a child process."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss / 2**20, os.waitstatus_to_exitcode(status)


def histoflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "histoflow.cli", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/idc")
    parser.add_argument("--sizes", default="10000,70000,277000")
    parser.add_argument("--image_size", type=int, default=128, help="the variants' default")
    parser.add_argument("--commands", default="train-baseline,train-transfer,tune-features,predict")
    parser.add_argument("--transfer_weights", default="imagenet")
    parser.add_argument("--workdir", default="", help="keep folders, caches and logs here (default: a temp dir)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    commands = args.commands.split(",")
    data_dir, weights = Path(absolute(args.data_dir)), absolute(args.transfer_weights)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="histoflow-scale-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # the commands' working directory: MLflow puts a sqlite store's artifacts under ./mlruns
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    size_args = ["--image_size", str(args.image_size), "--epochs", "1", "--gradcam_per_class", "1",
                 "--bootstrap", "0", "--image_cache", str(work / "images")]
    rows = []
    for n in sizes:
        folder = synthetic_idc(data_dir, work / f"idc-{n}", n)
        plan = {
            "train-baseline": histoflow("train", "--variant", "baseline", "--data_dir", str(folder), *size_args,
                                        "--experiment", f"scale-{n}"),
            "train-transfer": histoflow("train", "--variant", "transfer", "--data_dir", str(folder), *size_args,
                                        "--unfrozen_blocks", "0", "--weights", weights,
                                        "--experiment", f"scale-{n}"),
            "tune-features": [sys.executable, "-c", EXTRACT, str(folder), str(args.image_size),
                              weights, str(work / f"features-{n}")],
            "predict": histoflow("predict", "--data_dir", str(folder), "--model_uri", "models:/scale@challenger",
                                 "--output_dir", str(work / f"predictions-{n}")),
        }
        for name in commands:
            if name == "predict":
                # The smallest size's baseline, registered once: scoring cost does not depend on training.
                subprocess.run(histoflow("register", "--experiment", f"scale-{sizes[0]}", "--name", "scale"),
                               env={**os.environ, **env}, check=True, capture_output=True)
            seconds, rss, code = measure(plan[name], env, work / f"{name}-{n}.log")
            rows.append({"command": name, "images": n, "seconds": round(seconds, 1),
                         "images/s": round(n / seconds, 1), "peak RSS GiB": round(rss, 2), "exit": code})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    first = table[table["images"] == sizes[0]].set_index("command")
    table["RSS ratio"] = [round(r["peak RSS GiB"] / first.loc[r["command"], "peak RSS GiB"], 2)
                          for _, r in table.iterrows()]
    table["rate ratio"] = [round(r["images/s"] / first.loc[r["command"], "images/s"], 2) for _, r in table.iterrows()]
    print(table.to_markdown(index=False))
    print(f"\nfolders, caches and logs: {work}")


if __name__ == "__main__":
    main()
