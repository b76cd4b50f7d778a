"""Degraded subsets in the dataset: images x variants, the control image made from the cropped/flipped target,
content-keyed control latents (exactly the affected entries re-encode), resume and cross-process equality,
schema errors through the CLI, and --dry_run's plan and contact sheet."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flux_train_network
from library.data.dataset import BatchLoader, _to_tensor, build_datasets
from library.train.caching import encode_latents
from library.data.degrade import apply_params
from library.data.config import dataset_flags, load_dataset_config
from library.errors import run_main

REPO = Path(__file__).resolve().parents[1]


def images(folder: Path, n: int, size=(64, 48), prefix="img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n + len(prefix))
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{prefix}{i}.png")
    return folder


def write(tmp_path: Path, body: str, name: str = "data.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def two_subsets(tmp_path: Path, variants: int = 2, blur_b: str = "[0.5, 1.0]", name: str = "data.toml") -> Path:
    a, b = images(tmp_path / "a", 2), images(tmp_path / "b", 2, prefix="pic")
    return write(tmp_path, f"""
        [general]
        resolution = 32
        [[datasets]]
        batch_size = 2
          [[datasets.subsets]]
          image_dir = "{a}"
          class_tokens = "photo"
          flip_aug = true
          [datasets.subsets.degradation]
          ops = ["downsample", "noise", "jpeg"]
          variants = {variants}
          [[datasets.subsets]]
          image_dir = "{b}"
          class_tokens = "photo"
          [datasets.subsets.degradation]
          ops = ["blur", "scratches"]
          blur_sigma = {blur_b}
          variants = {variants}
        """, name)


def enc(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16]


def test_items_are_images_times_variants_and_control_follows_crop_and_flip(tmp_path):
    cfg = load_dataset_config(two_subsets(tmp_path, variants=3))
    ds, _ = build_datasets(cfg, seed=4, progress=False)
    assert len(ds.items[0]) == 4 * 3 and sorted({it.variant for it in ds.items[0]}) == [0, 1, 2]
    flipped = 0
    for index in range(len(ds.batches(0))):
        batch = ds.load_batch(0, index)
        ref = ds.batches(0)[index]
        for k, (uid, rep) in enumerate(ref.samples):
            it = ds.by_uid[uid]
            rgb, _, _ = ds._pixels(it, None)  # the target at the bucket, centre crop, before flip
            control = _to_tensor(apply_params(rgb, ds.degradation_params(it)))
            target = _to_tensor(rgb)
            if not torch.equal(batch.images[k], target):  # flipped: target and control flip together
                assert torch.equal(batch.images[k], target.flip(-1))
                target, control = target.flip(-1), control.flip(-1)
                flipped += 1
            assert torch.equal(batch.cond_images[k], control)
            assert not torch.equal(batch.cond_images[k], batch.images[k])
    assert flipped > 0  # the flip case was exercised (subset a has flip_aug)
    # the control is not flip-equivariant, so flipping the target alone would be caught
    it = ds.items[0][0]
    rgb, _, cond = ds._pixels(it, None)
    assert not np.array_equal(np.ascontiguousarray(apply_params(np.ascontiguousarray(rgb[:, ::-1]),
                                                                ds.degradation_params(it))), cond[:, ::-1])


class Counting:
    def __init__(self) -> None:
        self.images = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return enc(x)


def cache_once(cfg_path: Path, cache_dir: Path) -> tuple[int, dict[tuple[str, int], str]]:
    ds, _ = build_datasets(load_dataset_config(cfg_path), seed=1, progress=False)
    counter = Counting()
    ds, _ = encode_latents(ds, counter, "ae", to_disk=True, cache_dir=cache_dir, progress=False)
    keys = {(ds.by_uid[u].image_key, ds.by_uid[u].variant): k for u, k in ds.latents.control_keys.items()}
    assert len(set(ds.latents.keys.values())) == 4  # one target entry per image, shared by its variants
    return counter.images, keys


def test_control_latents_cached_and_exactly_the_affected_entries_reencode(tmp_path):
    cache = tmp_path / "cache"
    n, keys = cache_once(two_subsets(tmp_path, variants=2), cache)
    # targets once per image (subset a with flip_aug: 2 encodes), controls once per (image, variant)
    assert n == (2 * 2 + 4 * 2) + (2 * 1 + 4 * 1) and len(set(keys.values())) == 8
    assert cache_once(two_subsets(tmp_path, variants=2), cache)[0] == 0  # unchanged: every entry hits
    n3, keys3 = cache_once(two_subsets(tmp_path, variants=3), cache)  # one more variant: only the new ones
    assert n3 == 2 * 2 + 2 * 1 and all(keys3[k] == v for k, v in keys.items())
    n_b, keys_b = cache_once(two_subsets(tmp_path, variants=3, blur_b="[2.0, 3.0]"), cache)  # subset b's blur
    changed = {k for k in keys3 if keys3[k] != keys_b[k]}
    assert changed == {k for k in keys3 if k[0].startswith("pic")} and n_b == 6 * 1
    # the cached control latents are the encoded degraded images
    ds, _ = build_datasets(load_dataset_config(two_subsets(tmp_path, variants=3, blur_b="[2.0, 3.0]")), seed=1,
                           progress=False)
    live, _ = build_datasets(load_dataset_config(two_subsets(tmp_path, variants=3, blur_b="[2.0, 3.0]")), seed=1,
                             progress=False)
    ds, _ = encode_latents(ds, enc, "ae", to_disk=True, cache_dir=cache, progress=False)
    for i in range(len(ds.batches(0))):
        c, a = ds.load_batch(0, i), live.load_batch(0, i)
        assert torch.allclose(c.cond_latents, enc(a.cond_images), atol=1e-6)
        assert torch.allclose(c.latents, enc(a.images), atol=1e-6)  # flipped samples read the flipped entries


def _digest(ds, epoch: int) -> str:
    h = hashlib.sha256()
    for i in range(len(ds.batches(epoch))):
        b = ds.load_batch(epoch, i)
        h.update(b.cond_images.numpy().tobytes())
    return h.hexdigest()


def test_pairs_equal_after_resume_and_in_another_process(tmp_path):
    cfg_path = two_subsets(tmp_path, variants=2)
    ds, _ = build_datasets(load_dataset_config(cfg_path), seed=7, progress=False)
    full = [b.cond_images for e in range(2) for b in BatchLoader(ds).iter_epoch(e)]
    loader = BatchLoader(ds)
    first = [next(loader.iter_epoch(0)).cond_images]
    state = loader.state_dict()
    resumed_ds, _ = build_datasets(load_dataset_config(cfg_path), seed=7, progress=False)
    resumed = BatchLoader(resumed_ds)
    resumed.load_state_dict(state)
    rest = list(resumed.iter_epoch()) + list(resumed.iter_epoch())
    assert all(torch.equal(a, b) for a, b in zip(full, first + [b.cond_images for b in rest]))
    assert len(full) == 1 + len(rest)
    code = ("from pathlib import Path; from library.data.config import load_dataset_config; "
            "from library.data.dataset import build_datasets; import tests.test_degradation_data as t; "
            f"ds, _ = build_datasets(load_dataset_config(Path({str(cfg_path)!r})), seed=7, progress=False); "
            "print(t._digest(ds, 1))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PYTHONHASHSEED": "123", "PATH": "", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == _digest(ds, 1)
    other_seed, _ = build_datasets(load_dataset_config(cfg_path), seed=8, progress=False)
    assert _digest(other_seed, 1) != _digest(ds, 1)  # the seed matters (the check can fail)


def cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        run_main(lambda: flux_train_network.main(argv))
    return e.value.code, capsys.readouterr().err


BASE = """
    [[datasets]]
    resolution = 32
      [[datasets.subsets]]
      image_dir = "{img}"
      {extra}
      [datasets.subsets.degradation]
      {deg}
    """


@pytest.mark.parametrize("deg, extra, expected", [
    ('ops = ["blur"]\nblur_sgma = [0, 1]', "",
     "datasets[0].subsets[0].degradation.blur_sgma: unknown key; did you mean blur_sigma?"),
    ('ops = ["downsampel"]', "", "datasets[0].subsets[0].degradation.ops: unknown op 'downsampel'; did you mean "
                                 "downsample?"),
    ('ops = ["blur"]\nblur_sigma = [2.0, 1.0]', "", "datasets[0].subsets[0].degradation.blur_sigma: min > max"),
    ('ops = ["blur"]\nvariants = 0', "", "datasets[0].subsets[0].degradation.variants: expected an integer >= 1"),
    ('ops = ["jpeg"]\njpeg_quality = "high"', "", "datasets[0].subsets[0].degradation.jpeg_quality: expected [low, high]"),
    ('ops = "blur"\nvariants = true', "", "datasets[0].subsets[0].degradation.variants: expected an integer >= 1"),
    ('ops = ["blur"]', 'conditioning_data_dir = "{img}"',
     "datasets[0].subsets[0].degradation: cannot be combined with conditioning_data_dir"),
])
def test_bad_degradation_tables_exit_2_naming_file_and_key(tmp_path, capsys, deg, extra, expected):
    img = images(tmp_path / "img", 1)
    cfg = write(tmp_path, BASE.format(img=img, extra=extra.format(img=img), deg=deg.replace("\n", "\n      ")))
    code, err = cli(["--dataset_config", str(cfg), "--validate_config"], capsys)
    assert code == 2 and f"error: {cfg}: {expected}" in err, err
    assert "Traceback" not in err


def test_mixed_subsets_and_cli_shorthand(tmp_path, capsys):
    a, b = images(tmp_path / "a", 1), images(tmp_path / "b", 1, prefix="p")
    mixed = write(tmp_path, f"""
        [[datasets]]
        resolution = 32
          [[datasets.subsets]]
          image_dir = "{a}"
          degradation = {{ ops = ["blur"] }}
          [[datasets.subsets]]
          image_dir = "{b}"
        """)
    code, err = cli(["--dataset_config", str(mixed), "--validate_config"], capsys)
    assert code == 2 and "datasets[0]: subsets with a degradation table and subsets without cannot be mixed" in err
    # --degradation_types fills every clean subset without its own table (a table of its own wins)
    cfg = load_dataset_config(mixed, dataset_flags({"degradation_types": "downsample,noise",
                                                    "degradation_noise_sigma": "0.02,0.1", "degradation_variants": 2}))
    subs = cfg.datasets[0].subsets
    assert subs[0].degradation.ops == ("blur",)
    assert subs[1].degradation.ops == ("downsample", "noise") and subs[1].degradation.noise_sigma == (0.02, 0.1)
    assert cfg.sources["datasets[0].subsets[1].degradation"] == "cli"
    for argv, expected in ((["--degradation_types", "blur,nois"], "--degradation_types: unknown op 'nois'; did you "
                                                                   "mean noise?"),
                           (["--degradation_types", "blur", "--degradation_blur_sigma", "3,1"],
                            "--degradation_blur_sigma: min > max"),
                           (["--degradation_blur_sigma", "1"], "--degradation_types: missing"),
                           (["--degradation_types", "blur", "--degradation_variants", "0"],
                            "--degradation_variants: expected an integer >= 1")):
        code, err = cli(["--dataset_config", str(mixed), "--validate_config", *argv], capsys)
        assert code == 2 and f"error: {expected}" in err, err


def test_dry_run_prints_variants_and_ranges_and_writes_a_contact_sheet(tmp_path, capsys):
    cfg = two_subsets(tmp_path, variants=3)
    out = tmp_path / "out"
    assert flux_train_network.main(["--dataset_config", str(cfg), "--dry_run", "--output_dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 images x 3 variants x 1 repeats = 6 samples" in text
    assert "downsample -> noise -> jpeg; downsample [2, 4], interpolation bicubic" in text
    assert "blur -> scratches; blur_sigma [0.5, 1], scratches [1, 6], scratch_width [1, 2]" in text
    sheet = out / "degradation_preview.png"
    assert f"contact sheet of (target, control) pairs: {sheet}" in text
    with Image.open(sheet) as im:
        arr = np.asarray(im.convert("RGB"))
    assert im.size[0] >= 2 * 192 and im.size[1] > 4 * 192  # 4 pairs per subset, 2 subsets: 8 rows
    assert arr.std() > 10 and not list(out.glob(".*tmp*"))
    # a plain dataset writes no sheet
    plain = write(tmp_path, f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"\n',
                  "plain.toml")
    assert flux_train_network.main(["--dataset_config", str(plain), "--dry_run", "--output_dir",
                                    str(tmp_path / "o2")]) == 0
    assert "contact sheet" not in capsys.readouterr().out and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("name, images, variants", [("restoration_kontext.toml", 5, 4),
                                                    ("demo_restoration.toml", 11, 2)])
def test_shipped_restoration_configs_validate(name, images, variants):
    cfg = load_dataset_config(REPO / "dataset_configs" / name)
    subs = [s for ds in cfg.datasets for s in ds.subsets]
    assert all(s.degradation is not None and s.degradation.variants == variants for s in subs)
    train, _ = build_datasets(cfg, seed=0, progress=False)
    assert sum(len(its) for its in train.items) == images * variants


def test_cli_shorthand_without_a_clean_subset_warns(tmp_path):
    tgt, ctl = images(tmp_path / "t", 1), images(tmp_path / "c", 1)
    cfg_path = write(tmp_path, f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{tgt}"\n'
                               f'conditioning_data_dir = "{ctl}"\n')
    cfg = load_dataset_config(cfg_path, dataset_flags({"degradation_types": "blur"}))
    assert cfg.datasets[0].subsets[0].degradation is None
    assert any(w.startswith("--degradation_types: no subset takes it") for w in cfg.warnings)
    plain = write(tmp_path, f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{tgt}"\n', "p.toml")
    assert not load_dataset_config(plain, dataset_flags({"degradation_types": "blur"})).warnings
    own = load_dataset_config(two_subsets(tmp_path), dataset_flags({"degradation_types": "blur"}))
    assert own.warnings  # own tables win


def test_validation_split_keeps_the_variants_of_an_image_together(tmp_path):
    img = images(tmp_path / "v", 6)
    cfg = load_dataset_config(write(tmp_path, f"""
        [[datasets]]
        resolution = 32
        validation_split = 0.5
          [[datasets.subsets]]
          image_dir = "{img}"
          degradation = {{ ops = ["noise"], variants = 3 }}
        """))
    train, val = build_datasets(cfg, seed=0, progress=False)
    tp, vp = [it.path for it in train.items[0]], [it.path for it in val.items[0]]
    assert len(set(tp)) == 3 and len(set(vp)) == 3 and not set(tp) & set(vp)
    assert len(tp) == len(vp) == 9  # every variant of an image on its side


def test_a_degraded_and_a_plain_dataset_cache_together(tmp_path):
    a, b = images(tmp_path / "a", 2), images(tmp_path / "b", 2, prefix="p")
    cfg = load_dataset_config(write(tmp_path, f"""
        [general]
        resolution = 32
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{a}"
          degradation = {{ ops = ["blur"], variants = 2 }}
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{b}"
        """))
    ds, _ = build_datasets(cfg, seed=0, progress=False)
    ds, _ = encode_latents(ds, enc, "ae", to_disk=False, progress=False)  # one in-memory cache for both datasets
    batches = [ds.load_batch(0, i) for i in range(len(ds.batches(0)))]
    assert sorted(b.cond_latents is not None for b in batches) == [False, False, True, True, True, True]
