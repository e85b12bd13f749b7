"""Metrics logging: always to `out_dir/metrics.jsonl`, optionally to wandb; curves.png at the end.

A wandb run mirrors metrics.jsonl row for row, whether it is logged live (`MetricsLogger`) or
written afterwards from the file (`replay_metrics`, for a stage that came from a cache), so the
two never disagree. `summary_run` writes a run holding only a summary: scalars, tables, images.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from dataclasses import dataclass
from pathlib import Path

from .distributed import is_main
from .files import atomic_write

logger = logging.getLogger(__name__)

WANDB_MODES = ("disabled", "offline", "online")


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(constant: str, flag: str | None = None) -> str:
    """The wandb mode in force: the `--wandb` flag, else $WANDB_MODE, else the script's constant."""
    mode = flag or os.environ.get("WANDB_MODE") or constant
    if mode not in WANDB_MODES:
        raise ValueError(
            f"wandb mode {mode!r} (flag, $WANDB_MODE or constant); use one of {WANDB_MODES}"
        )
    return mode


@dataclass
class WandbSettings:
    """Where and how the runs of one job go: one group per pipeline run, files under `dir`."""

    mode: str = "disabled"
    """'disabled', 'offline' or 'online' (online without an API key logs locally only)."""
    project: str = "scae"
    """wandb project."""
    group: str | None = None
    """wandb group shared by the runs of one job (pretraining, finetunes, evaluation)."""
    dir: str | None = None
    """Folder wandb writes its `wandb/` run folders into (None: the run's out_dir)."""

    def init(self, name: str | None, job_type: str | None, config: dict | None, default_dir):
        """A started wandb run, or None when disabled (or online without a key)."""
        mode = self.mode
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode={mode!r}; pass one of {WANDB_MODES}")
        if mode == "online" and not _has_wandb_key():
            logger.warning(
                "wandb_mode='online' but no wandb API key (WANDB_API_KEY or `wandb login`); "
                "logging locally only",
            )
            mode = "disabled"
        if mode == "disabled":
            return None
        import wandb

        folder = Path(self.dir or default_dir)
        folder.mkdir(parents=True, exist_ok=True)
        # several runs per process (pipeline stages, notebook re-runs): each init starts a new one
        return wandb.init(
            project=self.project, name=name, group=self.group, job_type=job_type,
            config=config or {}, mode=mode, dir=str(folder), reinit="create_new",
        )


def _wandb_row(row: dict) -> tuple[dict, int]:
    """A metrics.jsonl row as wandb values (non-finite floats were stored as strings)."""
    values = {}
    for k, v in row.items():
        if k == "step":
            continue
        if isinstance(v, str) and v in ("nan", "inf", "-inf"):
            v = float(v)
        values[k] = v
    return values, int(row["step"])


def _log_curves(run, png: Path | None) -> None:
    """curves.png as the run's summary image (not a history row: history mirrors metrics.jsonl)."""
    if run is not None and png is not None and png.is_file():
        import wandb

        run.summary["curves"] = wandb.Image(str(png))


def replay_metrics(
    metrics_path: str | os.PathLike,
    settings: WandbSettings,
    *,
    name: str | None = None,
    job_type: str | None = None,
    config: dict | None = None,
) -> None:
    """Write a finished metrics.jsonl (and its curves.png) as a wandb run, step for step."""
    if not is_main():
        return
    path = Path(metrics_path)
    run = settings.init(name, job_type, {**(config or {}), "replayed_from": str(path)}, path.parent)
    if run is None:
        return
    for row in read_metrics(path) if path.is_file() else []:
        values, step = _wandb_row(row)
        run.log(values, step=step)
    _log_curves(run, path.parent / "curves.png")
    run.finish()


def summary_run(
    settings: WandbSettings,
    *,
    name: str,
    job_type: str,
    config: dict | None = None,
    scalars: dict | None = None,
    tables: dict[str, tuple[list[str], list[list]]] | None = None,
    images: dict[str, str | os.PathLike] | None = None,
    default_dir: str | os.PathLike = ".",
) -> None:
    """A run holding only a summary: scalars, `wandb.Table`s (columns, rows) and PNG images."""
    if not is_main():
        return
    run = settings.init(name, job_type, config, default_dir)
    if run is None:
        return
    import wandb

    media = {k: wandb.Table(columns=cols, data=rows) for k, (cols, rows) in (tables or {}).items()}
    media.update({k: wandb.Image(str(p)) for k, p in (images or {}).items() if Path(p).is_file()})
    if media:
        run.log(media)
    run.summary.update(scalars or {})
    run.finish()


class MetricsLogger:
    """Logs scalar dicts per step. Only rank 0 writes anything."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        wandb_mode: str = "disabled",
        project: str = "scae",
        run_name: str | None = None,
        config: dict | None = None,
        resume_step: int | None = None,
        wandb_group: str | None = None,
        wandb_dir: str | os.PathLike | None = None,
        job_type: str | None = None,
    ):
        """`resume_step=None` starts metrics.jsonl afresh; an int keeps its rows up to that step
        (a resumed run drops the rows logged after its checkpoint, so no step appears twice, and
        its wandb run starts with the kept rows, so it holds the whole curve)."""
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode={wandb_mode!r}; pass one of {WANDB_MODES}")
        self.out_dir = Path(out_dir)
        self.enabled = is_main()
        self.run = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.path, lambda fh: fh.write(text.encode("utf-8")))
        self._fh = open(self.path, "a", encoding="utf-8")
        settings = WandbSettings(wandb_mode, project, wandb_group,
                                 None if wandb_dir is None else str(wandb_dir))
        self.run = settings.init(run_name, job_type, config, self.out_dir)
        for row in kept if self.run is not None else []:
            values, step = _wandb_row(row)
            self.run.log(values, step=step)

    def log(self, metrics: dict, step: int) -> None:
        """Append {"step": step, **metrics} to metrics.jsonl (and wandb)."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v) if not isinstance(v, (str, bool)) else v
            row[k] = v if not (isinstance(v, float) and not math.isfinite(v)) else str(v)
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self.run is not None:
            self.run.log(metrics, step=int(step))

    def finish(self) -> Path | None:
        """Close the file; write curves.png (loss and per-dictionary FVU vs step); close wandb."""
        if not self.enabled:
            return None
        if not self._fh.closed:
            self._fh.close()
        png = plot_curves(self.path, self.out_dir / "curves.png")
        if self.run is not None:
            _log_curves(self.run, png)
            self.run.finish()
            self.run = None
        return png


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path | None:
    """Plot loss, every `<name>/fvu` and every `<name>/dead_frac` (the trainer's dead window)
    against step; written atomically. None if no rows.

    Drawn on a bare `Figure` (no pyplot), so the global matplotlib backend -- a notebook's inline
    backend included -- is never touched.
    """
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    from matplotlib.figure import Figure

    fvu_keys = sorted({k for r in rows for k in r if k.endswith("/fvu")})
    dead_keys = sorted({k for r in rows for k in r if k.endswith("/dead_frac")})
    fig = Figure(figsize=(16 if dead_keys else 11, 4))
    axes = fig.subplots(1, 3 if dead_keys else 2)
    pts = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    if pts:
        axes[0].plot(*zip(*pts))
    axes[0].set(xlabel="step", ylabel="loss", title="loss", yscale="log")
    panels = [(axes[1], fvu_keys, "/fvu", "FVU", "FVU per dictionary", "log")]
    if dead_keys:
        panels.append((axes[2], dead_keys, "/dead_frac", "fraction of features",
                       "dead (not fired within the dead window)", "linear"))
    for ax, keys, suffix, ylabel, title, yscale in panels:
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=k.removesuffix(suffix))
        ax.set(xlabel="step", ylabel=ylabel, title=title, yscale=yscale)
        if keys:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return atomic_write(out_png, lambda fh: fig.savefig(fh, format="png", dpi=100))
