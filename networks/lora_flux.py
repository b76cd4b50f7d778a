"""kohya-compatible LoRA network for FLUX.1: targets, `--network_args`, optimizer groups, save/load, merge.

Targets, as kohya's `networks/lora_flux.py`: every Linear of the double and single blocks (304 modules on
FLUX.1-dev), the embedders with `in_dims`, CLIP-L's attention/MLP Linears (`lora_te1_`) when a CLIP-L is
given, and T5's (`lora_te3_`) with `train_t5xxl`. The final layer is never targeted. The file is kohya's
format (see `networks.lora_formats`); split_qkv modules are saved fused with alpha × n, so every loader
applies the trained update. Entry points for the trainer and inference:

    network = create_network(1.0, 16, 16, transformer, clip_l, None, neuron_dropout=None, **network_args)
    names = network.apply_to(text_encoder=False)   # wraps the Linears in LoRAModule; returns the kohya names
    groups = network.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
    network.save_weights(path, torch.bfloat16, metadata)
    apply_lora_weights(transformer, clip_l, [(path, 0.8)], merge=True)
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn
import torch

from library.atomic import atomic_target
from library.errors import UserError
from library.flux.safetensors_io import save_file_atomic
from networks import lora_keys as K
from networks.lora_args import NetworkArgs, parse_network_args, transformer_rank
from networks.lora_formats import LoRAWeight, ParsedLoRA, parse_lora, read_lora, to_kohya
from networks.lora_metadata import safetensors_hashes
from networks.lora_modules import LoRAAdapter, LoRAModule, add_to_weight

log = logging.getLogger(__name__)


@dataclass
class Target:
    lora_name: str
    component: str  # "transformer" | "te1" | "te3"
    root: nn.Module
    path: str  # module path inside root

    @property
    def module(self) -> nn.Module:
        return self.root.get_submodule(self.path)


def find_targets(transformer: nn.Module | None, clip_l: nn.Module | None, t5: nn.Module | None) -> dict[str, Target]:
    """Every Linear a FLUX LoRA can address, by kohya name (blocks, embedders, final layer, CLIP-L, T5)."""
    out: dict[str, Target] = {}
    for comp, root in (("transformer", transformer), ("te1", clip_l), ("te3", t5)):
        if root is None:
            continue
        skip = ()
        for path, m in root.named_modules():
            if path.startswith(skip):
                continue
            if isinstance(m, LoRAModule):
                skip = (path + ".",)  # stacked LoRAs: the wrapper is the target, not its inner Linear
            elif not isinstance(m, nn.Linear):
                continue
            # transformers 5's CLIPTextModel has no `text_model.` level; kohya's names do
            name = K.kohya_name(comp, "text_model." + path if comp == "te1" and not path.startswith("text_model.")
                                else path)
            # final_layer is addressable (files in the wild have it); create_network never selects it
            if K.split_kohya_name(name) is not None:
                out[name] = Target(name, comp, root, path)
    return out


def _split_dims(path: str, out_f: int, in_f: int) -> list[int] | None:
    if path.endswith(".qkv"):
        return [out_f // 3] * 3
    if path.endswith(".linear1"):
        return [in_f, in_f, in_f, out_f - 3 * in_f]
    return None


class LoRANetwork(nn.Module):
    """The LoRA adapters of one network, registered under their kohya names."""

    def __init__(self, targets: list[Target], ranks: dict[str, int], alphas: dict[str, float | None],
                 multiplier: float, args: NetworkArgs, dropout: float | None = None):
        super().__init__()
        self.args = args
        self.multiplier = multiplier
        self._targets: dict[str, Target] = {}  # a plain dict: the models are not part of the network
        for t in targets:
            lin = t.module
            split = _split_dims(t.path, lin.out_features, lin.in_features) if args.split_qkv else None
            with torch.device(lin.weight.device):  # created where the layer lives (GPU, or meta)
                adapter = LoRAAdapter(t.lora_name, lin.in_features, lin.out_features, ranks[t.lora_name],
                                      alphas[t.lora_name], split, dropout, args.rank_dropout, args.module_dropout)
            adapter.multiplier = multiplier
            self.add_module(t.lora_name, adapter)
            self._targets[t.lora_name] = t
            if args.verbose:
                log.info("%s: rank %d alpha %g%s", t.lora_name, adapter.rank, float(adapter.alpha),
                         f" split {split}" if split else "")

    def adapters(self, component: str | None = None) -> list[LoRAAdapter]:
        return [m for n, m in self.named_children()
                if isinstance(m, LoRAAdapter) and (component is None or self._targets[n].component == component)]

    # -- applying ------------------------------------------------------------------------------------------
    def apply_to(self, *, text_encoder: bool = True, transformer: bool = True) -> list[str]:
        """Wrap each target Linear in a `LoRAModule`; returns the kohya names replaced (the models were given
        to `create_network`). Adapters of the components not applied are dropped."""
        replaced = []
        for name, t in list(self._targets.items()):
            if not (transformer if t.component == "transformer" else text_encoder):
                delattr(self, name)
                del self._targets[name]
                continue
            current = t.module
            if isinstance(current, LoRAModule) and current.lora is getattr(self, name):
                continue
            parent_path, _, leaf = t.path.rpartition(".")
            parent = t.root.get_submodule(parent_path) if parent_path else t.root
            setattr(parent, leaf, LoRAModule(current, getattr(self, name)))
            replaced.append(name)
        return replaced

    def restore(self) -> None:
        """Put the original Linears back (after `unmerge` if merged)."""
        for name, t in self._targets.items():
            m = t.module
            if isinstance(m, LoRAModule) and m.lora is getattr(self, name):
                parent_path, _, leaf = t.path.rpartition(".")
                setattr(t.root.get_submodule(parent_path) if parent_path else t.root, leaf, m.base)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for a in self.adapters():
            a.multiplier = multiplier

    def set_enabled(self, enabled: bool) -> None:
        for a in self.adapters():
            a.enabled = enabled

    @torch.no_grad()
    def merge(self) -> None:
        """Add multiplier·ΔW into the base weights; the adapters then contribute nothing until unmerge."""
        for name, a in ((n, a) for n, a in self.named_children() if isinstance(a, LoRAAdapter)):
            if a.merged:
                continue
            lin = _linear(self._targets[name].module)
            # fp32 weights are restored by subtraction; lower precisions keep a copy for an exact unmerge
            a._backup = None if lin.weight.dtype == torch.float32 else lin.weight.detach().clone()
            add_to_weight(lin, a.delta_weight())
            a.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        for name, a in ((n, a) for n, a in self.named_children() if isinstance(a, LoRAAdapter)):
            if not a.merged:
                continue
            lin = _linear(self._targets[name].module)
            if a._backup is not None:
                lin.weight.data = a._backup
            else:
                add_to_weight(lin, -a.delta_weight())
            a._backup, a.merged = None, False

    # -- optimizer -----------------------------------------------------------------------------------------
    def prepare_optimizer_params(self, text_encoder_lr: float | list[float] | None, unet_lr: float | None,
                                 default_lr: float | None) -> list[dict]:
        """Param groups as kohya: per component (network_reg_lrs regex groups first) × (down, LoRA+ up).

        `text_encoder_lr`: one value for CLIP-L and T5, or [CLIP-L, T5]; None → default_lr. Groups whose lr
        is 0 are left out (those modules are not trained). Each group carries a `name` for logging.
        """
        te = text_encoder_lr if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        te = [default_lr if v is None else v for v in te] or [default_lr]
        a = self.args
        # (component, group name, lr, LoRA+ ratio); the group names are kohya's, logged as lr/<name>
        plan = [("transformer", "unet", default_lr if unet_lr is None else unet_lr,
                 a.loraplus_unet_lr_ratio or a.loraplus_lr_ratio),
                ("te1", "textencoder 1", te[0], a.loraplus_text_encoder_lr_ratio or a.loraplus_lr_ratio),
                ("te3", "textencoder 2", te[1] if len(te) > 1 else te[0],
                 a.loraplus_text_encoder_lr_ratio or a.loraplus_lr_ratio)]
        groups: list[dict] = []
        for comp, desc, lr, plus in plan:
            buckets: dict[int, list[LoRAAdapter]] = {}
            for ad in self.adapters(comp):
                idx = next((i for i, (p, _) in enumerate(a.reg_lrs) if re.search(p, ad.lora_name)), -1)
                buckets.setdefault(idx, []).append(ad)
            for idx in sorted(buckets, key=lambda i: (i < 0, i)):
                glr = a.reg_lrs[idx][1] if idx >= 0 else lr
                gdesc = f"reg_lr_{idx}" if idx >= 0 else desc
                downs = [p for ad in buckets[idx] for p in ad.lora_parameters()[0]]
                ups = [p for ad in buckets[idx] for p in ad.lora_parameters()[1]]
                if not glr:
                    continue
                if plus:
                    groups += [{"params": downs, "lr": glr, "name": gdesc},
                               {"params": ups, "lr": glr * plus, "name": f"{gdesc} plus"}]
                else:
                    groups.append({"params": downs + ups, "lr": glr, "name": gdesc})
        return [g for g in groups if g["params"]]

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float) -> tuple[int, float, float]:
        """--scale_weight_norms: scale each pair so ‖ΔW‖ ≤ max_norm. Returns (n scaled, mean, max norm)."""
        norms, scaled = [], 0
        for a in self.adapters():
            pairs = zip(a.lora_down, a.lora_up) if a.split_dims else [(a.lora_down, a.lora_up)]
            for d, u in pairs:
                n = float((u.weight.float() @ d.weight.float()).norm() * a.scale)
                if n > max_norm:
                    r = (max_norm / n) ** 0.5
                    d.weight.mul_(r)
                    u.weight.mul_(r)
                    scaled, n = scaled + 1, max_norm
                norms.append(n)
        return scaled, (sum(norms) / len(norms) if norms else 0.0), max(norms, default=0.0)

    # -- files ---------------------------------------------------------------------------------------------
    def lora_weights(self) -> dict[str, LoRAWeight]:
        return {a.lora_name: a.to_weight() for a in self.adapters()}

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None,
                     metadata: dict[str, str] | None) -> None:
        """kohya-format file, written atomically; sshs hashes added to the metadata (.safetensors)."""
        save_lora(self.lora_weights(), file, dtype, metadata)

    def load_weights(self, file: str | os.PathLike) -> dict[str, list[str]]:
        """Load any supported LoRA file into this network's modules; returns what did not match."""
        return self.load_parsed(read_lora(file), str(file))

    def load_parsed(self, parsed: ParsedLoRA, source: str = "LoRA") -> dict[str, list[str]]:
        mine = {a.lora_name: a for a in self.adapters()}
        for name, w in parsed.weights.items():
            if name in mine:
                try:
                    mine[name].load_weight(w)
                except ValueError as e:
                    raise UserError(f"{source}: {e}") from None
        info = {"missing": sorted(set(mine) - set(parsed.weights)),
                "unexpected": sorted(set(parsed.weights) - set(mine)), "unknown_keys": parsed.unknown}
        for what, names in info.items():
            if names:
                log.warning("%s: %d %s: %s", source, len(names), what.replace("_", " "), ", ".join(names[:8]))
        return info


def _linear(m: nn.Module) -> nn.Linear:
    return m.linear if isinstance(m, LoRAModule) else m


def save_lora(weights: dict[str, LoRAWeight], file: str | os.PathLike, dtype: torch.dtype | None,
              metadata: dict[str, str] | None) -> None:
    """Write kohya-format LoRA tensors atomically (.safetensors with metadata + hashes, or .pt/.ckpt)."""
    file = Path(file)
    sd = to_kohya(weights, dtype)
    outside = sorted(n for n in weights if K.split_kohya_name(n)[0] == "transformer"
                     and not K.is_block_module(K.split_kohya_name(n)[1]))
    if outside:
        log.warning("%s: %d modules outside the blocks (%s): diffusers drops them silently and InvokeAI refuses "
                    "the file; ComfyUI/Forge/kohya load them", file, len(outside), ", ".join(outside[:5]))
    if file.suffix == ".safetensors":
        md = {k: str(v) for k, v in (metadata or {}).items()}
        md.update(safetensors_hashes(sd, md))
        save_file_atomic(sd, file, md)
    else:
        with atomic_target(file) as tmp:
            torch.save(sd, tmp)


# -- factories (kohya's names) -----------------------------------------------------------------------------

def _n_blocks(transformer: nn.Module) -> tuple[int, int]:
    return len(getattr(transformer, "double_blocks", [])), len(getattr(transformer, "single_blocks", []))


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None,
                   transformer: nn.Module, clip_l: nn.Module | None = None, t5: nn.Module | None = None,
                   neuron_dropout: float | None = None, **network_args) -> LoRANetwork:
    """A new LoRA network (not yet applied: call `apply_to`). clip_l None = --network_train_unet_only."""
    dim = 4 if network_dim is None else int(network_dim)
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    args = parse_network_args(network_args, *_n_blocks(transformer))
    targets = find_targets(transformer, clip_l, t5 if args.train_t5xxl else None)
    ranks: dict[str, int] = {}
    for name, t in targets.items():
        if t.component == "transformer":
            ranks[name] = transformer_rank(args, name, t.path, dim)
        else:
            ranks[name] = next((int(d) for p, d in args.reg_dims if re.search(p, name)), dim)
    chosen = [t for n, t in targets.items() if ranks[n] > 0]
    if not chosen:
        raise UserError("--network_args: no module selected for LoRA (check train_blocks / *_block_indices / dims)")
    return LoRANetwork(chosen, ranks, {n: alpha for n in ranks}, multiplier, args, neuron_dropout)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, transformer: nn.Module,
                                clip_l: nn.Module | None = None, t5: nn.Module | None = None,
                                weights_sd: dict[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **network_args) -> LoRANetwork:
    """A network shaped like a LoRA file (any supported format): ranks and alphas from the file
    (--dim_from_weights, --network_weights, inference). Modules the models lack are reported."""
    parsed = parse_lora(weights_sd) if weights_sd is not None else read_lora(file)
    args = parse_network_args(network_args, *_n_blocks(transformer))
    targets = find_targets(transformer, clip_l, t5)
    chosen, ranks, alphas = [], {}, {}
    for name, w in parsed.weights.items():
        if name not in targets:
            continue
        path = targets[name].path
        n_parts = (3 if path.endswith('.qkv') else 4 if path.endswith('.linear1') else 1) if args.split_qkv else 1
        if n_parts > 1 and w.rank % n_parts:
            raise UserError(f"{file}: {name}: rank {w.rank} cannot be split into {n_parts} parts (split_qkv)")
        ranks[name] = w.rank // n_parts
        alphas[name] = w.scale * ranks[name]
        chosen.append(targets[name])
    if not chosen:
        raise UserError(f"{file}: none of the LoRA's {len(parsed.weights)} modules exists in the given models")
    network = LoRANetwork(chosen, ranks, alphas, multiplier, args)
    network.load_parsed(parsed, str(file or "weights"))
    if for_inference:
        network.eval()
    return network


# -- inference / --base_weights ----------------------------------------------------------------------------

@torch.no_grad()
def merge_lora_into_models(transformer: nn.Module | None, clip_l: nn.Module | None, t5: nn.Module | None,
                           files_and_multipliers: list[tuple[Path, float]]) -> None:
    """W += multiplier·ΔW for every module of every file (fp32 math). Unmatched modules are reported."""
    targets = find_targets(transformer, clip_l, t5)
    for path, mult in files_and_multipliers:
        parsed = read_lora(path)
        missing = sorted(set(parsed.weights) - set(targets))
        if missing or parsed.unknown:
            log.warning("%s: not applied: %d modules absent from the models (%s), %d unknown keys (%s)", path,
                        len(missing), ", ".join(missing[:5]), len(parsed.unknown), ", ".join(parsed.unknown[:5]))
        for name, w in parsed.weights.items():
            if name in targets:
                lin = _linear(targets[name].module)
                if tuple(lin.weight.shape) != (w.up.shape[0], w.down.shape[1]):
                    raise UserError(f"{path}: {name}: LoRA shape {[w.up.shape[0], w.down.shape[1]]} does not "
                                    f"match the model's {list(lin.weight.shape)}")
                dev = lin.weight.device  # the product on the weight's device (GPU for real models)
                add_to_weight(lin, LoRAWeight(w.down.to(dev), w.up.to(dev), w.alpha).delta() * mult)


def apply_lora_weights(transformer: nn.Module, clip_l: nn.Module | None,
                       files_and_multipliers: list[tuple[Path, float]], merge: bool,
                       t5: nn.Module | None = None) -> None:
    """Apply LoRA files (any supported format) to the models: merged into the weights, or on the fly as
    `LoRAModule`s (stacked when several files touch the same layer). `t5` receives lora_te3_ modules
    (LoRAs trained with train_t5xxl); without it they are reported as absent."""
    if merge:
        merge_lora_into_models(transformer, clip_l, t5, files_and_multipliers)
        return
    for path, mult in files_and_multipliers:
        network = create_network_from_weights(mult, path, transformer, clip_l, t5, for_inference=True)
        network.apply_to()
