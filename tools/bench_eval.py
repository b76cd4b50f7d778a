#!/usr/bin/env python
"""GPU benchmark of flux_eval_lora.py: render images/s and CLIP-scoring images/s.

    python3 tools/bench_eval.py --out $OUT/bench_eval.json          # on the device (full sizes)
    python3 tools/bench_eval.py --tiny --out /tmp/bench_eval.json   # CPU smoke run with tiny models

render: the FLUX.1-dev transformer at full size (hidden 3072, 19 double + 38 single blocks; random unit-gain
weights made on the GPU, nothing read from disk) and the full-size AE, 1024x1024, 28 Euler steps, through
the same functions `render` uses (`generate_latents` + `latents_to_pil`), in bf16 and with fp8 e4m3 block
weights; text conditioning is precomputed (render encodes each prompt once), so this is the per-image cost.
score: a CLIP ViT-L/14-sized CLIPModel (random weights, saved in transformers layout with the shipped CLIP-L
tokenizer) scored through `ClipScorer` in GPU batches, end to end (PIL preprocessing of 1024x1024 images
included) and model-only (preprocessed pixels, GPU forward of image + text towers).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from library.flux.autoencoder import AutoEncoder, AutoEncoderParams  # noqa: E402
from library.flux.model import Flux, FluxParams, apply_fp8_storage  # noqa: E402
from library.flux.text_encoders import TextEncoding  # noqa: E402
from library.sampling import generate_latents, latents_to_pil, sample_settings  # noqa: E402

FLUX_DEV = FluxParams(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                      mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, qkv_bias=True,
                      guidance_embed=True)
FULL_AE = AutoEncoderParams(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16)
CLIP_L14 = dict(text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77),
                vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=224, patch_size=14), projection_dim=768)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def random_flux(params: FluxParams, device: torch.device, dtype: torch.dtype) -> Flux:
    """Built on the meta device, then filled in place on `device` (never a float32 copy of 12B weights)."""
    with torch.device("meta"):
        model = Flux(params).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(0)
    for name, p in model.named_parameters():
        if p.ndim >= 2:  # unit-gain weights keep activations finite at full depth
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(p.shape[1] ** -0.5))
        elif name.endswith(".scale"):
            p.fill_(1.0)
        else:
            p.copy_(0.01 * torch.randn(p.shape, generator=gen, device=device))
    return model.eval().requires_grad_(False)


def bench_render(params: FluxParams, ae_params: AutoEncoderParams, device: torch.device, size: int, steps: int,
                 fp8: bool, images: int) -> dict:
    dtype = torch.bfloat16
    model = random_flux(params, device, dtype)
    if fp8:
        apply_fp8_storage(model, dtype)
    torch.manual_seed(0)
    ae = AutoEncoder(ae_params).to(device, dtype).eval()
    gen = torch.Generator(device).manual_seed(1)
    cond = TextEncoding(t5_out=torch.randn(1, 512, params.context_in_dim, generator=gen, device=device, dtype=dtype),
                        clip_pooled=torch.randn(1, params.vec_in_dim, generator=gen, device=device, dtype=dtype),
                        t5_attn_mask=torch.ones(1, 512, dtype=torch.long, device=device))

    def one(seed: int) -> Image.Image:
        s = sample_settings(True, "benchmark", size, size, steps, 3.5, seed)
        return latents_to_pil(ae, generate_latents(model, cond, s, True, progress=False))[0]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    one(0)  # warm-up (kernels, allocator)
    sync(device)
    start = time.perf_counter()
    for i in range(images):
        im = one(i + 1)
    sync(device)
    sec = (time.perf_counter() - start) / images
    out = {"mode": "fp8" if fp8 else "bf16", "size": size, "steps": steps, "images": images,
           "s_per_image": round(sec, 3), "images_per_s": round(1 / sec, 4), "image_ok": im.size == (size, size)}
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 1024 ** 3, 2)
    del model, ae
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def write_clip(folder: Path, tiny: bool) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer  # noqa: PLC0415

    from library.eval.tiny_models import CLIP_TOKENIZER, write_tiny_clip  # noqa: PLC0415

    if tiny:
        return write_tiny_clip(folder)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=CLIP_L14["text"], vision_config=CLIP_L14["vision"],
                         projection_dim=CLIP_L14["projection_dim"])).save_pretrained(folder)
    image = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=image, tokenizer=CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER))).save_pretrained(folder)
    return folder


def bench_score(device: torch.device, tiny: bool, n: int, size: int, batch: int, work: Path) -> dict:
    from library.eval.clip import ClipScorer, clip_scores  # noqa: PLC0415

    scorer = ClipScorer(write_clip(work / "clip", tiny), device, batch_size=batch)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    prompts = [f"a photo of sks dog number {i} in a garden" for i in range(n)]
    clip_scores(scorer.image_embeds(images[:batch]), scorer.text_embeds(prompts[:batch]))  # warm-up
    sync(device)
    start = time.perf_counter()
    scores = clip_scores(scorer.image_embeds(images), scorer.text_embeds(prompts))
    sync(device)
    end_to_end = time.perf_counter() - start
    pixels = scorer.processor(images=images[:batch], return_tensors="pt")["pixel_values"].to(device)
    tok = scorer.processor(text=prompts[:batch], return_tensors="pt", padding=True)
    reps = max(1, n // batch)
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            scorer.model.visual_projection(scorer.model.vision_model(pixel_values=pixels).pooler_output)
            scorer.model.text_projection(scorer.model.text_model(input_ids=tok["input_ids"].to(device),
                                                                 attention_mask=tok["attention_mask"].to(device)).pooler_output)
        sync(device)
        model_only = time.perf_counter() - start
    return {"model": "tiny CLIP" if tiny else "CLIP ViT-L/14 size (random)", "images": n, "image_size": size,
            "batch": batch, "end_to_end_images_per_s": round(n / end_to_end, 2),
            "model_only_images_per_s": round(reps * batch / model_only, 2), "finite": bool(torch.isfinite(scores).all())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a smoke run)")
    p.add_argument("--images", type=int, default=2, help="timed renders per mode (default 2, after a warm-up)")
    p.add_argument("--modes", default="bf16,fp8")
    a = p.parse_args()
    device = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    if a.tiny:
        from library.flux.tiny import TINY_AE, tiny_flux_params  # noqa: PLC0415

        params, ae_params, size, steps = tiny_flux_params(), TINY_AE, 64, 4
    else:
        params, ae_params, size, steps = FLUX_DEV, FULL_AE, 1024, 28
    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "render": [], "score": None}
    for mode in a.modes.split(","):
        r = bench_render(params, ae_params, device, size, steps, mode == "fp8", a.images)
        print(json.dumps(r), flush=True)
        results["render"].append(r)
    with tempfile.TemporaryDirectory() as work:
        results["score"] = bench_score(device, a.tiny, 16 if a.tiny else 256, 64 if a.tiny else 1024,
                                       8 if a.tiny else 64, Path(work))
    print(json.dumps(results["score"]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
