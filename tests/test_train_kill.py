"""kill -9 in the middle of training: every checkpoint on disk is whole, and --resume finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hemaclip.models.checkpoint import load_checkpoint

# 160 images at batch 16 = 10 steps, a checkpoint every 2 steps: four chances to kill mid-epoch.
OPTIONS = ["--set", "epochs=1", "--set", "max_train_images=160", "--set", "max_val_images=20", "--set", "save_every_steps=2"]
POLL_S = 0.02
TIMEOUT_S = 300


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hemaclip.cli", "train", "--config", "tiny", "--out", str(out), *OPTIONS, *extra]


def _readable(path: Path) -> dict | None:
    """The checkpoint's train state, or None if it does not exist yet. A half-written file raises."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    return payload["extra"]["train_state"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "HEMACLIP_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_at = None
    seen = 0
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            state = _readable(out / "last.pt")  # every version we happen to see must load
            if state is not None:
                seen += 1
                if state["step"] > 0:  # a mid-epoch checkpoint: kill now, while training goes on
                    proc.send_signal(signal.SIGKILL)
                    killed_at = (state["epoch"], state["step"])
                    break
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=60)
    assert killed_at is not None, f"no mid-epoch checkpoint appeared (rc={proc.returncode}): {proc.stderr.read()[-1500:]}"
    assert proc.returncode == -signal.SIGKILL

    # Whatever the kill interrupted, the files under their final names are whole.
    state = _readable(out / "last.pt")
    assert state is not None and (state["epoch"], state["step"]) >= killed_at
    model, meta = load_checkpoint(out / "last.pt")
    assert meta["extra"]["train_state"]["step"] == state["step"]
    for leftover in out.glob("*.pt"):
        _readable(leftover)

    resumed = subprocess.run(_command(out, "--resume"), env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = _readable(out / "last.pt")
    assert final["epoch"] == 1 and final["step"] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    load_checkpoint(out / "best.pt")
    # The resume swept away whatever temporary file the kill left behind.
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_a_truncated_checkpoint_is_refused_with_one_line(tmp_path: Path, cut: float, tiny_vit_checkpoint: Path) -> None:
    """What a non-atomic write would leave behind is caught on load (the resume path never sees it)."""
    from hemaclip.errors import CheckpointError

    path = tmp_path / "m.pt"
    data = tiny_vit_checkpoint.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and "m.pt" in str(info.value)
