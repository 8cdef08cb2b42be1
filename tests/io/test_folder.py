import os
from pathlib import Path

import pytest

from lowbit.io.folder import write_text_atomic

def test_write_text_atomic_gives_the_mode_open_would(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a" / "r.json", "{}")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "r.json").read_text() == "{}"
    assert (tmp_path / "a" / "r.json").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o640

def test_write_text_atomic_leaves_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("old")

    with pytest.raises(TypeError):
        write_text_atomic(path, 3)  # type: ignore[arg-type]  # not text: nothing replaces the file
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
