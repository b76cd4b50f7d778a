"""`--pair_mode average`: one differential LoRA per pair subset, averaged into the result.

A differential LoRA trained on few pairs also learns whatever those pairs share besides the edit; DiffSynth
advises training on several (before, after) groups and averaging. Here each `[[datasets.subsets]]` with a
`before_dir` is one group: group j trains both stages on its own pairs (plus the dataset's regularisation
subsets) as `<X>_g<j>_stage1.safetensors` / `<X>_g<j>.safetensors`, and the result `<X>.safetensors` is
(1/K)·Σ_j L_j, exactly (ranks concatenated; networks/lora_algebra.py). Each group resumes like a single run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import toml

from library.atomic import write_text_atomic
from library.data.config import load_dataset_config, read_document
from library.differential.run import Trainer, run_differential
from library.differential.stages import DifferentialOptions, check_command, result_name
from library.errors import UserError
from library.train.checkpoint import file_sha256
from library.train.cli import ParsedArgs
from networks import lora_algebra as A
from networks.lora_flux import save_lora
from networks.lora_metadata import NETWORK_MODULE, modelspec

log = logging.getLogger(__name__)


def group_configs(parsed: ParsedArgs, out_dir: Path) -> list[Path]:
    """One dataset TOML per pair subset (absolute paths), written under out_dir."""
    path = Path(parsed.values["dataset_config"])
    resolved = load_dataset_config(path)
    doc = read_document(path)
    groups: list[tuple[int, int]] = [(i, j) for i, ds in enumerate(resolved.datasets)
                                     for j, s in enumerate(ds.subsets) if s.before_dir is not None]
    if len(groups) < 2:
        raise UserError(f"{path}: --pair_mode average needs at least two subsets with before_dir (one per group); "
                        f"found {len(groups)}")
    out = []
    for k, (i, j) in enumerate(groups):
        ds_doc = dict(doc["datasets"][i])
        raw_subs = ds_doc.pop("subsets")
        subs = []
        for jj, (raw, sub) in enumerate(zip(raw_subs, resolved.datasets[i].subsets)):
            if jj == j or sub.is_reg:
                subs.append({**raw, **{key: str(Path(getattr(sub, key)).resolve())
                                       for key in ("image_dir", "before_dir") if getattr(sub, key) is not None}})
        group_doc: dict[str, Any] = {"general": doc.get("general", {}), "datasets": [{**ds_doc, "subsets": subs}]}
        target = out_dir / f"{result_name(parsed)}_g{k}_data.toml"
        write_text_atomic(target, toml.dumps(group_doc))
        out.append(target)
    return out


def run_average(parsed: ParsedArgs, opts: DifferentialOptions, train: Trainer) -> Path:
    check_command(parsed)
    out_dir, name = Path(parsed.values["output_dir"] or "output"), result_name(parsed)
    result, record = out_dir / f"{name}.safetensors", out_dir / f"{name}_average.json"
    if result.exists() and not record.is_file():
        raise UserError(f"{result}: already exists and is not from this run; choose another --output_name or "
                        "--output_dir")
    single = dataclasses.replace(opts, pair_mode="single")
    loras = []
    for k, cfg in enumerate(group_configs(parsed, out_dir)):
        group = ParsedArgs(values={**parsed.values, "dataset_config": str(cfg), "output_name": f"{name}_g{k}"},
                           given=parsed.given | {"dataset_config", "output_name"})
        loras.append(run_differential(group, single, train))
    digests = [file_sha256(p) for p in loras]
    if record.is_file() and result.is_file() and json.loads(record.read_text())["groups"] == digests:
        return result
    combined = A.concat(A.read_terms([(p, 1.0 / len(loras)) for p in loras]))
    rank = max(w.rank for w in combined.weights.values())
    md = {"ss_network_module": NETWORK_MODULE, "ss_base_model_version": "flux1", "ss_network_dim": str(rank),
          "ss_network_alpha": str(rank), **modelspec(name, extra={"differential_average_of": json.dumps(
              [p.name for p in loras]), "differential_average_sha256": json.dumps(digests)})}
    save_lora(combined.weights, result, None, md)
    write_text_atomic(record, json.dumps({"groups": digests}, indent=1))
    log.info("averaged %d group LoRAs -> %s", len(loras), result)
    return result
