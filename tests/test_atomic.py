"""fmn.atomic.atomic_write: readers see the old or the whole new file; concurrent writers of one
path do not share a temporary file; a failed write leaves nothing behind."""
import os
import threading

import pytest

from fmn.atomic import atomic_write


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
