"""CLIP-L and T5-XXL text encoders of FLUX.1 through `transformers`, loaded strictly from the files users have.

Design note: the encoders are `transformers.CLIPTextModel` / `T5EncoderModel`, built on the meta device
from sizes read off the tensor shapes (so the real 123M / 4.7B encoders and the tiny test ones share one
path), then filled with `load_state_dict(strict=True, assign=True)` from tensors streamed out of the mmap'd
safetensors file(s) one at a time, cast to the compute dtype on the way (fp8-stored files are upcast).
Accepted layouts: ComfyUI single files (`clip_l.safetensors`: `text_model.…` [+ `text_projection.weight`];
`t5xxl_fp16.safetensors` / `t5xxl_fp8_e4m3fn.safetensors` / `…_scaled.safetensors` with per-tensor scales:
`shared.weight` + `encoder.…`), the same keys
under one prefix inside an all-in-one checkpoint (only that part is read and checked), and diffusers
folders (a pipeline folder, or its `text_encoder/` / `text_encoder_2/`). Tokenizers come only from the files
shipped in `library/flux/tokenizers/`; nothing is fetched from a hub.

Prompt encoding follows diffusers' FluxPipeline and kohya: CLIP gets 77 tokens padded to max length and
gives its pooled output (final-layer-normed state at the first end-of-text token); T5 gets `t5_max_length`
tokens (512 dev, 256 schnell) padded to max length and gives its last hidden state, with the padding mask
applied inside T5 only under kohya's `--apply_t5_attn_mask`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPTokenizer
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from library.errors import UserError
from library.flux.safetensors_io import Checkpoint, first_keys, open_checkpoint, shard_files

CLIP_HEAD_DIM = 64  # CLIP text transformers use 64-wide heads (CLIP-L: 768 = 12 x 64)
CLIP_MAX_LENGTH = 77  # CLIP's context length; FLUX pools over exactly these tokens
T5_MAX_LENGTH_DEV = 512
T5_MAX_LENGTH_SCHNELL = 256
T5_MAX_DISTANCE = 128  # T5 v1.1 relative_attention_max_distance (not visible in any tensor shape)
_CLIP_PREFIX = "text_model."
_CLIP_OPTIONAL = ("text_projection.weight", "text_model.embeddings.position_ids", "logit_scale")
_T5_IGNORED = re.compile(r"^(decoder\.|lm_head\.)")  # a full encoder-decoder T5 file: only the encoder is used


@dataclass(frozen=True)
class ClipSizes:
    vocab: int
    width: int
    layers: int
    intermediate: int
    positions: int
    projection: int

    @property
    def heads(self) -> int:
        return self.width // CLIP_HEAD_DIM


@dataclass(frozen=True)
class T5Sizes:
    vocab: int
    d_model: int
    layers: int
    heads: int
    d_kv: int
    d_ff: int
    num_buckets: int


@dataclass
class TextEncoding:
    """Prompt conditioning for FLUX: T5 states [B, S, D_t5], CLIP pooled [B, D_clip], T5 padding mask [B, S]."""

    t5_out: torch.Tensor
    clip_pooled: torch.Tensor
    t5_attn_mask: torch.Tensor


def tokenizer_dir(name: str) -> Path:
    """Folder of a shipped tokenizer: "clip_l" or "t5_v1_1_xxl"."""
    return Path(__file__).parent / "tokenizers" / name


def clip_config(sizes: ClipSizes) -> CLIPTextConfig:
    # bos/eos/pad ids as in openai/clip-vit-large-patch14's config: eos_token_id=2 selects transformers'
    # legacy pooling (argmax of the ids = first <|endoftext|>), the same token FluxPipeline pools.
    return CLIPTextConfig(
        vocab_size=sizes.vocab, hidden_size=sizes.width, intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, max_position_embeddings=sizes.positions,
        projection_dim=sizes.projection, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1, architectures=["CLIPTextModel"],
    )


def t5_config(sizes: T5Sizes) -> T5Config:
    return T5Config(
        vocab_size=sizes.vocab, d_model=sizes.d_model, d_kv=sizes.d_kv, d_ff=sizes.d_ff, num_layers=sizes.layers,
        num_heads=sizes.heads, relative_attention_num_buckets=sizes.num_buckets,
        relative_attention_max_distance=T5_MAX_DISTANCE, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
        tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False, architectures=["T5EncoderModel"],
    )


# ---------------------------------------------------------------- locating files


def _resolve_files(path: Path, subfolder: str, flag: str) -> list[Path]:
    """A single .safetensors file, or the (sharded) `model.safetensors` of a diffusers component folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder (given as {flag})")
    if path.is_file():
        return [path]
    folder = path / subfolder if (path / subfolder).is_dir() else path
    files = shard_files(folder, "model")
    if files is None:
        raise UserError(f"{path}: no {subfolder}/model.safetensors (or sharded index) in this folder "
                        f"(given as {flag}); pass the .safetensors file or a diffusers FLUX folder")
    return files


def _layout_hint(keys: list[str], flag: str) -> str:
    """Name what a wrong file looks like, so the user sees at once which flag got which file."""
    k = set(keys)
    guesses = [
        ("shared.weight" in k or any(x.startswith("encoder.block.") for x in k), "T5", "--t5xxl"),
        (any(x.startswith(_CLIP_PREFIX) for x in k), "CLIP-L", "--clip_l"),
        (any(".double_blocks." in x or x.startswith(("double_blocks.", "transformer_blocks.")) for x in k),
         "FLUX transformer", "--ckpt_path"),
        (any(x.startswith(("decoder.conv_in", "encoder.conv_in")) for x in k), "FLUX autoencoder", "--ae"),
    ]
    for matched, what, right_flag in guesses:
        if matched and right_flag != flag:
            return f"; this looks like a {what} file passed as {flag} (it belongs to {right_flag})"
    return ""


def _count(ckpt: Checkpoint | _Prefixed, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in ckpt.keys() if (m := rx.match(k))})


def _need(ckpt: Checkpoint | _Prefixed, key: str, flag: str) -> tuple[int, ...]:
    if key not in ckpt:
        raise UserError(f"{ckpt.name}: missing key {key!r}; not a {'CLIP-L' if flag == '--clip_l' else 'T5'} "
                        f"text encoder{_layout_hint(ckpt.keys(), flag)}")
    return ckpt.shapes[key]


class _Prefixed:
    """The tensors of `ckpt` under `prefix`, with the prefix removed: an encoder inside an all-in-one file
    (ComfyUI's `text_encoders.clip_l.transformer.…`, `text_encoders.t5xxl.transformer.…`)."""

    def __init__(self, ckpt: Checkpoint, prefix: str):
        self._ckpt, self._prefix, self.name = ckpt, prefix, ckpt.name
        self.shapes = {k[len(prefix):]: v for k, v in ckpt.shapes.items() if k.startswith(prefix)}

    def keys(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def get(self, key: str) -> torch.Tensor:
        return self._ckpt.get(self._prefix + key)


def _encoder_view(ckpt: Checkpoint, marker: str, flag: str, what: str) -> Checkpoint | _Prefixed:
    """`ckpt` itself when `marker` is a key, else the prefixed part holding it; UserError when absent."""
    if marker in ckpt:
        return ckpt
    prefixes = sorted({k[: -len(marker)] for k in ckpt.keys() if k.endswith("." + marker)})
    if len(prefixes) != 1:
        raise UserError(f"{ckpt.name}: no {marker} key, not a {what}{_layout_hint(ckpt.keys(), flag)}")
    return _Prefixed(ckpt, prefixes[0])


def _fp8_scales(ckpt: Checkpoint | _Prefixed) -> tuple[dict[str, str], set[str]]:
    """ComfyUI "scaled fp8" files (t5xxl_fp8_e4m3fn_scaled.safetensors) store W / s in fp8 plus the scale s as
    `X.scale_weight` (newer files: `X.weight_scale`); dequantised W = w * s. Returns {weight key: scale key}
    and every key of that scheme (scales, input scales, the `scaled_fp8` marker) for the strict check."""
    scales, extra = {}, {k for k in ckpt.keys() if k == "scaled_fp8" or k.endswith((".scale_input", ".input_scale"))}
    for key in ckpt.keys():
        for suffix in (".scale_weight", ".weight_scale"):
            if key.endswith(suffix):
                scales[key[: -len(suffix)] + ".weight"] = key
                extra.add(key)
    return scales, extra


# ---------------------------------------------------------------- sizes from shapes


def clip_sizes(ckpt: Checkpoint | _Prefixed) -> ClipSizes:
    flag = "--clip_l"
    vocab, width = _need(ckpt, "text_model.embeddings.token_embedding.weight", flag)
    positions = _need(ckpt, "text_model.embeddings.position_embedding.weight", flag)[0]
    layers = _count(ckpt, r"^text_model\.encoder\.layers\.(\d+)\.")
    intermediate = _need(ckpt, "text_model.encoder.layers.0.mlp.fc1.weight", flag)[0]
    proj = ckpt.shapes.get("text_projection.weight", (width,))[0]
    if width % CLIP_HEAD_DIM:
        raise UserError(f"{ckpt.name}: CLIP width {width} is not a multiple of the head width {CLIP_HEAD_DIM}")
    return ClipSizes(vocab, width, layers, intermediate, positions, proj)


def t5_sizes(ckpt: Checkpoint | _Prefixed) -> T5Sizes:
    flag = "--t5xxl"
    emb = "shared.weight" if "shared.weight" in ckpt else "encoder.embed_tokens.weight"
    vocab, d_model = _need(ckpt, emb, flag)
    blk = "encoder.block.0.layer."
    buckets, heads = _need(ckpt, blk + "0.SelfAttention.relative_attention_bias.weight", flag)
    inner = _need(ckpt, blk + "0.SelfAttention.q.weight", flag)[0]
    if blk + "1.DenseReluDense.wi.weight" in ckpt:
        raise UserError(f"{ckpt.name}: a T5 v1.0 (ReLU) encoder; FLUX needs the T5 v1.1 gated-GELU encoder "
                        "(t5xxl_fp16.safetensors)")
    d_ff = _need(ckpt, blk + "1.DenseReluDense.wi_0.weight", flag)[0]
    if inner % heads:
        raise UserError(f"{ckpt.name}: attention width {inner} is not a multiple of {heads} heads")
    layers = _count(ckpt, r"^encoder\.block\.(\d+)\.")
    return T5Sizes(vocab, d_model, layers, heads, inner // heads, d_ff, buckets)


# ---------------------------------------------------------------- strict streaming load


def _stream_into(model: torch.nn.Module, ckpt: Checkpoint | _Prefixed, file_key: dict[str, str], flag: str,
                 device: torch.device, dtype: torch.dtype, fp32_keys: frozenset[str] = frozenset(),
                 scales: dict[str, str] | None = None) -> None:
    """Fill a meta-device `model` from `ckpt`; `file_key` maps each module key to its checkpoint key.

    Every checkpoint key must be used (or be in the layout's optional set, removed beforehand by the
    caller) and every shape must match; tensors are cast to `dtype` one at a time (fp8 files upcast).
    """
    expected = model.state_dict()
    missing = {fk for mk, fk in file_key.items() if fk not in ckpt}
    if missing:
        raise UserError(f"{ckpt.name}: missing key(s) {first_keys(missing)}{_layout_hint(ckpt.keys(), flag)}")
    wrong = [f"{fk} {tuple(ckpt.shapes[fk])} (expected {tuple(expected[mk].shape)})"
             for mk, fk in file_key.items() if tuple(ckpt.shapes[fk]) != tuple(expected[mk].shape)]
    if wrong:
        raise UserError(f"{ckpt.name}: wrong shape for {first_keys(wrong, 2)}")
    if device.type == "meta":  # header-only check (as loading.load_transformer): keys and shapes, no tensor read
        return
    state = {}
    for mk, fk in file_key.items():
        tensor = ckpt.get(fk)
        if not tensor.is_floating_point():
            raise UserError(f"{ckpt.name}: tensor {fk!r} has dtype {tensor.dtype}, expected floating point")
        if scales and fk in scales:  # scaled fp8: per-tensor (or per-output-row) scale
            scale = ckpt.get(scales[fk]).float()
            tensor = tensor.float() * (scale.reshape(-1, 1) if scale.numel() == tensor.shape[0] > 1 else scale)
        state[mk] = tensor.to(device=device, dtype=torch.float32 if mk in fp32_keys else dtype)
    model.load_state_dict(state, strict=True, assign=True)


def _check_unexpected(ckpt: Checkpoint | _Prefixed, used: set[str], ignored: set[str], flag: str) -> None:
    unexpected = set(ckpt.keys()) - used - ignored
    if unexpected:
        raise UserError(f"{ckpt.name}: unexpected key(s) {first_keys(unexpected)}{_layout_hint(ckpt.keys(), flag)}")


def load_clip_l(path: str | Path, device: torch.device | str, dtype: torch.dtype) -> CLIPTextModel:
    """CLIP-L text model from a ComfyUI-style file (fp16/fp32/fp8) or a diffusers folder, in eval mode.
    `device="meta"` checks every key and shape from the header(s) only and returns the unloaded model."""
    flag, device = "--clip_l", torch.device(device)
    with open_checkpoint(_resolve_files(Path(path), "text_encoder", flag)) as whole:
        ckpt = _encoder_view(whole, "text_model.embeddings.token_embedding.weight", flag, "CLIP-L text encoder")
        sizes = clip_sizes(ckpt)
        with torch.device("meta"):
            model = CLIPTextModel(clip_config(sizes))
        # transformers 5 names the CLIPTextModel's tensors without the files' `text_model.` prefix
        file_key = {mk: mk if mk.startswith(_CLIP_PREFIX) else _CLIP_PREFIX + mk for mk in model.state_dict()}
        scales, scale_keys = _fp8_scales(ckpt)
        _check_unexpected(ckpt, set(file_key.values()), set(_CLIP_OPTIONAL) | scale_keys, flag)
        _stream_into(model, ckpt, file_key, flag, device, dtype, scales=scales)
    # position_ids is a non-persistent buffer (not in any file), so it is still on the meta device.
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            assert leaf == "position_ids", name
            model.get_submodule(owner).register_buffer(leaf, torch.arange(sizes.positions, device=device)[None],
                                                       persistent=False)
    return model.eval().requires_grad_(False)


def load_t5xxl(path: str | Path, device: torch.device | str, dtype: torch.dtype) -> T5EncoderModel:
    """T5 v1.1 encoder from a ComfyUI-style file (fp16/bf16/fp32/fp8) or a diffusers folder, in eval mode.
    `device="meta"` checks every key and shape from the header(s) only and returns the unloaded model."""
    flag, device = "--t5xxl", torch.device(device)
    with open_checkpoint(_resolve_files(Path(path), "text_encoder_2", flag)) as whole:
        ckpt = _encoder_view(whole, "encoder.block.0.layer.0.SelfAttention.q.weight", flag, "T5 encoder")
        sizes = t5_sizes(ckpt)
        with torch.device("meta"):
            model = T5EncoderModel(t5_config(sizes))
        # The token embedding is tied: files hold `shared.weight`, `encoder.embed_tokens.weight` or both.
        emb = "shared.weight" if "shared.weight" in ckpt else "encoder.embed_tokens.weight"
        tied = {"shared.weight", "encoder.embed_tokens.weight"}
        file_key = {mk: (emb if mk in tied else mk) for mk in model.state_dict()}
        scales, scale_keys = _fp8_scales(ckpt)
        ignored = {k for k in ckpt.keys() if _T5_IGNORED.match(k)} | (tied & set(ckpt.keys())) | scale_keys
        _check_unexpected(ckpt, set(file_key.values()), ignored, flag)
        # As transformers does in fp16: T5's feed-forward output projections overflow fp16, keep them fp32.
        fp32 = frozenset(k for k in file_key if k.endswith(".wo.weight")) if dtype == torch.float16 else frozenset()
        _stream_into(model, ckpt, file_key, flag, device, dtype, fp32, scales)
    model.encoder.embed_tokens = model.shared  # keep the tie after `assign=True` replaced the parameters
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------- tokenizers and prompt encoding


def load_tokenizers() -> tuple:
    """(CLIP tokenizer, T5 tokenizer) from the shipped files; never touches the network."""
    clip = CLIPTokenizer.from_pretrained(str(tokenizer_dir("clip_l")), local_files_only=True)
    t5 = AutoTokenizer.from_pretrained(str(tokenizer_dir("t5_v1_1_xxl")), local_files_only=True)
    return clip, t5


def default_t5_max_length(guidance_embed: bool) -> int:
    """kohya / diffusers: 512 T5 tokens for FLUX.1-dev (guidance-distilled), 256 for schnell."""
    return T5_MAX_LENGTH_DEV if guidance_embed else T5_MAX_LENGTH_SCHNELL


class FluxTextEncoders:
    """CLIP-L + T5 with their tokenizers; `encode` turns prompts into FLUX conditioning."""

    def __init__(self, clip: CLIPTextModel, t5: T5EncoderModel, tokenizers=None):
        self.clip, self.t5 = clip, t5
        self.clip_tokenizer, self.t5_tokenizer = tokenizers or load_tokenizers()

    @classmethod
    def load(cls, clip_path: str | Path, t5_path: str | Path, device: torch.device | str,
             dtype: torch.dtype) -> "FluxTextEncoders":
        return cls(load_clip_l(clip_path, device, dtype), load_t5xxl(t5_path, device, dtype))

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def tokenize(self, prompts: list[str], t5_max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CLIP ids [B, 77], T5 ids [B, S], T5 mask [B, S]), both padded to their max length, truncated."""
        clip = self.clip_tokenizer(prompts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                                   return_tensors="pt")
        t5 = self.t5_tokenizer(prompts, padding="max_length", max_length=t5_max_length, truncation=True,
                               return_tensors="pt")
        return clip.input_ids, t5.input_ids, t5.attention_mask

    def encode_tokens(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor, t5_mask: torch.Tensor,
                      apply_t5_attn_mask: bool = False) -> TextEncoding:
        """Encode token ids; each model reads them on its own device (they may be placed apart)."""
        pooled = self.clip(clip_ids.to(self.device)).pooler_output
        t5_device = next(self.t5.parameters()).device
        mask = t5_mask.to(t5_device)
        t5_out = self.t5(t5_ids.to(t5_device), attention_mask=mask if apply_t5_attn_mask else None).last_hidden_state
        return TextEncoding(t5_out=t5_out, clip_pooled=pooled, t5_attn_mask=mask)

    def encode(self, prompts: str | list[str], t5_max_length: int, apply_t5_attn_mask: bool = False) -> TextEncoding:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.encode_tokens(*self.tokenize(prompts, t5_max_length), apply_t5_attn_mask=apply_t5_attn_mask)
