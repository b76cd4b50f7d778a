"""The VGG16 perceptual loss: torchvision key layout, zero for identical images, gradient only to the LoRA,
one-line errors for files that are not VGG16, and a training run with it."""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.vision.vgg import CONV_INDICES, load_vgg16, perceptual_distance

TINY_WIDTHS = (4, 4, 6, 6, 8, 8, 8, 8, 8, 8, 8, 8, 8)  # VGG16's 13 convs, narrow


def vgg_state_dict(widths=TINY_WIDTHS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in torchvision's vgg16 layout (features.{i}.weight/bias + a classifier)."""
    g = torch.Generator().manual_seed(seed)
    sd, prev = {}, 3
    for i, w in zip(CONV_INDICES, widths):
        sd[f"features.{i}.weight"] = torch.randn(w, prev, 3, 3, generator=g) * (2 / (9 * prev)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(w, generator=g) * 0.01
        prev = w
    sd["classifier.0.weight"] = torch.zeros(4, prev)  # present in torchvision's file; ignored
    return sd


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vgg") / "vgg16_tiny.safetensors"
    save_file(vgg_state_dict(), str(path))
    return path


def test_features_follow_torchvision_layout_and_distance_is_zero_only_for_identical(vgg_file) -> None:
    vgg = load_vgg16(vgg_file)
    assert [n for n, _ in vgg.named_parameters()][:2] == ["features.0.weight", "features.0.bias"]
    assert not any(p.requires_grad for p in vgg.parameters())
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 48, 64, generator=g) * 2 - 1
    assert perceptual_distance(vgg, a, a).abs().max() == 0
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    d = perceptual_distance(vgg, a, b)
    assert d.shape == (2,) and bool((d > 1e-4).all())
    # the taps are torchvision's relu1_2 … relu5_3: shapes after 0, 1, 2, 3, 4 poolings
    taps = vgg(a)
    assert [t.shape[-2:] for t in taps] == [(48, 64), (24, 32), (12, 16), (6, 8), (3, 4)]
    # conv 1 equals a plain conv2d on the ImageNet-normalised image (the preprocessing torchvision expects)
    sd = vgg_state_dict()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = ((a + 1) / 2 - mean) / std
    torch.testing.assert_close(vgg.features["0"](x), torch.nn.functional.conv2d(x, sd["features.0.weight"],
                                                                                sd["features.0.bias"], padding=1))


@pytest.mark.parametrize("case,expect", [
    ("missing_key", "missing features.28.bias"),
    ("extra_key", "unexpected key lora_unet_x.weight"),
    ("shape", "features.2.weight has shape"),
    ("not_safetensors", "not a safetensors file"),
    ("absent", "no such file (given as --perceptual_model)"),
])
def test_a_file_that_is_not_vgg16_is_a_one_line_error(tmp_path, case, expect) -> None:
    sd, path = vgg_state_dict(), tmp_path / "model.safetensors"
    if case == "missing_key":
        del sd["features.28.bias"]
    elif case == "extra_key":
        sd["lora_unet_x.weight"] = torch.zeros(1)
    elif case == "shape":
        sd["features.2.weight"] = torch.zeros(4, 5, 3, 3)
    if case == "not_safetensors":
        path.write_bytes(b"\x01" * 64)
    elif case != "absent":
        save_file(sd, str(path))
    with pytest.raises(UserError, match=re.escape(expect)) as err:
        load_vgg16(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_gradient_reaches_only_the_lora(tiny_ckpts, vgg_file) -> None:
    from library.flux.loading import load_autoencoder, load_transformer
    from library.train.cli import parse_args
    from library.train.config import build_config
    from library.train.perceptual import build_perceptual
    from library.train.step import StepInputs, flow_matching_loss
    from networks.lora_flux import create_network

    model = load_transformer(tiny_ckpts.transformer, "cpu", torch.float32).requires_grad_(False)
    ae = load_autoencoder(tiny_ckpts.ae, "cpu", torch.float32).requires_grad_(False)
    from tests.interop.helpers import randomize_network

    torch.manual_seed(0)
    network = create_network(1.0, 4, 4, model)
    network.apply_to()
    randomize_network(network)  # non-zero up weights: every LoRA parameter is on a gradient path
    perceptual = build_perceptual(str(vgg_file), ae)
    p = model.params
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 16, 4, 6, generator=g)
    x = StepInputs(lat, torch.randn(1, 8, p.context_in_dim, generator=g), torch.randn(1, p.vec_in_dim, generator=g),
                   torch.ones(1, 8), torch.ones(1), None, ("a#0",), cond_latents=torch.randn(1, 16, 4, 6, generator=g))
    base = build_config(parse_args(["--model_prediction_type", "raw", "--flow_from_control"])).objective
    with_p = build_config(parse_args(["--model_prediction_type", "raw", "--flow_from_control",
                                      "--perceptual_loss_weight", "1.0", "--perceptual_model", str(vgg_file),
                                      "--perceptual_every_n_steps", "2"])).objective
    plain = flow_matching_loss(model, x, base, 1, 4, True, False, nullcontext)
    loss = flow_matching_loss(model, x, with_p, 1, 4, True, False, nullcontext, perceptual=perceptual)
    assert float(loss) > float(plain) + 1e-6  # step 4 is a perceptual step
    off_step = flow_matching_loss(model, x, with_p, 1, 5, True, False, nullcontext, perceptual=perceptual)
    assert float(off_step) == pytest.approx(float(flow_matching_loss(model, x, base, 1, 5, True, False, nullcontext)))
    lora = [q for q in network.parameters() if q.requires_grad]
    plain.backward()
    flow_grads = [q.grad.clone() for q in lora]
    network.zero_grad(set_to_none=True)
    loss.backward()
    assert lora and all(q.grad is not None for q in lora)
    assert max(float((q.grad - f).abs().max()) for q, f in zip(lora, flow_grads)) > 1e-8  # the perceptual part
    for module in (model, ae, perceptual.vgg):
        assert all(q.grad is None for n, q in module.named_parameters() if "lora_" not in n)
    # zero for identical images: x̂0 = target
    assert float(perceptual(lat, lat)) == 0.0


def test_training_with_a_file_that_is_not_vgg16_stops_before_loading(tiny_ckpts, tmp_path) -> None:
    """flux_train_network.py: the preflight names the file (exit 2 through run_main), before any image scan."""
    import flux_train_network

    bad = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(4, 3, 7, 7)}, str(bad))
    argv = ["--pretrained_model_name_or_path", str(tiny_ckpts.transformer), "--clip_l", str(tiny_ckpts.clip_l),
            "--t5xxl", str(tiny_ckpts.t5xxl), "--ae", str(tiny_ckpts.ae), "--train_data_dir", str(tmp_path / "none"),
            "--output_dir", str(tmp_path / "out"), "--perceptual_loss_weight", "0.1", "--perceptual_model", str(bad)]
    with pytest.raises(UserError, match=re.escape(f"{bad}: --perceptual_model is not VGG16")):
        flux_train_network.main(argv)
    assert not (tmp_path / "out").exists()
