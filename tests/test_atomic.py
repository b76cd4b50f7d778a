"""library/atomic.py: the output-folder check the entry points run before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from library.atomic import check_writable_folder
from library.errors import UserError


def test_writable_folder_check_creates_nothing_and_names_the_file_in_the_way(tmp_path: Path) -> None:
    check_writable_folder(tmp_path / "a" / "b", "x: --output_dir")  # a folder still to be made is fine
    assert list(tmp_path.iterdir()) == []  # and nothing was created
    (tmp_path / "f").write_text("user's file")
    for target in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(UserError, match=rf"^x: --output_dir is not a folder \({tmp_path / 'f'} is a file\)$"):
            check_writable_folder(target, "x: --output_dir")
    assert (tmp_path / "f").read_text() == "user's file"
