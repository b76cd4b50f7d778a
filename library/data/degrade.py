"""Synthetic degradations: make a restoration pair's control image from a clean target image.

Design note. Every op is a pure function of (image, parameters); every random choice is made up front by
`sample_params`, from generators seeded by (seed, image key, variant, op), never from a global RNG. So the
degraded image of a given (image, variant) is the same in a resumed run, in another process and on another
machine, and its parameters can be hashed into the latent-cache key (a changed parameter re-encodes exactly
the entries it affects). Each op draws from its own generator, so editing one op's range leaves the draws
of the others unchanged.

API (used by the dataset layer and by flux_restore.py's --degrade):

    cfg = parse_degradation(table, where)            # -> (DegradationConfig | None, [one-line errors])
    cfg = load_degradation_file(path)                 # a TOML with a [degradation] table; raises UserError
    params = sample_params(cfg, seed, image_key, variant)   # -> DegradationParams (frozen, hashable)
    out = apply_params(image, params)                 # pure: uint8 [H, W, 3] (or PIL image) -> same type
    out = degrade(image, cfg, seed, image_key, variant)     # the two above in one call

`image_key` is any stable string naming the image (the dataset uses its path relative to image_dir).
Images are handled as float32 [0, 1] RGB between ops and rounded to uint8 at the end.

Ops (applied in the order of `ops`), with the keys of a `[degradation]` table that drive them:
  downsample  factor f ~ U(downsample): resize to (round(W/f), round(H/f)) and back, Pillow `interpolation`
              (bicubic by default; nearest, bilinear, bicubic, lanczos, box/area)
  blur        Gaussian, sigma ~ U(blur_sigma) pixels, reflected borders, kernel radius int(4 sigma + 0.5)
  noise       noise_type "gaussian": x + sigma * N(0, 1) per pixel and channel, sigma ~ U(noise_sigma) in
              [0, 1] units; "poisson": Poisson(x * peak) / peak, peak ~ U(noise_peak) counts at white; clipped
  jpeg        Pillow JPEG round trip, quality q ~ U{jpeg_quality} (integers, both ends included)
  color_fade  saturation loss s, contrast loss c, yellowing y, each ~ U(fade_*) in [0, 1]:
              x <- L + (1 - s)(x - L) (L: Rec.601 luma per pixel); x <- m + (1 - c)(x - m) (m: mean luma);
              x <- x * (1, 1 - 0.1 y, 1 - 0.4 y) per channel (a warm cast, as aged prints have)
  scratches   n ~ U{scratches} straight strokes; each has random end points, a width ~ U{scratch_width}
              pixels, a bright (1) or dark (0) value and an opacity ~ U(0.5, 1); drawn with Pillow
  grayscale   with probability grayscale_prob: every channel <- Rec.601 luma (Pillow's "L" weights)
"""

from __future__ import annotations

import hashlib
import io
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
from PIL import Image, ImageDraw

from library.errors import UserError, closest

OPS = ("downsample", "blur", "noise", "jpeg", "color_fade", "scratches", "grayscale")
NOISE_TYPES = ("gaussian", "poisson")
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "linear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "cubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX, "area": Image.Resampling.BOX}
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, the weights of Pillow's convert("L")
YELLOW_GAIN = np.array([0.0, 0.1, 0.4], np.float32)  # channel loss per unit of yellowing


@dataclass(frozen=True)
class DegradationConfig:
    """A `[degradation]` table, checked. Ranges are (low, high), drawn uniformly per (image, variant)."""

    ops: tuple[str, ...]  # applied in this order
    variants: int = 1  # distinct degraded versions per image (each one a training item with its own cache)
    seed: int | None = None  # None: the training --seed
    downsample: tuple[float, float] = (2.0, 4.0)  # factor >= 1
    interpolation: str = "bicubic"
    blur_sigma: tuple[float, float] = (0.5, 2.0)  # pixels
    noise_type: str = "gaussian"
    noise_sigma: tuple[float, float] = (0.01, 0.05)  # [0, 1] pixel units
    noise_peak: tuple[float, float] = (50.0, 500.0)  # Poisson counts at white (lower = noisier)
    jpeg_quality: tuple[int, int] = (30, 90)
    fade_saturation: tuple[float, float] = (0.0, 0.5)
    fade_contrast: tuple[float, float] = (0.0, 0.4)
    fade_yellowing: tuple[float, float] = (0.0, 0.5)
    scratches: tuple[int, int] = (1, 6)  # strokes per image
    scratch_width: tuple[int, int] = (1, 2)  # pixels
    grayscale_prob: float = 1.0

    def ranges(self) -> dict[str, Any]:
        """The settings that matter for the listed ops (what --dry_run prints)."""
        used = {k for op in self.ops for k in _OP_KEYS[op]} - {"noise_peak" if self.noise_type == "gaussian"
                                                               else "noise_sigma"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in used}


# Which table keys each op reads (a key set for an op that is not listed is an error: a likely slip).
_OP_KEYS: dict[str, tuple[str, ...]] = {
    "downsample": ("downsample", "interpolation"), "blur": ("blur_sigma",),
    "noise": ("noise_type", "noise_sigma", "noise_peak"), "jpeg": ("jpeg_quality",),
    "color_fade": ("fade_saturation", "fade_contrast", "fade_yellowing"),
    "scratches": ("scratches", "scratch_width"), "grayscale": ("grayscale_prob",),
}


# ---------------------------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class Downsample:
    factor: float
    interpolation: str


@dataclass(frozen=True)
class Blur:
    sigma: float


@dataclass(frozen=True)
class Noise:
    kind: str  # gaussian | poisson
    amount: float  # sigma (gaussian) or peak (poisson)
    seed: int  # of the per-pixel draw (numpy PCG64)


@dataclass(frozen=True)
class Jpeg:
    quality: int


@dataclass(frozen=True)
class ColorFade:
    saturation: float
    contrast: float
    yellowing: float


@dataclass(frozen=True)
class Stroke:
    start: tuple[float, float]  # (x, y) as fractions of (W, H)
    end: tuple[float, float]
    width: int  # pixels
    value: float  # 1 bright, 0 dark
    opacity: float


@dataclass(frozen=True)
class Scratches:
    strokes: tuple[Stroke, ...]


@dataclass(frozen=True)
class Grayscale:
    apply: bool


OpParams = Union[Downsample, Blur, Noise, Jpeg, ColorFade, Scratches, Grayscale]


@dataclass(frozen=True)
class DegradationParams:
    """The drawn parameters of one (image, variant): the ops in order."""

    ops: tuple[OpParams, ...] = field(default=())

    def describe(self) -> list[dict[str, Any]]:
        """JSON-able description (what the cache key hashes and PNG metadata can record)."""
        return [{"op": _NAME_OF[type(p)], **asdict(p)} for p in self.ops]


def _generator(seed: int, image_key: str, variant: int, op_index: int, op: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"degrade:{seed}:{image_key}:{variant}:{op_index}:{op}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _uniform(g: np.random.Generator, r: tuple[float, float]) -> float:
    return float(r[0]) if r[0] == r[1] else float(g.uniform(r[0], r[1]))


def _integer(g: np.random.Generator, r: tuple[int, int]) -> int:
    return int(g.integers(r[0], r[1], endpoint=True))


def _draw(op: str, cfg: DegradationConfig, g: np.random.Generator) -> OpParams:
    if op == "downsample":
        return Downsample(_uniform(g, cfg.downsample), cfg.interpolation)
    if op == "blur":
        return Blur(_uniform(g, cfg.blur_sigma))
    if op == "noise":
        amount = _uniform(g, cfg.noise_sigma if cfg.noise_type == "gaussian" else cfg.noise_peak)
        return Noise(cfg.noise_type, amount, int(g.integers(0, 2**63 - 1)))
    if op == "jpeg":
        return Jpeg(_integer(g, cfg.jpeg_quality))
    if op == "color_fade":
        return ColorFade(_uniform(g, cfg.fade_saturation), _uniform(g, cfg.fade_contrast),
                         _uniform(g, cfg.fade_yellowing))
    if op == "scratches":
        strokes = []
        for _ in range(_integer(g, cfg.scratches)):
            x0, y0 = g.uniform(0, 1, 2)
            angle, length = g.uniform(0, math.pi), g.uniform(0.2, 0.9)
            x1, y1 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
            strokes.append(Stroke((float(x0), float(y0)), (float(x1), float(y1)), _integer(g, cfg.scratch_width),
                                  float(g.integers(0, 2)), float(g.uniform(0.5, 1.0))))
        return Scratches(tuple(strokes))
    if op == "grayscale":
        return Grayscale(bool(g.uniform() < cfg.grayscale_prob))
    raise AssertionError(op)


def sample_params(cfg: DegradationConfig, seed: int, image_key: str, variant: int) -> DegradationParams:
    """The parameters of (image, variant): a pure function of its arguments (no global RNG)."""
    if cfg.seed is not None:
        seed = cfg.seed
    return DegradationParams(tuple(_draw(op, cfg, _generator(seed, image_key, variant, i, op))
                                   for i, op in enumerate(cfg.ops)))


# ---------------------------------------------------------------------------------------------- ops

def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _to_float(u8: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32) / 255.0


def downsample(x: np.ndarray, factor: float, interpolation: str = "bicubic") -> np.ndarray:
    """Resize to 1/factor and back (8-bit, Pillow), as a low-resolution photo upscaled for display."""
    h, w = x.shape[:2]
    small = (max(1, round(w / factor)), max(1, round(h / factor)))
    img = Image.fromarray(_to_u8(x))
    return _to_float(np.asarray(img.resize(small, RESAMPLE[interpolation]).resize((w, h), RESAMPLE[interpolation])))


def gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(4.0 * sigma + 0.5))  # scipy.ndimage's truncate = 4
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders (d c b a | a b c d), float precision."""
    if sigma <= 0:
        return x
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    out = x.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="symmetric")
        n = out.shape[axis]
        out = sum(k[i] * np.take(p, np.arange(i, i + n), axis=axis) for i in range(len(k)))
    return out.astype(np.float32)


def noise(x: np.ndarray, kind: str, amount: float, seed: int) -> np.ndarray:
    """Additive Gaussian (amount = sigma) or Poisson shot noise (amount = counts at white), clipped to [0, 1]."""
    g = np.random.default_rng(seed)
    if kind == "gaussian":
        y = x + np.float32(amount) * g.standard_normal(x.shape, dtype=np.float32)
    else:
        y = (g.poisson(x.astype(np.float64) * amount) / amount).astype(np.float32)
    return np.clip(y, 0.0, 1.0)


def jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    """A JPEG round trip with Pillow's encoder (4:2:0 chroma subsampling, its default)."""
    buf = io.BytesIO()
    Image.fromarray(_to_u8(x)).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as img:
        return _to_float(np.asarray(img.convert("RGB")))


def color_fade(x: np.ndarray, saturation: float, contrast: float, yellowing: float) -> np.ndarray:
    """Loss of saturation (towards per-pixel luma), of contrast (towards mean luma), and a warm cast."""
    luma = x @ LUMA
    y = luma[..., None] + (1.0 - saturation) * (x - luma[..., None])
    m = float((y @ LUMA).mean())
    y = m + (1.0 - contrast) * (y - m)
    y = y * (1.0 - yellowing * YELLOW_GAIN)
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def scratches(x: np.ndarray, strokes: tuple[Stroke, ...]) -> np.ndarray:
    """Thin straight strokes blended over the image: x <- x + opacity * coverage * (value - x)."""
    h, w = x.shape[:2]
    y = x.copy()
    for s in strokes:
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).line([(s.start[0] * w, s.start[1] * h), (s.end[0] * w, s.end[1] * h)],
                                  fill=255, width=s.width)
        a = (np.asarray(mask, np.float32) / 255.0 * s.opacity)[..., None]
        y = y + a * (s.value - y)
    return y


def grayscale(x: np.ndarray, apply: bool = True) -> np.ndarray:
    if not apply:
        return x
    return np.repeat((x @ LUMA)[..., None], 3, axis=2).astype(np.float32)


_NAME_OF = {Downsample: "downsample", Blur: "blur", Noise: "noise", Jpeg: "jpeg", ColorFade: "color_fade",
            Scratches: "scratches", Grayscale: "grayscale"}
_APPLY: dict[type, Callable[[np.ndarray, Any], np.ndarray]] = {
    Downsample: lambda x, p: downsample(x, p.factor, p.interpolation),
    Blur: lambda x, p: blur(x, p.sigma),
    Noise: lambda x, p: noise(x, p.kind, p.amount, p.seed),
    Jpeg: lambda x, p: jpeg(x, p.quality),
    ColorFade: lambda x, p: color_fade(x, p.saturation, p.contrast, p.yellowing),
    Scratches: lambda x, p: scratches(x, p.strokes),
    Grayscale: lambda x, p: grayscale(x, p.apply),
}

ImageLike = Union[np.ndarray, Image.Image]


def apply_params(image: ImageLike, params: DegradationParams) -> ImageLike:
    """Degrade an RGB image (uint8 [H, W, 3] array or PIL image) with drawn parameters; returns the same type."""
    is_pil = isinstance(image, Image.Image)
    arr = np.asarray(image.convert("RGB")) if is_pil else np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB array, got {arr.dtype} {arr.shape}")
    x = _to_float(arr)
    for p in params.ops:
        x = _APPLY[type(p)](x, p)
    out = _to_u8(x)
    return Image.fromarray(out) if is_pil else out


def degrade(image: ImageLike, cfg: DegradationConfig, seed: int, image_key: str, variant: int) -> ImageLike:
    """The control image of (image, variant): `apply_params(image, sample_params(cfg, seed, image_key, variant))`."""
    return apply_params(image, sample_params(cfg, seed, image_key, variant))


# ---------------------------------------------------------------------------------------------- parsing

_RANGE_KEYS = {  # key -> (integer?, min, max)
    "downsample": (False, 1.0, 64.0), "blur_sigma": (False, 0.0, 50.0), "noise_sigma": (False, 0.0, 1.0),
    "noise_peak": (False, 1e-3, 1e6), "jpeg_quality": (True, 1, 100), "fade_saturation": (False, 0.0, 1.0),
    "fade_contrast": (False, 0.0, 1.0), "fade_yellowing": (False, 0.0, 1.0), "scratches": (True, 0, 1000),
    "scratch_width": (True, 1, 64),
}
KEYS = ("ops", "variants", "seed", "interpolation", "noise_type", "grayscale_prob", *_RANGE_KEYS)


def _is_num(v: Any, integer: bool) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)


def _parse_range(name: str, raw: Any) -> tuple[tuple[Any, Any] | None, str | None]:
    integer, lo_ok, hi_ok = _RANGE_KEYS[name]
    kind = "integers" if integer else "numbers"
    if _is_num(raw, integer):
        raw = [raw, raw]  # a single value: fixed
    if not isinstance(raw, list) or len(raw) != 2 or not all(_is_num(v, integer) for v in raw):
        return None, f"expected [low, high] ({kind}) or one value, got {_show(raw)}"
    lo, hi = (int(v) for v in raw) if integer else (float(v) for v in raw)
    if lo > hi:
        return None, f"min > max: [{lo:g}, {hi:g}]; write [low, high]"
    if lo < lo_ok or hi > hi_ok:
        return None, f"must lie in [{lo_ok:g}, {hi_ok:g}], got [{lo:g}, {hi:g}]"
    return (lo, hi), None


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) < 60 else s[:57] + "..."


def _suggest(name: str, options: tuple[str, ...]) -> str:
    close = closest(name, options)
    return f"; did you mean {close}?" if close else f"; use one of {', '.join(options)}"


def _parse_ops(raw: Any, errors: list[str], spot: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [p.strip() for p in raw.split(",") if p.strip()]
    if not isinstance(raw, list) or not raw or not all(isinstance(o, str) for o in raw):
        errors.append(f"{spot}: expected a non-empty list of op names ({', '.join(OPS)}), got {_show(raw)}")
        return ()
    for op in raw:
        if op not in OPS:
            errors.append(f"{spot}: unknown op {op!r}{_suggest(op, OPS)}")
    for op in {o for o in raw if raw.count(o) > 1}:
        errors.append(f"{spot}: op {op!r} is listed twice")
    return tuple(raw)


def _parse_scalar(name: str, raw: Any) -> tuple[Any, str | None]:
    if name == "variants":
        ok = _is_num(raw, True) and raw >= 1
        return (raw, None) if ok else (None, f"expected an integer >= 1, got {_show(raw)}")
    if name == "seed":
        return (raw, None) if _is_num(raw, True) else (None, f"expected an integer, got {_show(raw)}")
    if name == "grayscale_prob":
        ok = _is_num(raw, False) and 0.0 <= raw <= 1.0
        return (float(raw), None) if ok else (None, f"expected a number in [0, 1], got {_show(raw)}")
    options = tuple(RESAMPLE) if name == "interpolation" else NOISE_TYPES
    if not isinstance(raw, str) or raw not in options:
        return None, f"expected one of {', '.join(options)}, got {_show(raw)}"
    return raw, None


def parse_degradation(table: Any, where: str, spot: Callable[[str], str] | None = None
                      ) -> tuple[DegradationConfig | None, list[str]]:
    """Check a `[degradation]` table; returns (config or None, one-line errors naming `where`.key).

    `spot(key)` names a key in messages (default "<where>.<key>"; the CLI passes "--degradation_<key>").
    """
    spot = spot or (lambda k: f"{where}.{k}")
    errors: list[str] = []
    if not isinstance(table, dict):
        return None, [f"{where}: expected a table, got {_show(table)}"]
    values: dict[str, Any] = {}
    for name, raw in table.items():
        if name not in KEYS:
            errors.append(f"{spot(name)}: unknown key{_suggest(name, KEYS)}")
        elif name == "ops":
            values["ops"] = _parse_ops(raw, errors, spot(name))
        else:
            value, err = _parse_range(name, raw) if name in _RANGE_KEYS else _parse_scalar(name, raw)
            if err:
                errors.append(f"{spot(name)}: {err}")
            else:
                values[name] = value
    if "ops" not in table:
        errors.append(f"{spot('ops')}: missing; list the ops in order, e.g. ops = [\"downsample\", \"noise\"]")
    ops = values.get("ops", ())
    used = {k for op in ops if op in _OP_KEYS for k in _OP_KEYS[op]}
    for name in table:
        owner = next((op for op, keys in _OP_KEYS.items() if name in keys), None)
        if owner is not None and name not in used and "ops" in values:
            errors.append(f"{spot(name)}: set, but {owner!r} is not in ops; add {owner!r} to ops or remove the key")
    if values.get("noise_type") == "poisson" and "noise_sigma" in table:
        errors.append(f"{spot('noise_sigma')}: not used with noise_type = \"poisson\"; set noise_peak instead")
    if errors:
        return None, errors
    return DegradationConfig(**values), []


def load_degradation_file(path: str | Path) -> DegradationConfig:
    """A TOML file with a `[degradation]` table (flux_restore.py --degrade); one UserError for every problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: degradation config not found")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    extra = [k for k in doc if k != "degradation"]
    if "degradation" not in doc or extra:
        what = f"unknown key {extra[0]!r}" if extra else "no [degradation] table"
        raise UserError(f"{path}: {what}; the file holds one [degradation] table (ops = [...], ranges)")
    cfg, errors = parse_degradation(doc["degradation"], "degradation")
    if errors:
        raise UserError("\n".join(f"{path}: {e}" for e in errors))
    assert cfg is not None
    return cfg


# ---------------------------------------------------------------------------------------------- CLI shorthand

CLI_PREFIX = "degradation_"  # --degradation_types a,b + --degradation_<key> for every other key


def cli_flag(key: str) -> str:
    return "--degradation_types" if key == "ops" else f"--{CLI_PREFIX}{key}"


def _cli_number(text: str, integer: bool) -> Any:
    try:
        return int(text) if integer else float(text)
    except ValueError:
        return text  # left as text: the parser reports it with the flag's name


def parse_cli_degradation(values: dict[str, Any]) -> tuple[DegradationConfig | None, list[str]]:
    """The `--degradation_*` flags the user gave (name -> value, unset ones absent or None) as one config.

    Ranges are written "low,high" or one value ("2,8", "0.5"); `--degradation_types` lists the ops.
    Returns (None, []) when no such flag was given.
    """
    given = {k[len(CLI_PREFIX):]: v for k, v in values.items() if k.startswith(CLI_PREFIX) and v is not None}
    if not given:
        return None, []
    table: dict[str, Any] = {}
    for key, raw in given.items():
        key = "ops" if key == "types" else key
        if key in _RANGE_KEYS and isinstance(raw, str):
            parts = [_cli_number(p.strip(), _RANGE_KEYS[key][0]) for p in raw.split(",")]
            raw = parts[0] if len(parts) == 1 else parts
        table[key] = raw
    return parse_degradation(table, "command line", spot=cli_flag)
