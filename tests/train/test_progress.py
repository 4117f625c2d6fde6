"""Progress where stderr is not a terminal (a log file, a pipe): a line every few seconds with the step,
the rate, the loss and the time left, since a progress bar shows nothing there."""

from __future__ import annotations

import re

import pytest

from sparkct.errors import UserError
from sparkct.train.progress import ProgressLines, format_seconds, progress_interval


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_a_line_every_interval_with_rate_loss_and_time_left():
    clock, lines = FakeClock(), []
    p = ProgressLines(total=100, start_step=10, interval=30, log=lines.append, clock=clock)
    assert not p.update(11, 8, 0.9)  # the first step done starts the clock
    for step in range(12, 31):  # 2 s a step
        clock.t += 2
        p.update(step, 8, 0.5)
    # a line at 30 s (step 26: 15 steps after the first); none before
    assert lines == ["step 26/100 (26%), 0.5 steps/s, 4 img/s, loss 0.5, 2 min 28 s left"]
    clock.t += 500
    assert p.update(100, 8, 0.25)  # the last step always
    assert lines[-1].startswith("step 100/100 (100%)") and lines[-1].endswith("0 s left")


def test_the_interval_comes_from_the_environment():
    assert progress_interval({}) == 30
    assert progress_interval({"SPARKCT_PROGRESS_SECONDS": "0"}) == 0
    assert progress_interval({"SPARKCT_PROGRESS_SECONDS": "2.5"}) == 2.5
    for bad in ("-1", "abc", "nan"):
        with pytest.raises(UserError, match="SPARKCT_PROGRESS_SECONDS"):
            progress_interval({"SPARKCT_PROGRESS_SECONDS": bad})
    assert [format_seconds(s) for s in (5, 65, 7260)] == ["5 s", "1 min 05 s", "2 h 01 min"]


@pytest.mark.usefixtures("one_thread")
def test_the_trainer_logs_progress_lines_when_stderr_is_not_a_terminal(small_cache, tmp_path, monkeypatch):
    from sparkct.train.trainer import Trainer, build_method

    from test_trainer import cfg_for
    from tiny_method import TinyConfig

    monkeypatch.setenv("SPARKCT_PROGRESS_SECONDS", "0")  # a line every step
    cfg = cfg_for(small_cache, tmp_path / "run", max_steps=4, progress=True, preview_every=0)
    logged: list[str] = []
    Trainer(build_method("tiny", cfg, TinyConfig()), cfg, method_name="tiny", log=logged.append).fit()
    lines = [s for s in logged if s.startswith("step ")]
    assert [s.split()[1] for s in lines] == ["2/4", "3/4", "4/4"], logged
    assert all(re.search(r"steps/s, [\d.e+]+ img/s, loss [\d.]+, .* left$", s) for s in lines), lines
