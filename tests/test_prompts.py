"""library/train/prompts.py: sample prompt lines and files (.txt, .toml, .json) in kohya's formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from library.errors import UserError
from library.train.prompts import load_prompts, parse_line


def test_prompt_line_syntax() -> None:
    got = parse_line("a cat, sitting --W 768 --h 512 --d 42 --s 30 --g 2.5 --l 4 --n blurry, dark", "f")
    assert got == {"prompt": "a cat, sitting", "width": "768", "height": "512", "seed": "42", "sample_steps": "30",
                   "guidance_scale": "2.5", "scale": "4", "negative_prompt": "blurry, dark"}
    with pytest.raises(UserError, match="unknown option --x"):
        parse_line("a --x 1", "f")


def test_prompt_files(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\n\na dog --w 100 --h 70 --d 3\nsecond --s 5000\n")
    a, b = load_prompts(txt)
    assert (a.prompt, a.width, a.height, a.seed, a.sample_steps) == ("a dog", 96, 64, 3, 20)
    assert b.sample_steps == 1000 and b.index == 1 and b.seed is None
    tml = tmp_path / "p.toml"
    tml.write_text('[prompt]\nwidth = 256\nsample_steps = 4\n[[prompt.subset]]\nprompt = "x"\n'
                   '[[prompt.subset]]\nprompt = "y"\nwidth = 512\n')
    assert [(p.prompt, p.width, p.sample_steps) for p in load_prompts(tml)] == [("x", 256, 4), ("y", 512, 4)]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["plain", {"prompt": "obj", "seed": 7, "guidance_scale": 1.0}]))
    got = load_prompts(js)
    assert got[0].prompt == "plain" and got[1].seed == 7 and got[1].guidance_scale == 1.0
    js.write_text('{"prompt": 1}')
    with pytest.raises(UserError, match="JSON list"):
        load_prompts(js)
