"""(before, after) image pairs of a dataset subset: `image_dir` holds the "after" images and `before_dir`
the same-named "before" images (our extension, for differential LoRAs; see docs/differential.md).

Pairs are matched by file stem (`a.png` after pairs with `a.jpg` before). Every after image needs a
before partner and every before image an after partner, and the two must have the same size (read from
the headers only): a missing or mismatched partner is a user error that names the file. Captions always
come from the after side (`image_dir`), so both stages of a differential run see the same captions.
"""

from __future__ import annotations

from pathlib import Path

from library.data.images import BadImageError, list_images, read_size

AFTER, BEFORE = "after", "before"
SIDES = (AFTER, BEFORE)


def match_pairs(image_dir: Path, before_dir: Path, where: str, errors: list[str]) -> dict[Path, Path]:
    """{after image: before image}; problems are appended to `errors`, one line each, naming the file."""
    afters, befores = list_images(image_dir), list_images(before_dir)
    by_stem: dict[str, Path] = {}
    for b in befores:
        if b.stem in by_stem:
            errors.append(f"{b}: {where}.before_dir: two before images named {b.stem}.* ({by_stem[b.stem].name}); "
                          "keep one")
        by_stem.setdefault(b.stem, b)
    after_stems = {a.stem for a in afters}
    pairs = {}
    for a in afters:
        if a.stem in by_stem:
            pairs[a] = by_stem[a.stem]
        else:
            errors.append(f"{a}: {where}.before_dir: no before image named {a.stem}.* in {before_dir}")
    for b in befores:
        if b.stem not in after_stems:
            errors.append(f"{b}: {where}.before_dir: no after image named {b.stem}.* in {image_dir}")
    return pairs


def check_sizes(pairs: dict[Path, Path], errors: list[str]) -> None:
    """Both images of a pair must have the same (upright) size: the LoRAs learn pixel-aligned differences."""
    for after, before in pairs.items():
        try:
            sa, sb = read_size(after), read_size(before)
        except BadImageError as e:
            errors.append(str(e))
            continue
        if sa != sb:
            errors.append(f"{before}: before image is {sb[0]}x{sb[1]} but its after image {after} is "
                          f"{sa[0]}x{sa[1]}; a pair must have the same size")
