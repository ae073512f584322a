"""fmn.atomic: readers see the old or the whole new file; concurrent writers of one path do not
share a temporary file; a failed write leaves nothing behind; a full disk is one clear error;
temporaries left by a killed writer are removed, and nothing else."""
import errno
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch

from fmn import atomic, checkpoint
from fmn.atomic import NoSpaceError, atomic_write, remove_stale_temporaries
from fmn.checkpoint import load_checkpoint, save_checkpoint


def test_concurrent_writers_of_one_path_each_write_a_whole_file(tmp_path):
    path = str(tmp_path / "out.txt")
    contents = [str(i) * 200_000 for i in range(8)]
    errors = []
    start = threading.Barrier(len(contents))

    def writer(text):
        def write(tmp):
            with open(tmp, "w") as fh:
                for k in range(0, len(text), 10_000):      # slow writes: the threads overlap
                    fh.write(text[k:k + 10_000])
                    fh.flush()
        try:
            start.wait()
            atomic_write(path, write)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with open(path) as fh:
        assert fh.read() in contents
    assert os.listdir(tmp_path) == ["out.txt"]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "r.json"

    def old(tmp):
        with open(tmp, "w") as fh:
            fh.write("old")

    atomic_write(path, old)

    def dying(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dying)
    assert path.read_text() == "old" and os.listdir(path.parent) == ["r.json"]


def test_extension_stays_last_for_format_guessing_writers(tmp_path):
    seen = []
    atomic_write(tmp_path / "x.npz", lambda tmp: seen.append(tmp) or open(tmp, "wb").close())
    assert seen[0].endswith(".npz") and os.path.basename(seen[0]).startswith(".tmp-")


# ---------------------------------------------------------------------------------------------
# A full disk
TORCH_FULL_DISK_ERRORS = [
    # torch.save on a full disk (a path or a file object): its zip writer's errors, errno lost
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
    RuntimeError("basic_ios::clear: iostream error"),
    RuntimeError("[enforce fail at inline_container.cc:604] . PytorchStreamWriter failed writing file "
                 "data/0: file write failed"),
]


def _full_disk(monkeypatch):
    """os.statvfs as on a full file system (the failed write took the last block)."""
    real = os.statvfs

    def statvfs(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, st.f_files, st.f_ffree,
                                  st.f_favail, st.f_flag, st.f_namemax))

    monkeypatch.setattr(atomic.os, "statvfs", statvfs)


def _dying_torch_save(error):
    def save(obj, f):
        f.write(b"PK\x03\x04" + b"\0" * 4096)              # part of the archive, then the failure
        raise error
    return save


@pytest.mark.parametrize("error", TORCH_FULL_DISK_ERRORS + [OSError(errno.ENOSPC, "No space left on device")],
                         ids=["unexpected_pos", "iostream", "write_failed", "enospc"])
def test_full_disk_checkpoint_is_one_clear_error_and_keeps_the_previous_file(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    _full_disk(monkeypatch)
    monkeypatch.setattr(checkpoint.torch, "save", _dying_torch_save(error))
    with pytest.raises(NoSpaceError) as info:
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "no space left" in message
    assert info.value.__cause__ is error
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]
    assert load_checkpoint(path)["epoch"] == 1


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EDQUOT, "Disk quota exceeded")], ids=["enospc", "edquot"])
def test_full_disk_in_any_atomic_write(tmp_path, error):
    path = tmp_path / "results.json"
    path.write_text("old")

    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise error

    with pytest.raises(NoSpaceError, match=r"cannot write .*results\.json: no space left") as info:
        atomic_write(path, write)
    assert info.value.errno == error.errno
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]


def test_torch_writer_failure_with_free_space_names_the_path(tmp_path, monkeypatch):
    """The same torch error where the disk has room is not called a full disk."""
    path = tmp_path / "last.pt"
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 10 * 2**30)
    monkeypatch.setattr(checkpoint.torch, "save", _dying_torch_save(TORCH_FULL_DISK_ERRORS[0]))
    with pytest.raises(OSError, match=r"cannot write .*last\.pt: torch's file writer failed \(.*unexpected pos") as info:
        save_checkpoint({"w": torch.ones(1)}, path)
    assert not isinstance(info.value, NoSpaceError) and os.listdir(tmp_path) == []


def test_other_errors_pass_through(tmp_path):
    def write(tmp):
        raise RuntimeError("not a writer failure")

    with pytest.raises(RuntimeError, match="not a writer failure"):
        atomic_write(tmp_path / "x.pt", write)
    assert os.listdir(tmp_path) == []


FULL_TMPFS = """
import os, sys, torch
from fmn.atomic import NoSpaceError, atomic_write
from fmn.checkpoint import load_checkpoint, save_checkpoint
folder = sys.argv[1]
path = os.path.join(folder, "last.pt")
save_checkpoint({"epoch": 1, "w": torch.ones(10)}, path)
before = open(path, "rb").read()
for save in (lambda: save_checkpoint({"epoch": 2, "w": torch.zeros(10**6)}, path),
             lambda: atomic_write(path, lambda tmp: torch.save({"w": torch.zeros(10**6)}, tmp))):
    try:
        save()
    except NoSpaceError as exc:
        print(exc)
    assert open(path, "rb").read() == before and os.listdir(folder) == ["last.pt"], os.listdir(folder)
assert load_checkpoint(path)["epoch"] == 1
print("ok")
"""


def test_real_full_file_system(tmp_path):
    """torch.save on a real full file system: a 256 KiB tmpfs in a user and mount namespace
    (where unshare can make one)."""
    unshare = shutil.which("unshare")
    if unshare is None or sys.platform != "linux":
        pytest.skip("needs Linux unshare")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL_TMPFS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = (f"mount -t tmpfs -o size=256k tmpfs {shlex.quote(str(mnt))} || exit 77; "
           f"exec {shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(mnt))}")
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([unshare, "-r", "-m", "sh", "-c", cmd], capture_output=True, text=True, env=env,
                         timeout=300)
    if res.returncode == 77 or (res.returncode != 0 and "unshare" in res.stderr and "Traceback" not in res.stderr):
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()[-200:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "ok" and len(lines) == 3, res.stdout
    assert all("last.pt: no space left on device" in line for line in lines[:2])


# ---------------------------------------------------------------------------------------------
# Temporaries left by a killed writer
def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_temporaries_removes_only_the_files_own_dead_temporaries(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead, me = _dead_pid(), os.getpid()
        stale = [f".tmp-{dead}-0123abcd-last.pt", f".tmp-{me}-89abcdef-last.pt"]
        kept = [
            "last.pt", "model.pt", "last.pt.tmp", "notes.txt",
            f".tmp-{sleeper.pid}-0123abcd-last.pt",        # a writer still running
            f".tmp-{dead}-0123abcd-model.pt",              # another file's temporary
            f".tmp-{dead}-0123abcd-last.pt.bak",
            f".tmp-{dead}-0123ABCD-last.pt", f".tmp-{dead}-0123abc-last.pt", ".tmp-x-0123abcd-last.pt",
            f"tmp-{dead}-0123abcd-last.pt", f"a.tmp-{dead}-0123abcd-last.pt",
        ]
        for name in stale + kept:
            (tmp_path / name).write_text(name)
        (tmp_path / f".tmp-{dead}-aaaaaaaa-last.pt").mkdir()                  # a folder
        os.symlink(tmp_path / "notes.txt", tmp_path / f".tmp-{dead}-bbbbbbbb-last.pt")   # a link
        removed = remove_stale_temporaries(tmp_path, "last.pt")
        assert removed == sorted(str(tmp_path / n) for n in stale)
        assert sorted(os.listdir(tmp_path)) == sorted(kept + [f".tmp-{dead}-aaaaaaaa-last.pt",
                                                               f".tmp-{dead}-bbbbbbbb-last.pt"])
        assert all((tmp_path / n).read_text() == n for n in kept)
        assert remove_stale_temporaries(tmp_path, "last.pt") == []
        assert remove_stale_temporaries(tmp_path / "absent", "last.pt") == []
        with pytest.raises(ValueError, match="file name"):
            remove_stale_temporaries(tmp_path, "sub/last.pt")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_remove_stale_temporaries_after_a_killed_writer(tmp_path):
    """A writer killed inside atomic_write leaves its temporary; the function removes it and
    leaves the previous file."""
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    code = ("import os, signal, sys, torch\n"
            "from fmn.atomic import atomic_write\n"
            "def write(tmp):\n"
            "    torch.save({'epoch': 2}, tmp)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "atomic_write(sys.argv[1], write)\n")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    left = [n for n in os.listdir(tmp_path) if n != "last.pt"]
    assert len(left) == 1 and left[0].startswith(".tmp-") and left[0].endswith("-last.pt")
    assert remove_stale_temporaries(str(tmp_path), "last.pt") == [str(tmp_path / left[0])]
    assert os.listdir(tmp_path) == ["last.pt"] and load_checkpoint(path)["epoch"] == 1


def test_remove_stale_temporaries_keeps_this_process_writes_in_flight(tmp_path):
    seen = []

    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write("new")
        seen.append(remove_stale_temporaries(tmp_path, "r.txt"))

    atomic_write(tmp_path / "r.txt", write)
    assert seen == [[]] and (tmp_path / "r.txt").read_text() == "new"
