"""Progress in logs (issue 9 item 6): off a terminal one line per chunk/epoch, no carriage-return redraws."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

SCRIPT = """
from stlink.progress import progress, write
bar = progress(total=5000, desc="rows scored", unit="rows", line_every=1000)
for _ in range(500):
    bar.update(10)
bar.close()
for epoch in range(3):   # the training loop: a silent batch bar and one line per epoch
    for _ in progress(range(200), desc=f"epoch {epoch + 1}", lines=False):
        pass
    write(f"epoch {epoch + 1}/3: loss 1.0")
"""


def run(env_extra: dict) -> str:
    env = {**os.environ, **env_extra}
    env.pop("STLINK_PROGRESS", None) if "STLINK_PROGRESS" not in env_extra else None
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # stdout/stderr are pipes: not a TTY, like DVC, CI and Prefect workers
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_no_tty_gives_a_bounded_number_of_plain_lines():
    out = run({})
    assert "\r" not in out
    lines = out.splitlines()
    scored = [ln for ln in lines if ln.startswith("rows scored:")]
    assert len(scored) == 5, lines       # 4 intermediate lines (every 1000 rows) + the final one
    assert scored[-1].startswith("rows scored: 5000/5000 rows (100%)")
    assert [ln for ln in lines if ln.startswith("epoch")] == [f"epoch {e}/3: loss 1.0" for e in (1, 2, 3)]
    assert len(lines) == 8


def test_a_terminal_keeps_its_bar():
    out = run({"STLINK_PROGRESS": "bar"})  # what a TTY gets: tqdm's bars (redrawn in place on a terminal)
    assert "rows scored:   0%|" in out and "| 5000/5000 [" in out and "epoch 1: 100%|" in out


@pytest.mark.parametrize("mode,expect", [("off", 3)])
def test_off_prints_only_the_callers_lines(mode, expect):
    assert len(run({"STLINK_PROGRESS": mode}).splitlines()) == expect
