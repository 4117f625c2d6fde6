"""The run's metrics: ``metrics.csv`` (fixed columns), ``metrics.jsonl`` (every row) and TensorBoard.

Rows are kept in memory and written atomically on flush (at each checkpoint and at the end), so the
files on disk always match the latest checkpoint; on resume, rows past the resumed step are dropped.
"""

from __future__ import annotations

import csv
import io
import json
import os

from sparkct import io as sio

__all__ = ["MetricsLog"]


class MetricsLog:
    """metrics.csv (fixed columns from the first row: loss, lr, wd, images/s and the method's logs; later
    keys go to metrics.jsonl only) and TensorBoard. On resume, rows past the resumed step are dropped."""

    def __init__(self, run_dir: str, start_step: int, *, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        self.fields: list[str] | None = None
        self.rows: list[dict] = []
        self.tb = None
        if not enabled:
            return
        if os.path.isfile(self.csv_path):
            with open(self.csv_path, newline="") as f:
                r = csv.DictReader(f)
                self.fields = list(r.fieldnames) if r.fieldnames is not None else None
                self.rows = [row for row in r if int(row["step"]) <= start_step]
        self._jsonl = [ln for ln in _read_lines(self.jsonl_path) if json.loads(ln).get("step", 0) <= start_step]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (lazy: tensorboard is optional)

                self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                self.tb = None

    def write(self, step: int, epoch: int, logs: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch, **{k: float(v) for k, v in logs.items()}}
        self._jsonl.append(json.dumps(row))
        if not any(k.startswith("epoch/") for k in logs):
            if self.fields is None:
                self.fields = list(row)
            self.rows.append({k: row.get(k, "") for k in self.fields})
        if self.tb is not None:
            for k, v in logs.items():
                self.tb.add_scalar(k, float(v), step)

    def flush(self) -> None:
        if not self.enabled:
            return
        if self.fields is not None:  # no step row yet (before the first --log-every); epoch rows may exist
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=self.fields)
            w.writeheader()
            w.writerows(self.rows)
            sio.write_text_atomic(self.csv_path, buf.getvalue())
        if self._jsonl:
            sio.write_text_atomic(self.jsonl_path, "\n".join(self._jsonl) + "\n")
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]
