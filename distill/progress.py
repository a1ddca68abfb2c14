"""Progress display: a rich bar in a terminal, a plain line every tenth of the run elsewhere."""

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, label: str = "train"):
        self.total, self.enabled, self.label = total, enabled, label
        self.console = Console(stderr=True)
        self.bar = None
        self.t0, self.start, self.next_line = time.perf_counter(), start, start
        if enabled and self.console.is_terminal:
            self.bar = RichProgress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[tps]:,.0f} tok/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, completed=start, loss=float("nan"), tps=0.0)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, tps=tokens_per_s)
        elif step >= self.next_line or step == self.total:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(step - self.start, 1) * (self.total - step)
            print(
                f"{self.label} step {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s "
                f"elapsed {elapsed:.0f}s ETA {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )
            self.next_line = step + max(self.total // 10, 1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
