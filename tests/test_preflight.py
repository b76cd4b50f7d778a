"""library/train/preflight.py: the folders a run reads, from the typed config (kohya's folder mode included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from library.errors import UserError
from library.train.cli import parse_args
from library.train.config import build_config
from library.train.preflight import check_output_outside_data, data_folders


def test_folder_mode_folders_are_the_typed_flags(tmp_path: Path) -> None:
    """Before, these were looked up in `cli_values`, which never held them: the list was empty and an
    --output_dir inside --train_data_dir passed the check."""
    imgs, reg = tmp_path / "imgs", tmp_path / "reg"
    argv = ["--train_data_dir", str(imgs), "--reg_data_dir", str(reg)]
    assert data_folders(build_config(parse_args(argv))) == [("--train_data_dir", imgs), ("--reg_data_dir", reg)]
    with pytest.raises(UserError, match=r"--output_dir .* is inside the image folder .*\(--train_data_dir\)"):
        check_output_outside_data(build_config(parse_args([*argv, "--output_dir", str(imgs / "out")])))
    check_output_outside_data(build_config(parse_args([*argv, "--output_dir", str(tmp_path / "out")])))
