"""Folders and files written whole or not at all (downloads, the embedded base's conversion,
fingerprint caches), also when two processes make the same one at once."""

from __future__ import annotations

import threading

import pytest

from registry.atomic import make_folder, write_file


def test_two_makers_of_one_folder_write_their_own_and_the_first_renamed_is_kept(tmp_path):
    """Two first uses of the embedded base converted into one `.partial` folder: one deleted
    the other's files mid-save, and its rename failed (`Directory not empty`)."""
    dest = tmp_path / "models" / "smollm2"
    first_writing, second_done = threading.Event(), threading.Event()
    made = {}

    def maker(name: str, wait: bool):
        def make(folder):
            (folder / "config.json").write_text(name)
            if wait:
                first_writing.set()
                assert second_done.wait(10)
            (folder / "model.safetensors").write_text(name)

        return make

    def make_slowly():
        made["slow"] = make_folder(dest, maker("slow", True))

    slow = threading.Thread(target=make_slowly)
    slow.start()
    assert first_writing.wait(10)
    made["fast"] = make_folder(dest, maker("fast", False))
    second_done.set()
    slow.join(10)
    assert made == {"slow": dest, "fast": dest}
    assert {f.name: f.read_text() for f in dest.iterdir()} == {
        "config.json": "fast",
        "model.safetensors": "fast",
    }
    assert [p.name for p in dest.parent.iterdir()] == ["smollm2"]  # no partial left


def test_a_maker_that_fails_leaves_neither_the_folder_nor_a_partial(tmp_path):
    dest = tmp_path / "adapter"

    def make(folder):
        (folder / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        make_folder(dest, make)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_made_inside_the_partial_one_is_what_is_renamed(tmp_path):
    """MLflow downloads into a subfolder of the folder it is given."""

    def download(folder):
        (folder / "adapter").mkdir()
        (folder / "adapter" / "adapter_config.json").write_text("{}")
        return folder / "adapter"

    dest = make_folder(tmp_path / "faq" / "1", download)
    assert [p.name for p in dest.iterdir()] == ["adapter_config.json"]
    assert [p.name for p in dest.parent.iterdir()] == ["1"]


def test_a_file_is_replaced_whole(tmp_path):
    path = tmp_path / "cache" / "fingerprint.json"
    write_file(path, "first")
    write_file(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["fingerprint.json"]
    beside = tmp_path / "cache" / "in-place.json"
    beside.write_text("written in place")
    assert path.stat().st_mode == beside.stat().st_mode  # not the temporary file's 0600


def test_a_write_that_fails_leaves_the_file_before_and_nothing_else(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    write_file(path, "before")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_file(path, "after")
    assert path.read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
