"""Checkpoints: atomic step folders that resume exactly, a ``best`` folder, and the ``model_swinvit.pt`` format.

A step folder is written under a temporary name, flushed to disk, marked complete and only then renamed, so a
run killed at any moment never leaves a half-written folder that ``--resume auto`` would pick up.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import re
import shutil
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ssl3d.config import Config, ConfigError
from ssl3d.errors import CheckpointWriteError
from ssl3d.fileio import atomic_torch_save, fsync_tree
from ssl3d.strategies.base import CHECKPOINT_LAYOUTS, Strategy, clean_name

COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE).is_file()


def _digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``directory`` (fsynced on the way: both read every byte once)."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != COMPLETE:
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
                files[path.relative_to(directory).as_posix()] = {
                    "size": os.fstat(fh.fileno()).st_size,
                    "sha256": hashlib.file_digest(fh, "sha256").hexdigest(),
                }
    return files


def checkpoint_problem(directory: Path, checksums: bool = True) -> str | None:
    """Why the checkpoint folder cannot be trusted, or None: its COMPLETE marker lists every file with its size and
    SHA-256, and each must match (sizes only with ``checksums=False``). Markers written before sizes and checksums
    were recorded are trusted as they are."""
    marker = Path(directory) / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} marker (the folder was never finished, or the marker was removed)"
    try:
        files = json.loads(marker.read_text()).get("files")
    except (ValueError, AttributeError):
        return f"its {COMPLETE} marker is not the JSON ssl3d writes"
    for rel, want in (files or {}).items():
        path = Path(directory) / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, the marker lists {want['size']} (truncated or rewritten)"
        if checksums and _digest(path) != want["sha256"]:
            return f"{rel} differs from its SHA-256 in the marker (same size: changed after it was written)"
    return None


def _tree_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# At the failure the partial folder holds what was written: a disk that ran out has (almost) nothing left beside it.
# Not exactly nothing: file systems keep back a little (ext4's delayed allocation, XFS's reserve) and report it free.
FULL_SLACK = 2**20


def _is_disk_full(exc: BaseException | None, free_at_failure: int, free: int, need: int, written: int) -> bool:
    """Whether running out of space explains the failed write. torch's zip writer hides the errno ("basic_ios::clear:
    iostream error", "unexpected pos"), so the free space tells: nearly none left at the failure, or less left once
    the partial folder is gone than the previous checkpoint took. An OSError with another errno names its own cause.
    """
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left" in str(exc):
            return True
        if isinstance(exc, OSError) and exc.errno is not None:
            return False
        exc = exc.__cause__ or exc.__context__
    return free_at_failure <= max(FULL_SLACK, written // 100) or free < need


class CheckpointManager:
    """Step folders ``step_XXXXXXXX`` (the newest ``keep`` kept) and ``best`` under one root."""

    def __init__(
        self,
        root: Path,
        strategy: Strategy,
        keep: int = 2,
        on_shard_saved: Callable[[int, int], None] | None = None,
    ):
        self.root = Path(root)
        self.strategy = strategy
        self.keep = keep
        self.on_shard_saved = on_shard_saved  # (step, rank) after this rank wrote its part; tests kill there

    def _write(self, final: Path, extra: dict[str, Any]) -> None:
        """Every rank writes its part into a temporary folder; rank 0 lists each file's size and SHA-256 in the
        COMPLETE marker, fsyncs and renames. A failure on any rank (a full disk) is agreed on by all of them, the
        temporary folder is removed and the run stops (``CheckpointWriteError``); earlier checkpoints stay intact."""
        s = self.strategy
        tmp = final.with_name(f".tmp_{final.name}")
        failure: BaseException | None = None
        if s.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        s.barrier()
        try:
            s.save(tmp, extra)
        except (OSError, RuntimeError) as exc:  # torch reports a short write as a RuntimeError
            failure = exc
        if self.on_shard_saved is not None and STEP_DIR.match(final.name):
            self.on_shard_saved(int(final.name.removeprefix("step_")), s.rank)
        if s.any_rank(failure is not None):
            self._fail(final, tmp, failure)
        if s.is_main:
            try:
                marker = {"step": extra.get("step"), "strategy": s.name, "files": _manifest(tmp)}
                (tmp / COMPLETE).write_text(json.dumps(marker, indent=1))
                fsync_tree(tmp)
                old = final.with_name(f".old_{final.name}")
                if final.exists():
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            except OSError as exc:
                failure = exc
        if s.any_rank(failure is not None):
            self._fail(final, tmp, failure)

    def _fail(self, final: Path, tmp: Path, failure: BaseException | None) -> None:
        """Remove the partial folder and stop with the path, the space needed and free, and where to resume."""
        s = self.strategy
        written = _tree_bytes(tmp)
        chain = failure
        while chain is not None:  # the failed writer's frames hold its open file: removed, it would still take space
            traceback.clear_frames(chain.__traceback__)
            chain = chain.__cause__ or chain.__context__
        gc.collect()
        s.barrier()
        probe = self.root if self.root.exists() else self.root.parent
        free_at_failure = shutil.disk_usage(probe).free  # with the partial folder: what the writer was left
        s.barrier()
        if s.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        s.barrier()  # the free space below is what is left without the partial folder
        previous = self.latest()
        need = _tree_bytes(previous) if previous is not None else 0
        free = shutil.disk_usage(probe).free
        full = _is_disk_full(failure, free_at_failure, free, need, written)
        if full:
            what = "no space left on device"
        else:
            cause = failure
            while cause is not None and (cause.__cause__ or cause.__context__) is not None:
                cause = cause.__cause__ or cause.__context__
            what = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}" if cause else "another rank failed"
        if previous is not None and written <= need:
            size = f"it needs about {_gib(need)} (the size of {previous.name})"
        elif full:  # it did not fit into what is free now, the partial folder's share included
            filled = f" ({_gib(written)} were written when the disk filled)" if written else ""
            size = f"it needs more than that{filled}"
        else:
            size = f"{_gib(written)} were written before the failure"
        where = f"resume from {previous} with --resume auto" if previous else "no earlier checkpoint: start again"
        raise CheckpointWriteError(
            f"could not write checkpoint {final}: {what}; {_gib(free)} free on {probe} after removing the partial "
            f"{tmp.name}, and {size}; free space (or point train.logdir elsewhere) and {where}"
        )

    def save(self, step: int, extra: dict[str, Any]) -> Path:
        final = self.root / f"step_{step:08d}"
        self._write(final, extra)
        if self.strategy.is_main:
            for old in self.step_dirs()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            # `last` points at the newest complete step folder; replaced atomically.
            tmp_link = self.root / ".last.tmp"
            tmp_link.unlink(missing_ok=True)
            tmp_link.symlink_to(final.name)
            os.replace(tmp_link, self.root / "last")
        return final

    def save_best(self, extra: dict[str, Any]) -> Path:
        final = self.root / "best"
        self._write(final, extra)
        return final

    def step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and is_complete(p)]
        return sorted(dirs, key=lambda p: p.name)

    def latest(self) -> Path | None:
        dirs = self.step_dirs()
        return dirs[-1] if dirs else None

    def resume_point(self, resume: str | None) -> Path | None:
        """``resolve_resume`` with every checksum verified, once (rank 0), and the answer shared by all ranks."""
        s = self.strategy
        answer: tuple[str | None, list[str]] = (None, [])
        if s.is_main:
            try:
                found = resolve_resume(resume, self.root, checksums=True)
                answer = (str(found) if found is not None else None, [])
            except ConfigError as exc:
                answer = (None, exc.problems)
        path, problems = s.broadcast_object(answer)
        if problems:
            raise ConfigError(problems)
        return Path(path) if path is not None else None


def _looks_like_checkpoint(path: Path) -> bool:
    return STEP_DIR.match(path.name) is not None or any((path / n).exists() for n in CHECKPOINT_LAYOUTS)


def resolve_resume(resume: str | None, root: Path, checksums: bool = False) -> Path | None:
    """``auto``: the newest step folder under ``root`` that verifies (None on a fresh run); each one that does not
    is named in a warning and skipped. A checkpoint folder named explicitly must verify (ConfigError otherwise); a
    run folder means its newest checkpoint that verifies. ``checksums=False`` checks markers and sizes only."""
    if not resume:
        return None
    path = Path(resume)
    if resume != "auto" and path.is_dir() and _looks_like_checkpoint(path):
        problem = checkpoint_problem(path, checksums)
        if problem:
            raise ConfigError(
                f"train.resume: checkpoint {path} is damaged: {problem}; name an intact one, or use "
                '"auto" to take the newest that verifies'
            )
        return path
    if resume != "auto" and not path.is_dir():
        return path  # a file; read and checked by whoever loads it
    if resume != "auto":  # a run root rather than a step folder
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    candidates = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), reverse=True) if root.is_dir() else []
    damaged = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate, checksums)
        if problem is None:
            return candidate
        damaged.append(candidate)
        if checksums:  # the verifying pass (rank 0, in the trainer) speaks; the quick pre-check stays quiet
            warnings.warn(f"checkpoint {candidate} is damaged ({problem}); trying the one before it", stacklevel=2)
    if damaged:
        raise ConfigError(
            f"train.resume: no checkpoint under {root} verifies ({len(damaged)} damaged, newest {damaged[0].name}); "
            "restore one, or start over in a new train.logdir"
        )
    if resume != "auto":
        raise ConfigError(f"train.resume: {path} holds no complete checkpoint (no {COMPLETE} marker)")
    return None


# Settings that decide the shapes of the saved tensors: a checkpoint resumes only into the same values.
SHAPE_SETTINGS = (
    "model.feature_size",
    "model.depths",
    "model.num_heads",
    "model.window_size",
    "model.patch_size",
    "model.in_channels",
    "model.decoder",
    "ssl.contrastive_dim",
)


def resume_mismatch(directory: Path, cfg: Config) -> list[str]:
    """One line per model setting in which the checkpoint's run and this run differ (empty: they match).

    Checked before anything is built, so resuming with another model ends in a line that names the setting,
    not in a ``size mismatch for conv.20.weight`` traceback after the process group and model exist."""
    extra = Path(directory) / "extra_rank0.pt"
    if not extra.is_file():
        return []
    try:
        saved = json.loads(torch.load(extra, map_location="cpu", weights_only=True).get("config", "{}"))
    except Exception:  # noqa: BLE001 - an unreadable file is the verification's business, not this check's
        return []
    now = cfg.to_dict()
    problems = []
    for dotted in SHAPE_SETTINGS:
        section, key = dotted.split(".")
        if key not in saved.get(section, {}):
            continue
        old, new = saved[section][key], now[section][key]
        old, new = (list(v) if isinstance(v, list | tuple) else v for v in (old, new))
        if old != new:
            problems.append(
                f"train.resume: {directory} was trained with {dotted} {json.dumps(old)}, "
                f"this run has {json.dumps(new)}; "
                f"resume with {dotted}={json.dumps(old)}, or start a new run from its weights (model.init_weights)"
            )
    return problems


# ---------------------------------------------------------------------------------------------------------
# The model_swinvit.pt format (what MONAI's SwinUNETR.load_from reads) and other weight files.

_MLP_TO_OLD = {".mlp.linear1.": ".mlp.fc1.", ".mlp.linear2.": ".mlp.fc2."}


def to_swinvit_format(model_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """SSL-model state (``swinViT.*``) -> ``{"state_dict": {"module.<encoder name with fc1/fc2>": tensor}}``."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model_state.items():
        name = clean_name(name)
        if not name.startswith("swinViT."):
            continue
        key = "module." + name[len("swinViT.") :]
        for new, old in _MLP_TO_OLD.items():
            key = key.replace(new, old)
        out[key] = tensor.detach().float().cpu().clone()
    if not out:
        raise ValueError("no encoder tensors (swinViT.*) found in the model state")
    return {"state_dict": out}


def export_swinvit(
    model_state: dict[str, torch.Tensor], path: Path, cfg: Config | None = None, steps: int | None = None
) -> Path:
    """Write ``model_swinvit.pt``; with the run's config also ``model_swinvit.json`` (``ssl3d.metadata``).

    Without a config a metadata file left by an earlier export at the same path is removed: it would describe
    other tensors."""
    from ssl3d.metadata import build_metadata, metadata_path, write_metadata

    blob = to_swinvit_format(model_state)
    atomic_torch_save(blob, Path(path))
    if cfg is not None:
        write_metadata(Path(path), build_metadata(cfg, blob["state_dict"], steps))
    else:
        metadata_path(Path(path)).unlink(missing_ok=True)
    return Path(path)


def _weights_problem(path: Path) -> str | None:
    """A checkpoint folder must verify; a file inside one (``step_X/state.pt``) must match its marker entry."""
    if path.is_dir():
        return checkpoint_problem(path) if _looks_like_checkpoint(path) or (path / COMPLETE).exists() else None
    marker = path.parent / COMPLETE
    if not marker.is_file():
        return None
    try:
        want = (json.loads(marker.read_text()).get("files") or {}).get(path.name)
    except (ValueError, AttributeError):
        return None
    if want is None:
        return None
    if path.stat().st_size != want["size"]:
        return f"{path.stat().st_size} bytes, the marker lists {want['size']} (truncated or rewritten)"
    if _digest(path) != want["sha256"]:
        return "differs from its SHA-256 in the marker (changed after it was written)"
    return None


def load_weights_file(path: Path, allow_pickle: bool = False) -> Any:
    """``torch.load`` of a weights file a user named, on the CPU; a file torch cannot read (truncated, damaged, not a
    PyTorch file, or one that needs full unpickling) is a ``ConfigError`` naming it and what to do, not a traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for unreadable and untrusted files
        if not allow_pickle and "weights_only" in str(exc).lower() and "pickle" in str(exc).lower():
            raise ConfigError(
                f"{path}: this file needs full unpickling, which can run arbitrary code; "
                "pass --allow-pickle only if you trust its source"
            ) from None
        what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = what.split(". ")[0].rstrip(".")  # torch's first sentence (its advice follows)
        size = path.stat().st_size if path.is_file() else 0
        raise ConfigError(
            f"{path}: not a readable weights file ({size} bytes; torch: {what}); it is truncated or damaged: copy it "
            "again, or export it again from its run with ssl3d export"
        ) from None


def read_weights(path: Path, allow_pickle: bool = False, verify: bool = True) -> dict[str, torch.Tensor]:
    """Any weight file ssl3d knows -> plain SSL-model names (``swinViT.*``, heads, ``conv.*``).

    Reads ``model_swinvit.pt`` (encoder only, ``module.`` prefix, fc1/fc2 names), the reference's checkpoints
    (``{"state_dict": ...}``, possibly with DDP's ``module.``), ssl3d's step folders and consolidated files.
    Loaded with ``weights_only=True``: a file that needs full unpickling is refused unless ``allow_pickle``.
    A checkpoint folder (or a file in one) is verified against its marker first (``verify``).
    """
    path = Path(path)
    problem = _weights_problem(path) if verify else None
    if problem:
        raise ConfigError(f"{path}: damaged checkpoint: {problem}")
    if path.is_dir():  # a checkpoint folder of any backend (state.pt, DCP shards, DeepSpeed ZeRO partitions)
        from ssl3d.strategies import read_checkpoint_weights

        return read_checkpoint_weights(path)
    blob = load_weights_file(path, allow_pickle)
    if isinstance(blob, dict) and "model" in blob and isinstance(blob["model"], dict):
        state = blob["model"]
    elif isinstance(blob, dict) and "state_dict" in blob:
        state = blob["state_dict"]
    elif isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
        state = blob
    else:
        raise ConfigError(f"{path}: not a weight file ssl3d knows (expected 'state_dict' or 'model' inside)")
    out: dict[str, torch.Tensor] = {}
    # model_swinvit.pt holds the encoder's names at the top level (no ``swinViT.`` level).
    encoder_top = ("patch_embed.", "layers1.", "layers2.", "layers3.", "layers4.")
    for name, tensor in state.items():
        key = clean_name(name)
        for new, old in _MLP_TO_OLD.items():
            key = key.replace(old, new)
        key = key.replace("swin_vit.", "swinViT.")
        if key.startswith(encoder_top):
            key = "swinViT." + key
        out[key] = tensor
    return out


def load_init_weights(model: torch.nn.Module, path: Path, allow_pickle: bool = False) -> list[str]:
    """Initialise ``model`` (an SSLModel) from a weight file; returns the names of parameters left as they were."""
    src = read_weights(path, allow_pickle)
    own = model.state_dict()
    usable = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    mismatched = [k for k, v in src.items() if k in own and own[k].shape != v.shape]
    if not any(k.startswith("swinViT.") for k in usable):
        raise ConfigError(f"{path}: no encoder tensor matches this model (check model.feature_size and depths)")
    if mismatched:
        warnings.warn(f"{path}: {len(mismatched)} tensors have other shapes and were skipped, e.g. {mismatched[0]}")
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))
