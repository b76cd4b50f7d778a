"""library/train/flags.py: every flag in the table is read by the trainer or listed as ineffective with a reason.

"Read" is judged from the source: outside flags.py the flag's value must be taken somewhere, as an attribute
of a config dataclass (`cfg.save.save_n_epoch_ratio`), as a string key of the parsed values (`v["seed"]`,
`cli.get("train_data_dir")`, a key of an alias table), or, for dataset flags, through the dataset schema key
it fills (`cli="train_batch_size"` -> the key `batch_size` read as `.batch_size`). A flag that is parsed and
then never looked at (as `--save_n_epoch_ratio` once was) is reported.
"""

from __future__ import annotations

import ast
from pathlib import Path

from library.data import schema
from library.train.flags import FLAGS, INEFFECTIVE, Flag

REPO = Path(__file__).resolve().parents[1]
PREFIX_FAMILIES = ("metadata_", "degradation_")  # gathered by prefix: metadata_* into SaveConfig.metadata (config.py),
# degradation_* into one DegradationConfig (library/data/degrade.py, CLI_PREFIX)


def _reads() -> tuple[set[str], set[str], set[str]]:
    """(attribute names, string keys, prefixes passed to startswith) used outside flags.py."""
    attrs, keys, prefixes = set(), set(), set()
    files = [*REPO.glob("library/**/*.py"), *REPO.glob("networks/**/*.py"), *REPO.glob("*.py")]
    for path in files:
        if path.name == "flags.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):
                attrs.add(node.attr)
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                    and any(isinstance(t, ast.Name) and t.id.endswith("_PREFIX") for t in node.targets):
                prefixes.add(node.value.value)  # X_PREFIX = "degradation_", used as k.startswith(X_PREFIX)
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                keys.add(node.slice.value)
            elif isinstance(node, ast.Dict):
                keys.update(k.value for k in node.keys if isinstance(k, ast.Constant))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                if node.func.attr in ("get", "pop"):
                    keys.add(node.args[0].value)
                elif node.func.attr == "startswith":
                    prefixes.add(node.args[0].value)
    return attrs, keys, prefixes


def unread_flags(flags: list[Flag]) -> list[str]:
    attrs, keys, prefixes = _reads()
    by_cli = {k.cli: k.name for k in schema.KEYS if k.cli}
    out = []
    for f in flags:
        name = f.name
        if name in INEFFECTIVE or name in attrs or name in keys:
            continue
        if name in by_cli and by_cli[name] in attrs:  # a dataset flag: the schema key it fills is read
            continue
        if any(name.startswith(p) and p in prefixes for p in PREFIX_FAMILIES):
            continue
        out.append(name)
    return out


def test_every_flag_is_read_or_listed_as_ineffective() -> None:
    assert unread_flags(FLAGS) == []


def test_an_unread_flag_is_reported() -> None:  # the negative control
    ghost = Flag("ghost_flag_nobody_reads", "int")
    assert unread_flags([*FLAGS, ghost]) == ["ghost_flag_nobody_reads"]


def test_ineffective_flags_are_real_flags_with_reasons_and_are_not_read() -> None:
    names = {f.name for f in FLAGS}
    attrs, keys, _ = _reads()
    for name, why in INEFFECTIVE.items():
        assert name in names, name
        assert len(why) > 10, name
        assert name not in attrs, f"--{name} is listed as ineffective but the code reads it"
