"""kohya's folder mode (no --dataset_config): --train_data_dir / --reg_data_dir with `<repeats>_<class tokens>`
sub-folders, written out as the equivalent dataset TOML so the dataset layer sees one format only.

    train_data_dir/10_sks dog/*.jpg   ->  [[datasets.subsets]] image_dir, num_repeats = 10, class_tokens
    reg_data_dir/1_dog/*.jpg          ->  the same with is_reg = true

Folders whose name does not start with an integer and "_" are skipped with a warning, as kohya does.
The generated file is saved beside the outputs, so the run can be repeated with --dataset_config.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from library.atomic import write_text_atomic
from library.errors import UserError
from library.train.reporting import warn

_FOLDER = re.compile(r"^(\d+)_(.*)$")


def _subsets(root: str, is_reg: bool, flag: str) -> list[str]:
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"{base}: --{flag} is not a folder")
    out = []
    for sub in sorted(p for p in base.iterdir() if p.is_dir()):
        m = _FOLDER.match(sub.name)
        if not m:
            warn(f"{sub}: skipped: the folder name must be <repeats>_<class tokens> (kohya's folder mode)")
            continue
        lines = ["[[datasets.subsets]]", f"image_dir = {json.dumps(str(sub.resolve()))}",
                 f"num_repeats = {int(m.group(1))}"]
        if m.group(2).strip():
            lines.append(f"class_tokens = {json.dumps(m.group(2).strip())}")
        if is_reg:
            lines.append("is_reg = true")
        out.append("\n".join(lines))
    if not out:
        raise UserError(f"{base}: --{flag}: no <repeats>_<class tokens> sub-folders found")
    return out


def write_folder_mode_config(train_data_dir: str, reg_data_dir: str | None, out_file: Path) -> Path:
    """The dataset TOML of kohya's folder mode; dataset-level values come from the CLI flags."""
    parts = ["# generated from --train_data_dir / --reg_data_dir (kohya's folder mode)", "[[datasets]]"]
    parts += _subsets(train_data_dir, False, "train_data_dir")
    if reg_data_dir:
        parts += _subsets(reg_data_dir, True, "reg_data_dir")
    return write_text_atomic(out_file, "\n\n".join(parts) + "\n")
