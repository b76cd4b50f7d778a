"""Image names <-> ids (both layouts), prompt files and the class-token map."""

from __future__ import annotations

import json

import pytest

from library.errors import UserError
from library.eval.names import image_name, parse_image_name
from library.eval.prompts import apply_class_tokens, load_eval_prompts, parse_class_token_map


def test_rendered_names_round_trip():
    for lora, step, pid, seed, strength in [("my_lora_v2", 500, "00", 42, 1.0), ("r4-cap", 8, "a-1", 0, 0.25),
                                            ("x", 0, "07", 3, -0.5)]:
        name = image_name(lora, step, pid, seed, strength)
        i = parse_image_name(name)
        assert (i.lora, i.step, i.prompt_id, i.seed, i.strength) == (lora, step, pid, seed, strength)
    assert image_name("anything", 99, "00", 1, 0) == "base_0_00_1_0.png"
    assert parse_image_name("base_0_00_1_0.png").is_base


def test_published_layout_uses_the_prompt_ids():
    i = parse_image_name("r16_1024_000500_03_img_v2.png", {"00", "03"})
    assert (i.lora, i.step, i.prompt_id, i.seed, i.strength) == ("r16_1024", 500, "03", None, None)
    with pytest.raises(UserError, match="holiday.png: image name does not follow"):
        parse_image_name("holiday.png", {"00"})
    with pytest.raises(UserError, match="'09' is not in p.json"):
        parse_image_name("lora_10_09_1_1.png", {"00"}, "p.json")


def test_prompt_files(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"00": "a dog", "x-1": "a cat"}))
    (tmp_path / "l.json").write_text(json.dumps(["a", "b"]))
    (tmp_path / "p.txt").write_text("# comment\na dog\n\na cat\n")
    (tmp_path / "p.toml").write_text('[prompts]\n00 = "a dog"\n01 = "a cat"\n')
    assert [(p.id, p.text) for p in load_eval_prompts(tmp_path / "p.json")] == [("00", "a dog"), ("x-1", "a cat")]
    assert [p.id for p in load_eval_prompts(tmp_path / "l.json")] == ["00", "01"]
    assert [(p.id, p.text) for p in load_eval_prompts(tmp_path / "p.txt")] == [("00", "a dog"), ("01", "a cat")]
    assert [p.id for p in load_eval_prompts(tmp_path / "p.toml")] == ["00", "01"]
    (tmp_path / "bad.json").write_text(json.dumps({"a_b": "x"}))
    with pytest.raises(UserError, match="'a_b'"):
        load_eval_prompts(tmp_path / "bad.json")
    (tmp_path / "bad.toml").write_text('[prompt]\n00 = "x"\n')
    with pytest.raises(UserError, match="unknown keys: prompt"):
        load_eval_prompts(tmp_path / "bad.toml")


def test_class_token_map():
    m = parse_class_token_map(["sks dog=a dog", "ohwx=a man"])
    assert apply_class_tokens("a photo of sks dog with ohwx", m) == "a photo of a dog with a man"
    with pytest.raises(UserError, match="TOKEN=replacement"):
        parse_class_token_map(["sks dog"])
