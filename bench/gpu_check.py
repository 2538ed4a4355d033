"""The one command for the day a GPU is at hand: every check that needs CUDA, one verdict table, one JSON file.

    python bench/gpu_check.py --json gpu_check.json

How long: about 15-20 minutes on one H100/H200. That is an estimate, not a measurement (the script has never run on
a GPU): about 30 s per preset run, mostly process start-up, plus a minute or two for DeepSpeed's one-off CPU Adam
build, and minutes for the ROI sweep up to 256^3. With less device time, run the parts in two calls, e.g.
``--parts presets,oom`` then ``--parts roi,attention,snapshot,throughput``. Only GPU 0 is used. The ZeRO offload
presets, as shipped, need ``g++`` and ``ninja`` for DeepSpeedCPUAdam. ``--nvme DIR`` (a folder on a local NVMe drive;
needs ``CUDA_HOME`` with nvcc and libaio-dev) adds ``zero3_nvme.json``. The exit code is 1 when any check failed.
Each step below runs in a fresh process, so an out-of-memory error or a memory cap cannot leak into the next:

1. presets: every ``ds_configs/*.json`` preset at world size 1 through the real launch path (``python
   launch/pretrain.py`` for ``single``, ``torchrun --nproc_per_node 1 launch/pretrain.py`` for the others) on the
   demo data, in bf16 on compute capability >= 8 and in fp16 below (the other precision is listed as skipped);
   each run passes when it exits 0, logs a finite loss for every step, and its newest checkpoint verifies (marker,
   sizes, SHA-256), consolidates, and holds the very encoder weights the run exported;
2. roi: the largest cubic ROI that trains with the device capped at ``--cap-gib`` (32 GiB), using what
   ``--fit-memory`` would choose at each ROI, with the estimate next to the measured peak;
3. attention: fused against eager window attention, step time and peak;
4. snapshot: ``ssl3d memory profile --snapshot`` writes a memory snapshot that PyTorch's viewer can read;
5. oom: a run under a small memory cap ends with ssl3d's one-line out-of-memory help (exit 3), not a traceback;
6. throughput: ssl3d at its own training settings against the reference-equivalent step at the reference's real
   settings (fp16 autocast with a GradScaler, ``torch.backends.cudnn.benchmark = True``; ``bench/step.py``): step
   time, peak and MFU, the achieved FLOP/s (torch's FLOP counter on the real step) over the dense matmul rate
   measured in the same process.

The CPU dry run exercises every part a CPU can run, with a tiny model. Presets run in fp32 and bf16. fp16, the
memory cap, the snapshot, the OOM and the reference's fp16/cudnn settings are listed as "skipped: needs CUDA". On
the project's 2-core machine it took 8 minutes with other jobs running; tests/e2e/test_gpu_check.py runs it with
the presets in bf16 only (3 minutes):

    python bench/gpu_check.py --dry-run --json gpu_check_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GIB = 2**30
PARTS = ("presets", "roi", "attention", "snapshot", "oom", "throughput")
# Every shipped preset but the legacy fairscale one (optional dependency; --presets adds it).
PRESETS = (
    "single",
    "ddp",
    "fsdp",
    "fsdp_offload",
    "zero1",
    "zero2",
    "zero2_offload",
    "zero3",
    "zero3_offload",
    "zero3_nvme",
)
NEEDS_CUDA = "needs CUDA"
# The CPU dry run: a tiny encoder (as tests/tiny_run.py), the smallest crop the heads accept, one step each.
DRY_RUN = {
    "device": "cpu",
    "feature_size": 12,
    "depths": [1, 1, 1, 1],
    "roi": [32, 64, 64],
    "batch": 1,
    "crops": 1,
    "steps": 1,
    "bench_steps": 1,
    "rois": [64],
    "sweep_crops": 1,
    "cap_gib": 0.0,
    "workers": 0,
    "timeout": 300.0,
}


# -- helpers run in child processes ----------------------------------------------------------------------------
def probe(device: str) -> dict[str, Any]:
    """What the device is (in a child, so this process never holds a CUDA context that would count against runs)."""
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(
            name=props.name,
            capability=list(torch.cuda.get_device_capability(0)),
            total_memory=props.total_memory,
            cuda=torch.version.cuda,
        )
    else:
        out.update(name=f"CPU ({os.cpu_count()} cores)", capability=None, total_memory=None)
    return out


def run_roi(a: argparse.Namespace) -> dict[str, Any]:
    """One ROI of the sweep in this process: cap the device, plan with the estimator, train, report."""
    import torch

    from ssl3d.config import ConfigError, ModelConfig
    from ssl3d.memory.plan import fit_memory
    from ssl3d.memory.profile import profile_memory
    from ssl3d.tasks import PRETRAIN

    model = ModelConfig(feature_size=a.feature_size, depths=tuple(a.depths))
    cap = int(a.cap_gib * GIB)
    if a.device == "cuda" and cap:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
    common = {"precision": a.sweep_precision, "fused_attention": True, "device": a.device, "task": PRETRAIN}
    budget = cap or 2**50
    try:
        fit = fit_memory(budget, model, a.one_roi, a.sweep_batch, a.sweep_crops, **common)
        policy, chunk, fits = fit.policy, fit.grad_cache_chunk, True
        planned = fit.describe(cap) if cap else f"checkpointing {fit.policy_name!r}, gradient caching {chunk or 'off'}"
    except ConfigError as exc:  # the estimator says it does not fit: try the most frugal setting anyway
        policy, chunk, planned, fits = {"policy": "full"}, 1, f"estimator: does not fit ({exc})", False
    out = {"roi": a.one_roi, "plan": planned, "planned_fit": fits, "policy": policy, "grad_cache_chunk": chunk}
    try:
        r = profile_memory(
            model,
            a.one_roi,
            a.sweep_batch,
            a.sweep_crops,
            a.sweep_precision,
            policy,
            True,
            steps=a.steps,
            device=a.device,
            module_peaks=False,
            breakdown=False,
            grad_cache_chunk=chunk,
            task=PRETRAIN,
        )
        out.update(trained=True, measured=r["measured"], estimate=r["estimate"]["bytes"], step_time_s=r["step_time_s"])
        out["estimate_vs_measured"] = r.get("estimate_vs_measured")
    except torch.OutOfMemoryError as exc:
        out.update(trained=False, oom=True, error=str(exc).splitlines()[0])
    return out


def verify_run(logdir: Path) -> dict[str, Any]:
    """What a launched run left, read back: its logged losses, step time and memory, and its newest checkpoint,
    verified (marker, sizes, SHA-256), consolidated from the backend's layout and compared with the exported
    encoder (the same weights by two routes: a backend that saved a stale or partial shard shows here)."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ssl3d.checkpoint import checkpoint_problem, read_weights

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    last = {tag: sorted(v)[-1][1] for tag, v in scalars.items() if v}
    out: dict[str, Any] = {
        "losses": [v for _, v in sorted(scalars.get("train/loss_total", []))],
        "step_time_s": last.get("perf/step_time_s"),
        "memory": {tag.split("/", 1)[1]: v for tag, v in last.items() if tag.startswith("memory/")},
    }
    steps = sorted((logdir / "checkpoints").glob("step_*"))
    if not steps:
        out["checkpoint"] = {"ok": False, "problem": "no step folder was written"}
        return out
    folder = steps[-1]
    ck: dict[str, Any] = {"folder": folder.name, "problem": checkpoint_problem(folder)}
    if ck["problem"] is None:
        weights = read_weights(folder)
        exported = read_weights(logdir / "model_swinvit.pt")
        ck["tensors"] = len(weights)
        ck["missing"] = sorted(k for k in exported if k not in weights)
        ck["non_finite"] = sorted(
            k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
        )
        diffs = [(exported[k].float() - weights[k].float()).abs().max().item() for k in exported if k in weights]
        ck["max_abs_diff_vs_export"] = max(diffs, default=math.inf)
        if ck["missing"]:
            ck["problem"] = f"{len(ck['missing'])} exported tensors missing, e.g. {ck['missing'][0]}"
        elif ck["non_finite"]:
            ck["problem"] = f"non-finite weights in {ck['non_finite'][0]}"
        elif ck["max_abs_diff_vs_export"] > 1e-6:
            ck["problem"] = f"weights differ from the exported encoder by {ck['max_abs_diff_vs_export']:.2e}"
    ck["ok"] = ck["problem"] is None
    out["checkpoint"] = ck
    return out


def verify_all(logdirs: list[str]) -> dict[str, dict[str, Any]]:
    """``verify_run`` for each folder; one that cannot be read back gets its error, the others still their rows."""
    out: dict[str, dict[str, Any]] = {}
    for d in logdirs:
        try:
            out[d] = verify_run(Path(d))
        except Exception as exc:  # noqa: BLE001 - reported in that run's row
            out[d] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
    return out


def capped_launch(cap_gib: float, launch_args: list[str]) -> None:
    """``launch/pretrain.py`` in this process with the device capped: the real entry point, a small card."""
    import runpy

    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), 0)
    script = ROOT / "launch" / "pretrain.py"
    sys.argv = [str(script), *launch_args]
    runpy.run_path(str(script), run_name="__main__")


# -- the parent: runs children, judges, tabulates --------------------------------------------------------------
class Check:
    """Runs every part in fresh processes and collects one row per verdict."""

    def __init__(self, a: argparse.Namespace, work: Path, device: dict[str, Any]):
        self.a, self.work, self.device = a, work, device
        self.cuda = a.device == "cuda"
        self.rows: list[dict[str, Any]] = []
        cc = device.get("capability")
        # bf16 on compute capability >= 8; below, bf16 is emulated (audit F3) and fp16 is the reference's AMP.
        self.precision = "fp32" if not self.cuda else ("bf16" if cc and cc[0] >= 8 else "fp16")

    def add(self, part: str, setting: str, verdict: str, details: str, **data: Any) -> dict[str, Any]:
        row = {"part": part, "setting": setting, "verdict": verdict, "details": details, **data}
        self.rows.append(row)
        print(f"  {part:10s} {setting:28s} {verdict:8s} {details}", flush=True)
        return row

    def child(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        """A fresh process from the repository root; a timeout becomes exit code 124 with a note on stderr."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            return subprocess.CompletedProcess(args, 124, out, err + f"\ntimed out after {timeout:.0f} s")

    def json_child(self, args: list[str], timeout: float) -> dict[str, Any]:
        """A child that prints one JSON object as its last stdout line; its error line when it printed none."""
        proc = self.child([sys.executable, *args], timeout)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            try:
                return json.loads(lines[-1])
            except ValueError:
                pass
        return {"error": error_line(proc)}

    # -- 1. presets ---------------------------------------------------------------------------------------------
    def run_overrides(self, precision: str, logdir: Path) -> dict[str, Any]:
        a = self.a
        return {
            "model.feature_size": a.feature_size,
            "model.depths": a.depths,
            "data.roi": a.roi,
            "data.num_samples": a.crops,
            "data.num_workers": a.workers,
            "data.demo_dir": str(self.work / "demo_data"),  # written once, shared by every run
            "train.batch_size": a.batch,
            "train.num_steps": a.steps,
            "train.eval_num": a.steps,  # one validation and one checkpoint, after the last step
            "train.max_val_batches": 1,
            "train.progress": False,
            "train.device": a.device,
            "train.precision": precision,
            "train.logdir": str(logdir),
        }

    def launch_args(self, preset: Path, overrides: dict[str, Any]) -> list[str]:
        return ["--ds_config", str(preset), *(f"--set={k}={json.dumps(v)}" for k, v in overrides.items())]

    def preset_file(self, name: str) -> tuple[Path | None, str]:
        """The preset to launch (a changed copy where the check must change it) and a note on what changed;
        None with the reason when the preset is not run."""
        a = self.a
        raw = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
        zero = raw.get("zero_optimization") or {}
        note = ""
        if name == "zero3_nvme":
            if not self.cuda:
                return None, f"{NEEDS_CUDA} (DeepSpeed's async_io op: a CUDA toolkit and libaio)"
            if not a.nvme:
                return None, "not asked (--nvme DIR on a local NVMe drive; needs CUDA_HOME with nvcc, libaio)"
            for section in ("offload_optimizer", "offload_param"):
                zero[section]["nvme_path"] = a.nvme
            note = f"nvme_path {a.nvme}"
        offloads = any((zero.get(s) or {}).get("device") == "cpu" for s in ("offload_optimizer", "offload_param"))
        if offloads and (a.cpu_adam == "torch" or (a.cpu_adam == "auto" and not self.cuda)):
            raw["zero_force_ds_cpu_optimizer"] = False
            note = "torch AdamW on the host, not DeepSpeedCPUAdam (its C++ build takes minutes; --cpu-adam build)"
        if not note:
            return ROOT / "ds_configs" / f"{name}.json", ""
        path = self.work / "presets" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(raw, indent=2))
        return path, note

    def presets(self) -> None:
        """Launch every (preset, precision), then read all finished runs back in one child (CPU only)."""
        a = self.a
        precisions = a.precisions or (["fp32", "bf16", "fp16"] if not self.cuda else ["bf16", "fp16"])
        first = len(self.rows)
        launched = [run for name in a.presets for precision in precisions if (run := self.launch(name, precision))]
        logdirs = [str(run["logdir"]) for run in launched]
        got = self.json_child([__file__, "--verify", *logdirs], a.timeout) if logdirs else {}
        for run in launched:
            self.judge(run, got.get(str(run["logdir"])) or {"error": got.get("error", "not read back")})
        order = {
            f"{name} {precision}": i for i, (name, precision) in enumerate(itertools.product(a.presets, precisions))
        }
        self.rows[first:] = sorted(self.rows[first:], key=lambda row: order[row["setting"]])

    def launch(self, name: str, precision: str) -> dict[str, Any] | None:
        """One preset run through the launch path; the run to read back, or None when a row already says why not."""
        setting = f"{name} {precision}"
        if precision == "fp16" and not self.cuda:
            self.add("presets", setting, "skipped", f"{NEEDS_CUDA} (fp16 loss scaling; ssl3d refuses fp16 on a CPU)")
            return None
        if self.cuda and not self.a.precisions and precision != self.precision:
            cc = ".".join(map(str, self.device["capability"]))
            why = "bf16 runs on cc >= 8" if precision == "fp16" else "bf16 is emulated below cc 8 (audit F3)"
            self.add("presets", setting, "skipped", f"compute capability {cc}: {why} (--precisions to force)")
            return None
        preset, note = self.preset_file(name)
        if preset is None:
            self.add("presets", setting, "skipped", note)
            return None
        logdir = self.work / "runs" / f"{name}_{precision}"
        script = str(ROOT / "launch" / "pretrain.py")
        if name == "single":
            cmd = [sys.executable, script]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", script]
        cmd += self.launch_args(preset, self.run_overrides(precision, logdir))
        t0 = time.perf_counter()
        proc = self.child(cmd, self.a.timeout)
        seconds = round(time.perf_counter() - t0, 1)
        logdir.mkdir(parents=True, exist_ok=True)
        (logdir / "output.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        data = {"preset": name, "precision": precision, "rc": proc.returncode, "seconds": seconds, "note": note}
        data["command"] = " ".join(cmd)
        print(f"  ran {setting}: exit {proc.returncode} in {seconds:.0f} s", flush=True)
        if proc.returncode == 2 and precision == "fp16" and "fp16" in error_line(proc):
            # ssl3d's documented refusal (fp16 under FSDP / fairscale), said before anything started.
            refusal = error_line(proc).removeprefix("ssl3d: error: ")
            self.add("presets", setting, "skipped", f"ssl3d refuses it: {refusal}", **data)
            return None
        if proc.returncode != 0:
            self.add("presets", setting, "fail", f"exit {proc.returncode}: {error_line(proc)}", **data)
            return None
        return {"setting": setting, "logdir": logdir, **data}

    def judge(self, run: dict[str, Any], got: dict[str, Any]) -> None:
        """A finished run passes with a finite loss for every step and a checkpoint that verifies."""
        setting, note = run.pop("setting"), run["note"]
        run["logdir"] = str(run["logdir"])
        losses, ck = got.get("losses") or [], got.get("checkpoint") or {}
        problems = []
        if "error" in got:
            problems.append(f"reading the run back failed: {got['error']}")
        if len(losses) != self.a.steps:
            problems.append(f"{len(losses)} losses logged for {self.a.steps} steps")
        if not all(math.isfinite(v) for v in losses):
            problems.append(f"non-finite loss: {losses}")
        if not ck.get("ok"):
            problems.append(f"checkpoint: {ck.get('problem')}")
        loss_text = " -> ".join(f"{v:.4f}" for v in losses)
        details = f"losses {loss_text}; checkpoint {ck.get('folder')} verified, equal to the export"
        if got.get("step_time_s") is not None:
            details += f"; last step {got['step_time_s']:.2f} s"
        peak = peak_text(got.get("memory") or {})
        details += f"; {peak}" if peak else ""
        details += f"; {note}" if note else ""
        verdict = "fail" if problems else "pass"
        self.add("presets", setting, verdict, "; ".join(problems) or details, **run, **got)

    # -- 2. largest ROI under the cap ---------------------------------------------------------------------------
    def roi(self) -> None:
        a = self.a
        flags = [f"--device={a.device}", f"--feature-size={a.feature_size}", "--depths", *map(str, a.depths)]
        flags += [f"--cap-gib={a.cap_gib}", f"--sweep-batch={a.sweep_batch}", f"--sweep-crops={a.sweep_crops}"]
        flags += [f"--sweep-precision={self.precision}", f"--steps={a.steps}"]
        cap = f"{a.cap_gib:g} GiB cap" if self.cuda and a.cap_gib else "no cap"
        largest = None
        for roi in a.rois:
            r = self.json_child([__file__, *flags, f"--one-roi={roi}"], a.timeout)
            setting = f"ROI {roi}, {cap}"
            plan = r.get("plan", "-")
            if r.get("trained"):
                largest = roi
                m = r["measured"]
                if "cuda_max_allocated" in m:
                    peak = f"{m['cuda_max_allocated'] / GIB:.2f} / {m['cuda_max_reserved'] / GIB:.2f} GiB allocated / "
                    peak += "reserved"
                    est = r["estimate"]["allocated_peak"]
                else:
                    peak, est = f"RSS growth {m['rss_peak_over_baseline'] / GIB:.2f} GiB", r["estimate"]["total"]
                ratio = r.get("estimate_vs_measured")
                details = f"{plan}; measured {peak}; estimated {est / GIB:.2f} GiB"
                details += f" ({ratio:.2f}x the measured)" if ratio else ""
                details += f"; step {min(r['step_time_s']):.2f} s"
                verdict = "pass" if r["planned_fit"] else "warn"
                if not r["planned_fit"]:
                    details = f"trained although the estimator said it does not fit (too pessimistic); {details}"
            elif r.get("oom"):
                verdict = "pass" if not r["planned_fit"] else "fail"
                details = (
                    f"out of memory, as the estimator said; {plan}"
                    if verdict == "pass"
                    else (f"the planner promised it fits, then out of memory ({r.get('error')}); {plan}")
                )
            else:
                verdict, details = "fail", f"error: {r.get('error')}"
            self.add("roi", setting, verdict, details, **r)
        if not self.cuda:
            self.add("roi", "memory cap", "skipped", f"{NEEDS_CUDA} (set_per_process_memory_fraction)")
        self.add(
            "roi",
            f"largest trained, {cap}",
            "pass" if largest else "fail",
            f"ROI {largest}" if largest else "no ROI trained",
            largest_roi=largest,
        )

    # -- 3, 6. step benchmarks (bench/step.py) ------------------------------------------------------------------
    def bench(self, mode: str, precision: str, *extra: str) -> dict[str, Any]:
        a = self.a
        args = ["bench/step.py", f"--mode={mode}", f"--device={a.device}", f"--feature-size={a.feature_size}"]
        args += ["--depths", *map(str, a.depths), "--roi", *map(str, a.roi), f"--batch={a.batch}"]
        args += [f"--crops={a.crops}", f"--steps={a.bench_steps}", f"--precision={precision}", "--flops", *extra]
        return self.json_child(args, a.timeout)

    def bench_setting(self) -> str:
        return f"ROI {'x'.join(map(str, self.a.roi))}, {self.a.batch} x {self.a.crops} crops"

    def ours(self) -> dict[str, Any]:
        if not hasattr(self, "_ours"):
            self._ours = self.bench("ssl3d", self.precision)
        return self._ours

    def attention(self) -> None:
        fused, eager = self.ours(), self.bench("ssl3d", self.precision, "--eager-attention")
        setting = f"fused vs eager, {self.precision}"
        if "error" in fused or "error" in eager:
            self.add(
                "attention", setting, "fail", f"{fused.get('error') or eager.get('error')}", fused=fused, eager=eager
            )
            return
        ratio = fused["step_time_s"] / eager["step_time_s"]
        details = (
            f"{self.bench_setting()}: fused {bench_text(fused)}; eager {bench_text(eager)}; "
            f"fused/eager step time {ratio:.2f}x"
        )
        verdict = "pass"
        if self.cuda and ratio > 1.1:
            verdict, details = "warn", f"fused attention slower than eager (audit S2); {details}"
        self.add("attention", setting, verdict, details, fused=fused, eager=eager)

    def throughput(self) -> None:
        """ssl3d at its own training settings against the reference at the reference's (audit F9)."""
        ours = self.ours()
        if self.cuda:
            # main.py's defaults: AMP (fp16 autocast + GradScaler) and torch.backends.cudnn.benchmark = True.
            ref = self.bench("reference", "fp16", "--cudnn-benchmark=on")
            ref_setting = "reference fp16 AMP + cudnn"
        else:
            ref = self.bench("reference", "fp32")
            ref_setting = "reference fp32"
            details = f"{NEEDS_CUDA} (the reference's real settings: fp16 AMP + GradScaler, cudnn.benchmark)"
            self.add("throughput", "reference fp16 AMP + cudnn", "skipped", details)
        for setting, r in ((ref_setting, ref), (f"ssl3d {self.precision}", ours)):
            verdict = "fail" if "error" in r else "pass"
            self.add("throughput", setting, verdict, r.get("error") or f"{self.bench_setting()}: {bench_text(r)}", **r)
        if "error" not in ref and "error" not in ours:
            speedup = ref["step_time_s"] / ours["step_time_s"]
            details = f"ssl3d {speedup:.2f}x the reference's throughput ({ref_setting})"
            self.add("throughput", "ssl3d / reference", "pass" if speedup >= 1 else "warn", details, speedup=speedup)

    # -- 4. snapshot --------------------------------------------------------------------------------------------
    def snapshot(self) -> None:
        setting = f"memory profile, {self.precision}"
        if not self.cuda:
            self.add("snapshot", setting, "skipped", f"{NEEDS_CUDA} (it records the CUDA caching allocator)")
            return
        a = self.a
        path = self.work / "memory_snapshot.pickle"
        overrides = self.run_overrides(self.precision, self.work / "runs" / "snapshot")
        cmd = [sys.executable, "-m", "ssl3d.cli", "memory", "profile", "--device=cuda", "--steps=2", "--json"]
        cmd += [f"--snapshot={path}", *self.launch_args(ROOT / "ds_configs" / "single.json", overrides)]
        proc = self.child(cmd, a.timeout)
        if proc.returncode != 0:
            self.add("snapshot", setting, "fail", f"exit {proc.returncode}: {error_line(proc)}")
            return
        import pickle

        try:
            snap = pickle.loads(path.read_bytes())  # our own file, just written
            segments = len(snap["segments"])
        except (OSError, KeyError, TypeError, pickle.UnpicklingError) as exc:
            self.add("snapshot", setting, "fail", f"{path.name} unreadable: {exc}")
            return
        size = path.stat().st_size / 2**20
        details = (
            f"{self.bench_setting()}: {path.name}, {size:.1f} MiB, {segments} segments (open in pytorch.org/memory_viz)"
        )
        self.add("snapshot", setting, "pass", details, snapshot=str(path))

    # -- 5. out of memory ---------------------------------------------------------------------------------------
    def oom(self) -> None:
        a = self.a
        for name in a.oom_presets:
            setting = f"{name} under {a.oom_cap_gib:g} GiB"
            if not self.cuda:
                self.add("oom", setting, "skipped", f"{NEEDS_CUDA} (a device memory cap)")
                continue
            preset, _ = self.preset_file(name)
            logdir = self.work / "runs" / f"oom_{name}"
            args = self.launch_args(preset, self.run_overrides(self.precision, logdir))
            proc = self.child([sys.executable, __file__, "--capped", str(a.oom_cap_gib), "--", *args], a.timeout)
            help_lines = [
                ln for ln in proc.stderr.splitlines() if ln.startswith("ssl3d: stopped:") and "out of memory" in ln
            ]
            if proc.returncode == 3 and len(help_lines) == 1 and "Traceback" not in proc.stderr:
                self.add("oom", setting, "pass", f"exit 3, one line: {help_lines[0][:300]}")
            else:
                why = "a traceback" if "Traceback" in proc.stderr else "no ssl3d out-of-memory line"
                self.add("oom", setting, "fail", f"exit {proc.returncode}, {why}: {error_line(proc)}")


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The line that says what went wrong: ssl3d's own one-line message, else the last line of stderr."""
    lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith(("ssl3d: error:", "ssl3d: stopped:"))]
    return (ours or lines or ["no output"])[-1][:400]


def peak_text(memory: dict[str, float]) -> str:
    """The run's logged peak memory (the strategy's memory report), the largest device figure first."""
    if "cuda_allocated_peak_gib" in memory:
        return (
            f"peak {memory['cuda_allocated_peak_gib']:.2f} / {memory.get('cuda_reserved_peak_gib', math.nan):.2f} GiB "
            "allocated / reserved"
        )
    if "host_rss_peak_gib" in memory:
        return f"peak RSS {memory['host_rss_peak_gib']:.2f} GiB"
    return ""


def bench_text(r: dict[str, Any]) -> str:
    peak = (
        f"peak {r['cuda_peak_allocated_gib']:.2f} GiB allocated"
        if "cuda_peak_allocated_gib" in r
        else f"peak RSS {r['peak_rss_gib']:.2f} GiB"
    )
    flops = ""
    if "mfu" in r:
        flops = (
            f", {r['flops_per_step'] / 1e9:.1f} GFLOP/step, {rate(r['achieved_flops_per_s'])}, MFU {r['mfu']:.1%} of "
            f"{rate(r['gemm_flops_per_s'])} ({r['gemm_dtype']} matmul, measured)"
        )
    switches = ""
    if r.get("tf32") is not None:  # CUDA: what the step ran with
        switches = f", cudnn.benchmark {'on' if r['cudnn_benchmark'] else 'off'}, TF32 {'on' if r['tf32'] else 'off'}"
    scaler = ", GradScaler" if r.get("grad_scaler") else ""
    return f"{r['step_time_s']:.3f} s/step, {peak}{flops}{switches}{scaler}"


def rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.1f} GFLOP/s"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| part | setting | verdict | details |", "|---|---|---|---|"]
    for r in rows:
        details = str(r["details"]).replace("|", "/")
        lines.append(f"| {r['part']} | {r['setting']} | **{r['verdict']}** | {details} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU dry run with a tiny model (flags given still apply)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma list of ds_configs names (fairscale: legacy)")
    p.add_argument(
        "--precisions", help="comma list; default: the device's (bf16 on cc >= 8, fp16 below; CPU fp32,bf16)"
    )
    p.add_argument("--nvme", help="a folder on a local NVMe drive: also run zero3_nvme.json (CUDA, libaio)")
    p.add_argument(
        "--cpu-adam",
        default="auto",
        choices=["auto", "build", "torch"],
        help="ZeRO offload presets: DeepSpeedCPUAdam as shipped (build) or torch AdamW (auto: build on CUDA)",
    )
    p.add_argument("--feature-size", type=int, default=48)
    p.add_argument("--depths", type=int, nargs=4, default=[2, 2, 2, 2])
    p.add_argument("--roi", type=int, nargs=3, default=[96, 96, 96], help="presets, benchmarks, snapshot, OOM")
    p.add_argument("--batch", type=int, default=2, help="volumes per step (presets, benchmarks)")
    p.add_argument("--crops", type=int, default=2, help="crops per volume (presets, benchmarks)")
    p.add_argument("--steps", type=int, default=3, help="training steps of each preset run and ROI")
    p.add_argument("--bench-steps", type=int, default=5, help="timed steps of each benchmark (after a warm-up step)")
    p.add_argument("--workers", type=int, default=2, help="loader workers of the preset runs")
    p.add_argument("--cap-gib", type=float, default=32.0, help="device memory cap of the ROI sweep (0: none)")
    p.add_argument("--rois", type=int, nargs="+", default=[128, 160, 192, 224, 256])
    p.add_argument("--sweep-batch", type=int, default=1)
    p.add_argument("--sweep-crops", type=int, default=2)
    p.add_argument("--oom-presets", default="single,zero2", help="presets run under the small cap")
    p.add_argument("--oom-cap-gib", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=600, help="seconds per child process")
    p.add_argument("--work", help="folder for runs, logs and the snapshot (default: a new temporary folder)")
    p.add_argument("--json", help="write every row and the device here")
    # internal: one piece in this process
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--one-roi", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sweep-precision", default="bf16", help=argparse.SUPPRESS)
    p.add_argument("--verify", nargs="+", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--capped"]:  # internal: --capped GIB -- <launch/pretrain.py arguments>
        capped_launch(float(argv[1]), argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0
    p = parser()
    if "--dry-run" in argv:
        p.set_defaults(**DRY_RUN)
    a = p.parse_args(argv)
    if a.probe:
        print(json.dumps(probe(a.device)))
        return 0
    if a.one_roi:
        print(json.dumps(run_roi(a), default=str))
        return 0
    if a.verify:
        print(json.dumps(verify_all(a.verify), default=str))
        return 0
    parts = a.parts.split(",")
    a.presets = a.presets.split(",")
    a.precisions = a.precisions.split(",") if a.precisions else None
    a.oom_presets = a.oom_presets.split(",")
    unknown = [x for x in parts if x not in PARTS] + [
        x for x in a.presets if not (ROOT / "ds_configs" / f"{x}.json").is_file()
    ]
    if unknown:
        p.error(f"unknown parts or presets: {unknown}")
    t0 = time.perf_counter()
    work = Path(a.work or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    check = Check(a, work, {})
    device = check.json_child([__file__, "--probe", f"--device={a.device}"], 120)
    if a.device == "cuda" and not device.get("capability"):
        print(f"gpu_check: no CUDA device here ({device.get('error', 'torch sees none')}); the CPU dry run: --dry-run")
        return 2
    check = Check(a, work, device)
    print(f"gpu_check on {device.get('name')} (torch {device.get('torch')}), runs and logs in {work}", flush=True)
    for part in PARTS:
        if part in parts:
            getattr(check, part)()
    counts = {v: sum(r["verdict"] == v for r in check.rows) for v in ("pass", "warn", "fail", "skipped")}
    seconds = round(time.perf_counter() - t0, 1)
    print(f"\n{table(check.rows)}\n")
    print(", ".join(f"{n} {v}" for v, n in counts.items()) + f"; {seconds} s in all")
    if a.json:
        result = {"device": device, "args": vars(a), "rows": check.rows, "counts": counts, "seconds": seconds}
        Path(a.json).write_text(json.dumps(result, indent=1, default=str))
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
