"""Training metrics: a CSV (one row per logged step, appended, so a resumed run continues the same file), a JSON
summary, and PNG curves drawn with matplotlib."""
from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

import pandas as pd

from d2v.io import atomic_write_text


def is_log_step(step: int, steps: int, every: int) -> bool:
    """The first, every `every`-th and the last step: where a training loop reads its metrics back to the host (on a
    GPU a synchronisation that drains the queue) to log and check them."""
    return step % every == 0 or step in (1, steps)


def progress_bar(desc: str, total: int, initial: int, enabled: bool = True):
    """A training loop's step bar on stderr (a context manager, closed on any exit); disabled, every call on it does
    nothing, so the loop need not ask (quiet runs, the other ranks under torchrun)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True,
                disable=not enabled)


class TrainingClock:
    """Seconds spent in the training loop over every run of a resumed training: each checkpoint carries them
    (`seconds`), so a run stopped and resumed any number of times reports its whole time, not its last part's."""

    def __init__(self, state: dict | None = None):
        self.before = float(state.get("seconds", 0.0)) if state is not None else 0.0  # older checkpoints: none
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """This run's part alone (what its throughput is measured over)."""
        return time.perf_counter() - self.start

    def seconds(self) -> float:
        return self.before + self.elapsed()


class MetricsLog:
    """`resume_step`: the step of the checkpoint a run resumes from; rows logged after it are dropped. `saved`: the
    log as that checkpoint holds it (`text()`), which restores the rows up to it, since a pipeline deletes a failed or
    stopped job's outputs, this file among them, while the checkpoints stay."""

    def __init__(self, path: str | Path, resume_step: int = 0, saved: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step > 0 and (saved or self.path.exists()):
            old = pd.read_csv(io.StringIO(saved) if saved else self.path)
            atomic_write_text(self.path, old[old["step"] <= resume_step].to_csv(index=False))
        elif self.path.exists():
            self.path.unlink()
        self.fields: list[str] | None = None
        if self.path.exists():
            with open(self.path) as f:
                self.fields = next(csv.reader(f), None)

    def write(self, row: dict) -> None:
        new = not self.path.exists() or self.fields is None
        if new:
            self.fields = list(row)
        elif not set(row) <= set(self.fields):  # a column appears later (dev metrics): widen the file once
            self.fields += [k for k in row if k not in self.fields]
            atomic_write_text(self.path, self.frame().reindex(columns=self.fields).to_csv(index=False))
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
            f.flush()

    def frame(self) -> pd.DataFrame:
        return pd.read_csv(self.path) if self.path.exists() else pd.DataFrame()

    def text(self) -> str | None:
        """The rows so far, for a checkpoint to carry."""
        return self.path.read_text() if self.path.exists() else None


def plot_curves(df: pd.DataFrame, out: str | Path, columns: list[str], title: str) -> Path | None:
    """One small panel per metric against step; written atomically (temp file + rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in columns if c in df and df[c].notna().any()]
    if df.empty or not columns:
        return None
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 2.6), squeeze=False)
    for ax, col in zip(axes[0], columns):
        ax.plot(df["step"], df[col], lw=1)
        ax.set_title(col, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if col in ("loss", "lr") and (df[col] > 0).all():
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(out)
    return out
