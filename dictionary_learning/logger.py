"""Metrics logging: always to `out_dir/metrics.jsonl`, optionally to wandb; curves.png at the end."""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from pathlib import Path

from .distributed import is_main

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
    ):
        """`resume_step=None` starts metrics.jsonl afresh; an int keeps its rows up to that step
        (a resumed run drops the rows logged after its checkpoint, so no step appears twice)."""
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
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", encoding="utf-8")
        if wandb_mode == "online" and not _has_wandb_key():
            logger.warning(
                "wandb_mode='online' but no wandb API key (WANDB_API_KEY or `wandb login`); "
                "logging locally to %s only", self.path,
            )
            wandb_mode = "disabled"
        if wandb_mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=project, name=run_name, config=config or {}, mode=wandb_mode,
                dir=str(self.out_dir),
            )

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
        """Close wandb and the file; write curves.png (loss and per-dictionary FVU vs step)."""
        if not self.enabled:
            return None
        if self.run is not None:
            self.run.finish()
            self.run = None
        if not self._fh.closed:
            self._fh.close()
        return plot_curves(self.path, self.out_dir / "curves.png")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path | None:
    """Plot loss and every `<name>/fvu` against step; written atomically. None if no rows."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fvu_keys = sorted({k for r in rows for k in r if k.endswith("/fvu")})
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    pts = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    if pts:
        ax0.plot(*zip(*pts))
    ax0.set(xlabel="step", ylabel="loss", title="loss", yscale="log")
    for k in fvu_keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        if pts:
            ax1.plot(*zip(*pts), label=k.removesuffix("/fvu"))
    ax1.set(xlabel="step", ylabel="FVU", title="FVU per dictionary", yscale="log")
    if fvu_keys:
        ax1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = Path(out_png)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
