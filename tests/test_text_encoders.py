"""CLIP-L / T5 loading and prompt encoding against `transformers` models loaded on the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from library.errors import UserError
from library.flux.text_encoders import FluxTextEncoders, load_clip_l, load_t5xxl, tokenizer_dir
from library.flux.tiny_text import tiny_text_dims, write_tiny_text_encoders, write_tiny_text_encoders_diffusers

PROMPTS = ["a photo of sks dog", "an oil painting of a lighthouse at dusk, waves crashing"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("te")
    clip, t5 = write_tiny_text_encoders(root, seed=3)
    write_tiny_text_encoders_diffusers(root / "pipe", seed=3)
    return {"root": root, "clip": clip, "t5": t5, "pipe": root / "pipe"}


def _hf_folder(folder: Path, weights: Path, config) -> Path:
    """A transformers model folder whose model.safetensors *is* `weights` (a symlink), with a config written
    here from the known tiny sizes, independent of the loader's own shape reading."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    link = folder / "model.safetensors"
    if not link.exists():
        link.symlink_to(weights.resolve())
    return folder


def _clip_cfg() -> CLIPTextConfig:
    width, _ = tiny_text_dims()
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=width // 64, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _t5_cfg() -> T5Config:
    _, d_model = tiny_text_dims()
    return T5Config(vocab_size=32128, d_model=d_model, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                    feed_forward_proj="gated-gelu", is_encoder_decoder=False)


def _reference(files, tmp_path: Path, clip_weights: Path, t5_weights: Path):
    clip = CLIPTextModel.from_pretrained(_hf_folder(tmp_path / "c", clip_weights, _clip_cfg()), dtype=torch.float32)
    t5 = T5EncoderModel.from_pretrained(_hf_folder(tmp_path / "t", t5_weights, _t5_cfg()), dtype=torch.float32)
    return clip.eval(), t5.eval()


def _ids(n: int = 512):
    clip_tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir("clip_l")))
    t5_tok = T5TokenizerFast.from_pretrained(str(tokenizer_dir("t5_v1_1_xxl")))
    c = clip_tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    t = t5_tok(PROMPTS, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
    return c.input_ids, t.input_ids, t.attention_mask


def _assert_same(ours: FluxTextEncoders, clip_ref, t5_ref) -> None:
    """Bit-identical outputs (same kernels, same weights), with and without kohya's T5 attention mask."""
    clip_ids, t5_ids, mask = _ids()
    with torch.no_grad():
        enc = ours.encode(PROMPTS, 512)
        assert torch.equal(enc.clip_pooled, clip_ref(clip_ids).pooler_output)
        assert torch.equal(enc.t5_out, t5_ref(t5_ids).last_hidden_state)
        masked = ours.encode(PROMPTS, 512, apply_t5_attn_mask=True).t5_out
        assert torch.equal(masked, t5_ref(t5_ids, attention_mask=mask).last_hidden_state)
    assert torch.equal(enc.t5_attn_mask.cpu(), mask)


def test_single_files_equal_transformers(files, tmp_path) -> None:
    ours = FluxTextEncoders.load(files["clip"], files["t5"], "cpu", torch.float32)
    _assert_same(ours, *_reference(files, tmp_path, files["clip"], files["t5"]))


def test_diffusers_folders_equal_transformers(files) -> None:
    clip_ref = CLIPTextModel.from_pretrained(files["pipe"] / "text_encoder", dtype=torch.float32).eval()
    t5_ref = T5EncoderModel.from_pretrained(files["pipe"] / "text_encoder_2", dtype=torch.float32).eval()
    for clip_path, t5_path in [(files["pipe"], files["pipe"]),
                               (files["pipe"] / "text_encoder", files["pipe"] / "text_encoder_2")]:
        _assert_same(FluxTextEncoders.load(clip_path, t5_path, "cpu", torch.float32), clip_ref, t5_ref)


def _to_fp8(src: Path, dst: Path, upcast: Path) -> None:
    """An fp8 (e4m3fn) copy of a file, as t5xxl_fp8_e4m3fn.safetensors ships, and its exact fp32 upcast."""
    sd = load_file(str(src))
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}
    save_file(fp8, str(dst))
    save_file({k: v.float() for k, v in fp8.items()}, str(upcast))


def test_fp8_files_equal_their_upcast(files, tmp_path) -> None:
    r = tmp_path
    _to_fp8(files["clip"], r / "clip_l_fp8.safetensors", r / "clip_up.safetensors")
    _to_fp8(files["t5"], r / "t5xxl_fp8_e4m3fn.safetensors", r / "t5_up.safetensors")
    ours = FluxTextEncoders.load(r / "clip_l_fp8.safetensors", r / "t5xxl_fp8_e4m3fn.safetensors", "cpu",
                                 torch.float32)
    assert ours.t5.shared.weight.dtype == torch.float32
    _assert_same(ours, *_reference(files, tmp_path, r / "clip_up.safetensors", r / "t5_up.safetensors"))
    # and fp8 storage is within fp8 precision of the fp16 original (but not identical to it)
    full = FluxTextEncoders.load(files["clip"], files["t5"], "cpu", torch.float32).encode(PROMPTS, 512)
    low = ours.encode(PROMPTS, 512)
    for a, b in [(low.t5_out, full.t5_out), (low.clip_pooled, full.clip_pooled)]:
        rel = ((a - b).norm() / b.norm()).item()
        assert 1e-4 < rel < 0.25, rel


def test_tokenizers_are_the_shipped_clip_and_t5() -> None:
    clip_ids, t5_ids, mask = _ids(16)
    assert clip_ids.shape == (2, 77) and t5_ids.shape == (2, 16)
    assert clip_ids[0, :7].tolist() == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert clip_ids[0, 7:].eq(49407).all()  # padded with <|endoftext|> as FluxPipeline does
    assert t5_ids[0, -1] == 0 and mask[0].sum() < 16 and t5_ids[0, int(mask[0].sum()) - 1] == 1  # </s> then <pad>


def test_outputs_depend_on_every_prompt_token_path(files) -> None:
    te = FluxTextEncoders.load(files["clip"], files["t5"], "cpu", torch.float32)
    a, b = te.encode(PROMPTS[0], 256), te.encode("a photo of sks cat", 256)
    assert a.t5_out.shape == (1, 256, tiny_text_dims()[1]) and a.clip_pooled.shape == (1, tiny_text_dims()[0])
    assert (a.clip_pooled - b.clip_pooled).norm() > 0.1 * a.clip_pooled.norm()  # one word of seven changed
    assert (a.t5_out[:, :8] - b.t5_out[:, :8]).norm() > 0.2 * a.t5_out[:, :8].norm()
    # kohya's --apply_t5_attn_mask: without it, padding tokens influence the real tokens' states
    masked = te.encode(PROMPTS[0], 256, apply_t5_attn_mask=True)
    assert not torch.allclose(masked.t5_out[:, :4], a.t5_out[:, :4], atol=1e-3)
    torch.testing.assert_close(masked.clip_pooled, a.clip_pooled)


def _edit(src: Path, dst: Path, fn) -> Path:
    sd = load_file(str(src))
    fn(sd)
    save_file(sd, str(dst))
    return dst


@pytest.mark.parametrize("case,loader,expect", [
    ("t5_as_clip", load_clip_l, "looks like a T5 file passed as --clip_l"),
    ("clip_as_t5", load_t5xxl, "looks like a CLIP-L file passed as --t5xxl"),
    ("missing_clip_key", load_clip_l, "missing key(s) text_model.encoder.layers.1.mlp.fc2.bias"),
    ("extra_clip_key", load_clip_l, "unexpected key(s) text_model.encoder.layers.0.mlp.fc3.weight"),
    ("wrong_t5_shape", load_t5xxl, "wrong shape for encoder.final_layer_norm.weight (7,)"),
    ("missing_t5_key", load_t5xxl, "missing key(s) encoder.block.1.layer.1.DenseReluDense.wo.weight"),
])
def test_wrong_files_name_the_file_and_key(files, tmp_path, case, loader, expect) -> None:
    c, t = files["clip"], files["t5"]
    path = {
        "t5_as_clip": t,
        "clip_as_t5": c,
        "missing_clip_key": lambda: _edit(c, tmp_path / "x.safetensors",
                                          lambda sd: sd.pop("text_model.encoder.layers.1.mlp.fc2.bias")),
        "extra_clip_key": lambda: _edit(c, tmp_path / "x.safetensors", lambda sd: sd.__setitem__(
            "text_model.encoder.layers.0.mlp.fc3.weight", torch.zeros(3))),
        "wrong_t5_shape": lambda: _edit(t, tmp_path / "x.safetensors", lambda sd: sd.__setitem__(
            "encoder.final_layer_norm.weight", torch.zeros(7))),
        "missing_t5_key": lambda: _edit(t, tmp_path / "x.safetensors",
                                        lambda sd: sd.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight")),
    }[case]
    path = path() if callable(path) else path
    with pytest.raises(UserError) as err:
        loader(path, "cpu", torch.float32)
    msg = str(err.value)
    assert str(path) in msg and expect in msg and "\n" not in msg


def test_folder_without_encoder_is_refused(tmp_path) -> None:
    with pytest.raises(UserError, match="text_encoder_2/model.safetensors"):
        load_t5xxl(tmp_path, "cpu", torch.float32)
    with pytest.raises(UserError, match="no such file"):
        load_clip_l(tmp_path / "nope.safetensors", "cpu", torch.float32)


class _Shapes:
    """Just the header of a checkpoint (what the size reading looks at), for full-size models."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes, self.name = shapes, "header"

    def keys(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes


def test_real_clip_l_and_t5_xxl_sizes_are_read_from_shapes() -> None:
    from library.flux.text_encoders import ClipSizes, T5Sizes, clip_sizes, t5_sizes

    # openai/clip-vit-large-patch14 text tower and google/t5-v1_1-xxl encoder (FLUX.1's encoders)
    clip_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    t5_cfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        clip_sd = {"text_model." + k: tuple(v.shape) for k, v in CLIPTextModel(clip_cfg).state_dict().items()}
        t5_sd = {k: tuple(v.shape) for k, v in T5EncoderModel(t5_cfg).state_dict().items()
                 if k != "encoder.embed_tokens.weight"}
    clip_sd["text_projection.weight"] = (768, 768)
    assert clip_sizes(_Shapes(clip_sd)) == ClipSizes(49408, 768, 12, 3072, 77, 768)
    assert clip_sizes(_Shapes(clip_sd)).heads == 12
    assert t5_sizes(_Shapes(t5_sd)) == T5Sizes(32128, 4096, 24, 64, 64, 10240, 32)


def test_all_in_one_checkpoint_parts_load_like_the_single_files(files, tmp_path) -> None:
    """ComfyUI all-in-one files hold the encoders under `text_encoders.{clip_l,t5xxl}.transformer.`."""
    sd = {"model.diffusion_model.img_in.weight": torch.zeros(4, 4)}
    sd.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in load_file(str(files["clip"])).items()})
    sd.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in load_file(str(files["t5"])).items()})
    aio = tmp_path / "flux1-dev-all-in-one.safetensors"
    save_file(sd, str(aio))
    single = FluxTextEncoders.load(files["clip"], files["t5"], "cpu", torch.float32).encode(PROMPTS, 128)
    both = FluxTextEncoders.load(aio, aio, "cpu", torch.float32).encode(PROMPTS, 128)
    assert torch.equal(single.t5_out, both.t5_out) and torch.equal(single.clip_pooled, both.clip_pooled)


def test_fp16_keeps_t5_wo_in_fp32_like_transformers(files, tmp_path) -> None:
    ours = FluxTextEncoders.load(files["clip"], files["t5"], "cpu", torch.float16)
    assert ours.t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert ours.t5.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.dtype == torch.float16
    ref = T5EncoderModel.from_pretrained(files["pipe"] / "text_encoder_2", dtype=torch.float16).eval()
    _, t5_ids, _ = _ids(64)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(PROMPTS, 64).t5_out, ref(t5_ids).last_hidden_state)


def test_scaled_fp8_t5_is_dequantised(files, tmp_path) -> None:
    """ComfyUI's t5xxl_fp8_e4m3fn_scaled layout: fp8 W/s per Linear + `.scale_weight` s + `scaled_fp8` marker."""
    fp8, up = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in load_file(str(files["t5"])).items():
        if (".SelfAttention." in k or ".DenseReluDense." in k) and "relative_attention_bias" not in k:
            scale = v.float().abs().max() / 448.0
            fp8[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            fp8[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
            up[k] = fp8[k].float() * scale
        else:
            fp8[k], up[k] = v, v.float()
    save_file(fp8, str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    save_file(up, str(tmp_path / "t5_up.safetensors"))
    ours = FluxTextEncoders.load(files["clip"], tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", "cpu",
                                 torch.float32)
    _assert_same(ours, *_reference(files, tmp_path, files["clip"], tmp_path / "t5_up.safetensors"))
