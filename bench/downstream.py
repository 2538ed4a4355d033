"""Does pre-training help? Pre-train with the CPU demo preset, then probe and fine-tune on the demo's label maps with
few labelled volumes, from the pre-trained encoder and from random initialisation, over several seeds.

Every number comes from the real commands (``ssl3d pretrain``, ``ssl3d probe``, ``ssl3d finetune``) run as
subprocesses; the tables are their ``comparison.json``. The downstream runs are sized for a 2-core CPU (tiny model,
one 32x64x64 crop a step, 20 probe / 12 fine-tuning steps, one validation at the end), so the figures say what
this budget shows, nothing more.

    python bench/downstream.py --work /tmp/ssl3d_downstream          # ~20-25 min on 2 idle cores
    python bench/downstream.py --tasks probe & python bench/downstream.py --tasks finetune   # once pre-trained

``--init FILE`` takes an encoder pre-trained elsewhere instead (e.g. ``bench/collapse.py --direct`` writes
``encoders/<setting>/seed<S>/model_swinvit.pt``); ``--datalist`` a labelled dataset JSON instead of the demo's label
maps (e.g. ``ssl3d data samples``' TotalSegmentator pair); ``--set`` overrides every downstream run (the random-init
runs need the encoder's architecture spelled out: ``--set model.feature_size=12`` ...).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DOWNSTREAM = {
    "data.roi": [32, 64, 64],
    "data.num_samples": 1,
    "train.progress": False,
    "optim.warmup_steps": 2,
    "finetune.sw_overlap": 0.0,  # validation windows tile the volume once
}
TASKS = {
    "probe": {"train.num_steps": 20, "train.eval_num": 20, "optim.lr": 1e-2},
    "finetune": {"train.num_steps": 12, "train.eval_num": 12, "optim.lr": 2e-3},
}


def run(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - t, proc.stdout


def sets(values: dict) -> list[str]:
    return [f"--set={k}={json.dumps(v)}" for k, v in values.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/ssl3d_downstream"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--labelled", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--pretrain-steps", type=int, default=None, help="default: the CPU demo preset's")
    p.add_argument("--init", type=Path, help="a pre-trained model_swinvit.pt (default: pre-train with the demo preset)")
    p.add_argument("--datalist", type=Path, help="labelled dataset JSON (default: the demo's label maps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every downstream run (repeatable)")  # fmt: skip
    a = p.parse_args()
    ssl3d = [sys.executable, "-m", "ssl3d.cli"]
    out: dict = {"seeds": a.seeds, "labelled": a.labelled, "downstream": DOWNSTREAM, "tasks": {}}

    pre = a.init or a.work / "pretrain"
    extra = sets({"train.num_steps": a.pretrain_steps}) if a.pretrain_steps else []
    if a.init:
        out["init"] = str(a.init)
    elif not (pre / "model_swinvit.pt").is_file():
        seconds, stdout = run([*ssl3d, "pretrain", *sets({"train.logdir": str(pre), "train.progress": False}), *extra])
        out["pretrain"] = {"seconds": round(seconds, 1), "output": stdout.strip().splitlines()[-1]}
        print(stdout.strip().splitlines()[-1], flush=True)
    if not a.init:
        out["pretrain_summary"] = json.loads((pre / "summary.json").read_text())
    out["overrides"] = a.overrides

    for task in a.tasks:
        logdir = a.work / task
        cmd = [*ssl3d, task, "--init", str(pre), "--init", "none", "--seeds", a.seeds]
        cmd += [x for n in a.labelled for x in ("--labelled", str(n))]
        cmd += sets({**DOWNSTREAM, **TASKS[task], "train.logdir": str(logdir)})
        cmd += [f"--set={o}" for o in a.overrides]
        cmd += ["--datalist", str(a.datalist)] if a.datalist else []
        seconds, stdout = run(cmd)
        doc = json.loads((logdir / "comparison.json").read_text())
        out["tasks"][task] = {"seconds": round(seconds, 1), "settings": TASKS[task], **doc}
        print((logdir / "comparison.md").read_text(), flush=True)
    path = a.work / f"downstream_{'_'.join(a.tasks)}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
