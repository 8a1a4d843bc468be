"""Faults a user meets, through the command line: two runs in one folder, a damaged checkpoint, Ctrl-C,
a killed process, resume rules, bad data that must leave no run folder, and long error messages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from itmatch.cli import main

SMALL = ["--set", "model.embed_dim=32", "--set", "model.text.glove=null", "--set", "model.text.word_dim=16",
         "--set", "train.batch_size=32", "--set", "data.max_dev_images=40"]


def itmatch_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "itmatch", *map(str, args)]


def run_cli(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(itmatch_cmd(*args), capture_output=True, text=True, timeout=timeout, **kw)


def wait_for(predicate, timeout=90.0, what=""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def train_steps(run: Path) -> list[int]:
    steps = []
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if rec["kind"] == "train":
            steps.append(rec["step"])
    return steps or [0]


def latest_step(run: Path) -> int:
    return int((run / "checkpoints" / "LATEST").read_text().strip().split("-")[1])


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_concurrent_run_refused_killed_run_resumes_past_damage_sigint_saves(tiny_scenes, tmp_path):
    """One long story on one run folder, each step a separate `itmatch` process."""
    run = tmp_path / "run"
    first = ["train", "--config", "vse_scenes", "--out", run, "--set", f"data.root={tiny_scenes}", *SMALL,
             "--set", "train.epochs=400", "--set", "train.log_every_steps=1", "--set", "train.checkpoint_every_steps=4",
             "--set", "train.eval_every_epochs=1000", "--set", "optim.lr=1e-3"]  # YAML 1.1 reads 1e-3 as a string
    umask = 0o027

    def spawn(name, *args):  # output to files: a full pipe would block the run
        out = open(tmp_path / f"{name}.err", "w")
        return subprocess.Popen(itmatch_cmd(*args), stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: os.umask(umask))

    # 1. A long run; once it has two checkpoints, a second process asking for the same folder is refused.
    a = spawn("a", *first)
    try:
        wait_for(lambda: len(list((run / "checkpoints").glob("step-*"))) >= 2, what="two checkpoints")
        b = run_cli(*first, "--resume", "latest")
        assert b.returncode == 2, b.stderr
        assert f"is in use by pid {a.pid} on host {socket.gethostname()}" in b.stderr
        assert "Traceback" not in b.stderr
        wait_for(lambda: train_steps(run)[-1] > latest_step(run), what="steps past the last checkpoint")
    finally:
        a.kill()  # kill -9: no clean release, records past the last checkpoint
        a.wait()
    assert json.loads((run / "run.lock").read_text())["pid"] == a.pid  # the lock file outlives its process
    assert "  lr: 0.001\n" in (run / "config.yaml").read_text()

    # 2. Damage the latest checkpoint: resume falls back to the previous one and says so; the dead lock is noticed.
    steps = sorted((run / "checkpoints").glob("step-*"))
    newest, older = steps[-1], steps[-2]
    (run / "checkpoints" / "LATEST").write_text(newest.name + "\n")
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes: only the checksum sees it
    c = spawn("c", "train", "--out", run, "--resume", "latest", "--set", "train.log_every_steps=1")
    try:
        wait_for(lambda: (run / "out.log").read_text().count("resumed from") == 1 and
                 train_steps(run)[-1] >= int(older.name.split("-")[1]) + 3, what="the resumed run to step on")
        c.send_signal(signal.SIGINT)
        c.wait(timeout=60)
    finally:
        if c.poll() is None:
            c.kill()
    err = (tmp_path / "c.err").read_text()
    assert c.returncode == 130, err
    assert f"skipped a damaged checkpoint (corrupt checkpoint {newest}: model.safetensors does not match" in err
    assert f"resuming from {older.name} instead" in err
    assert f"pid {a.pid} on host {socket.gethostname()}" in err and "ended without releasing its lock" in err
    # 3. Ctrl-C saved the step it was at and printed the exact command that continues it.
    last = err.strip().splitlines()[-1]
    assert last.startswith("itmatch: interrupted (SIGINT) at step ")
    stopped = int(last.split(" at step ")[1].split(":")[0])
    assert latest_step(run) == stopped and train_steps(run)[-1] == stopped
    command = last.split("continue with: ")[1]
    assert command == f"itmatch train --out {run} --resume latest"

    # 4. The printed command (with a budget, as a user would extend it) finishes; records hold each step once.
    d = run_cli(*command.split()[1:], "--set", f"train.max_steps={stopped + 2}", preexec_fn=lambda: os.umask(umask))
    assert d.returncode == 0, d.stderr
    recorded = train_steps(run)
    assert recorded == list(range(1, stopped + 3))  # A's replayed records past the damaged checkpoint were cut
    # 5. Everything the runs wrote follows their umask (tempfile and safetensors would have made 0600/0700).
    for path in [run, *run.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == want, (path, oct(path.stat().st_mode))


def test_resume_refuses_conflicting_config_and_names_the_key(tiny_scenes, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", "vse_scenes", "--out", str(run), "--set", f"data.root={tiny_scenes}", *SMALL,
            "--set", "train.max_steps=2"]
    assert main(args) == 0
    # Repeating the first command plus --resume is fine: nothing to do, said so, nothing rewritten.
    capsys.readouterr()
    before = (run / "metrics.jsonl").read_text()
    assert main(args + ["--resume", "latest"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before
    # Another method's config against this checkpoint: refused, naming the first key that differs.
    other = tmp_path / "other"
    assert main(["train", "--config", "hrem_scenes", "--out", str(other), "--resume", str(run / "checkpoints" /
                 "step-00000002"), "--set", f"data.root={tiny_scenes}"]) == 2
    err = capsys.readouterr().err
    assert "with its own config, but the command line asks for" in err and "only train.* may change" in err
    assert not other.exists()
    assert main(["train", "--out", str(run), "--resume", "latest", "--set", "model.embed_dim=64"]) == 2
    assert "model.embed_dim (32 in the checkpoint, 64 asked)" in capsys.readouterr().err
    # A checkpoint of another run, resumed into a new folder without a better dev score: no phantom best/ path.
    assert main(["train", "--out", str(other), "--resume", str(run / "checkpoints" / "step-00000002"),
                 "--set", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert (other / "best").exists() or "has no best/ checkpoint" in out


def _copy_split(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).symlink_to(p)
    return dst


def test_config_and_data_errors_leave_no_run_folder(tiny_scenes, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--config", "vse_scenes", "--out", str(run), *SMALL, "--set", "train.max_steps=2"]
    width = np.load(tiny_scenes / "train_ims.npy", mmap_mode="r").shape[-1]
    assert main(base + ["--set", f"data.root={tiny_scenes}", "--set", f"model.image.feature_dim={width + 1}"]) == 2
    err = capsys.readouterr().err
    assert f"'model.image.feature_dim' is {width + 1} but train_ims.npy" in err
    assert f"set model.image.feature_dim={width}" in err and "Traceback" not in err
    assert not run.exists()

    # NaN/inf rows: every distinct row and the file are named, as `data inspect` reports them.
    data = _copy_split(tiny_scenes, tmp_path / "data")
    feats = np.load(tiny_scenes / "train_ims.npy")
    feats[[3, 7, 7 + 1, 90]] = np.nan
    feats[50, 0, 0] = np.inf
    (data / "train_ims.npy").unlink()
    np.save(data / "train_ims.npy", feats)
    assert main(base + ["--set", f"data.root={data}"]) == 2
    err = capsys.readouterr().err
    assert "NaN or inf in rows 3, 7, 8, 50, 90 of train_ims.npy" in err
    assert not run.exists()
    assert main(["data", "inspect", str(data), "--split", "train"]) == 1
    assert "NaN or inf in 5 rows: 3, 7, 8, 50, 90" in capsys.readouterr().out


def test_eval_sims_on_a_text_file_named_npy(tmp_path, capsys):
    fake = tmp_path / "sims.npy"
    fake.write_text("0.1,0.2\n0.3,0.4\n")
    assert main(["eval-sims", str(fake), "--protocol", "plain", "--captions-per-image", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{fake} is not an .npy file" in err and "pickle" not in err


def test_long_messages_are_cut_at_a_word_and_logged_in_full(tmp_path, capsys):
    from itmatch.errors import clip_message, error_log_path

    text = " ".join(f"word{i}" for i in range(200))
    line, cut = clip_message(text, 100)
    assert cut and line.endswith(" ...") and len(line) <= 104
    assert text.startswith(line[:-4]) and text[len(line) - 4] == " "  # the cut fell between two words
    assert clip_message("short message", 100) == ("short message", False)
    # Through the CLI: a data folder whose long name has spaces.
    root = tmp_path.joinpath(*["a folder"] * 60)
    assert main(["train", "--config", "vse_scenes", "--out", str(tmp_path / "r"), "--set", f"data.root={root}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("itmatch: error: data folder not found:") and " ... (full message in " in err
    assert f"{root} (config key 'data.root')" in error_log_path().read_text()


def test_demo_keeps_an_earlier_demo_without_force(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text("{}\n")
    (out / "report.html").write_text("earlier")
    assert main(["demo", "--out", str(out)]) == 2
    assert "holds an earlier demo: pass --force" in capsys.readouterr().err
    assert (out / "report.html").read_text() == "earlier"
    from itmatch.cli import build_parser

    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["demo"].format_help().split())
    assert ".cache/scenes-small-seed0" in help_text and "--force" in help_text
    from itmatch.data.setup import scenes_cache_dir

    monkeypatch.delenv("ITMATCH_CACHE")  # what the help promises is what the code does
    assert scenes_cache_dir("small") == Path(".cache/scenes-small-seed0")


def test_threads_follow_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    import torch

    from itmatch.threads import available_cpus, choose_threads

    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert available_cpus(tmp_path) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(v1) == affinity
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(None) == (3, "OMP_NUM_THREADS") and choose_threads(2) == (2, "--threads")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert choose_threads(None)[0] == available_cpus()
    before = torch.get_num_threads()
    try:
        assert main(["eval", str(tmp_path / "missing"), "--threads", "1"]) == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["eval", "x", "--threads", "0"])


def test_training_logs_progress_by_time_when_not_on_a_terminal(tiny_scenes, tmp_path, monkeypatch, capsys):
    from itmatch.config import PACKAGED_CONFIGS, load_config
    from itmatch.training.loop import Trainer

    monkeypatch.setenv("ITMATCH_PROGRESS_SECONDS", "0")
    cfg = load_config(PACKAGED_CONFIGS / "vse_scenes.yaml",
                      [f"data.root={tiny_scenes}", "model.embed_dim=32", "model.text.glove=null",
                       "model.text.word_dim=16", "train.batch_size=32", "train.max_steps=3",
                       "train.log_every_steps=1000", "data.max_dev_images=40"])
    Trainer(cfg, tmp_path / "run").fit()
    err = capsys.readouterr().err
    assert "epoch 1 step 1/3 loss" in err and "epoch 1 step 2/3 loss" in err
    shutil.rmtree(tmp_path / "run")


def test_scenes_generation_reports_progress_off_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ITMATCH_PROGRESS_SECONDS", "0")
    assert main(["data", "scenes", "--out", str(tmp_path / "s"), "--size", "tiny", "--no-features"]) == 0
    err = capsys.readouterr().err
    assert "scenes train: 64/120 img (53%" in err  # one line per update here; none at the end


def test_partial_checkpoint_writes_are_removed_and_finished_ones_kept(tmp_path):
    from itmatch.checkpoint import remove_partial_saves

    run = tmp_path / "run"
    keep = [run / "best", run / "checkpoints" / "step-4", run / ".hidden-user-folder"]
    junk = [run / ".best.tmp-ab12", run / "checkpoints" / ".step-8.tmp-x9", run / "checkpoints" / ".step-4.old"]
    for folder in keep + junk:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x")
    assert sorted(remove_partial_saves(run)) == sorted(junk)
    assert all(f.is_dir() for f in keep) and not any(f.exists() for f in junk)
    assert remove_partial_saves(tmp_path / "missing") == []


def test_configure_threads_limits_numpy_blas_too():
    import numpy as np  # noqa: F401  (loads the BLAS threadpoolctl inspects)
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    from itmatch.threads import configure_threads

    before = torch.get_num_threads()
    with threadpool_limits(limits=None):  # restores numpy's pools after the test
        try:
            threadpool_limits(limits=2, user_api="blas")  # as numpy sizes it from the machine
            assert configure_threads(1) == 1
            blas = [p for p in threadpool_info() if p["user_api"] == "blas"]
            assert blas and all(p["num_threads"] == 1 for p in blas)
        finally:
            torch.set_num_threads(before)
