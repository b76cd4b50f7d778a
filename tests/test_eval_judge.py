"""The LLM-judge client against a local stub of an OpenAI-compatible endpoint (127.0.0.1 only, short
timeouts): retries after a 500, a timeout and a malformed answer, the on-disk cache, finished rows kept,
and a down endpoint that empties only the judge columns (the other metrics are written; notes say why)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.eval import judge as J
from library.eval.table import read_rows

REPO = Path(__file__).resolve().parents[1]
GOOD = {k: 0.5 + 0.05 * i for i, k in enumerate(J.QUESTIONS)}


def _reply(content: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


class Stub:
    """Answers requests from a script: each entry is 'ok', 'fence' (JSON inside ```), '500', 'slow', 'bad'."""

    def __init__(self, script: list[str]):
        self.script, self.requests = list(script), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((body, self.headers.get("Authorization")))
                action = stub.script.pop(0) if stub.script else "ok"
                if action == "500":
                    self.send_response(500)
                    self.end_headers()
                    return
                if action == "slow":
                    time.sleep(1.5)
                payload = {"bad": _reply("I think the image is nice."), "fence": _reply(
                    "```json\n" + json.dumps(GOOD) + "\n```")}.get(action, _reply(json.dumps(GOOD)))
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/chat/completions"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _cfg(url: str, tmp: Path, retries: int = 3) -> J.JudgeConfig:
    return J.JudgeConfig(url=url, model="stub-vlm", api_key="k123", timeout=0.5, retries=retries,
                         cache=tmp / "cache.jsonl", backoff=0.01)


def _image(tmp: Path, i: int) -> Path:
    p = tmp / f"base_0_0{i}_1_0.png"
    Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(p)
    return p


def test_retries_after_500_timeout_and_malformed(tmp_path):
    img = _image(tmp_path, 1)
    with Stub(["500", "slow", "bad", "fence"]) as stub:
        scores = J.ask(_cfg(stub.url, tmp_path, retries=4), img, "a photo of a dog")
    assert scores == pytest.approx(GOOD)
    assert len(stub.requests) == 4
    body, auth = stub.requests[0]
    assert auth == "Bearer k123" and body["model"] == "stub-vlm"
    assert body["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    with Stub(["500", "500"]) as stub, pytest.raises(J.JudgeError, match="HTTP 500 after 2"):
        J.ask(_cfg(stub.url, tmp_path, retries=2), img, "x")  # negative control: retries run out


def test_parse_answer_rejects_out_of_range_and_missing_keys():
    with pytest.raises(ValueError, match="judge_quality"):
        J.parse_answer(_reply(json.dumps({**GOOD, "judge_quality": 1.7})))
    with pytest.raises(ValueError, match="judge_limbs"):
        J.parse_answer(_reply(json.dumps({k: v for k, v in GOOD.items() if k != "judge_limbs"})))
    with pytest.raises(ValueError, match="chat-completions"):
        J.parse_answer(b"<html>")


def test_cache_and_rows_kept(tmp_path):
    from library.eval.score import Item
    from library.eval.names import parse_image_name

    items = [Item(p, parse_image_name(p.name), "a prompt") for p in (_image(tmp_path, i) for i in range(3))]
    rows = [{"file": it.path.name, "lora": "base", "hf_energy": 0.1} for it in items]
    out = tmp_path / "scores.csv"
    notes: dict = {}
    # the second image fails every retry (malformed): its cells stay empty, the others are kept
    with Stub(["ok", "bad", "bad", "ok"]) as stub:
        cols, rows = J.judge_rows(_cfg(stub.url, tmp_path, retries=2), items, rows, ["file", "lora", "hf_energy"],
                                  notes, out)
    assert [r.get("judge_prompt") for r in rows] == [GOOD["judge_prompt"], None, GOOD["judge_prompt"]]
    assert "1 of 3" in notes["judge_prompt"]
    # a rerun asks only for the missing image (two answers come from the cache)
    with Stub([]) as stub:
        rows2 = [{"file": it.path.name, "lora": "base"} for it in items]
        J.judge_rows(_cfg(stub.url, tmp_path), items, rows2, ["file", "lora"], {}, out)
    assert len(stub.requests) == 1 and all(r["judge_subject"] == GOOD["judge_subject"] for r in rows2)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_down_endpoint_keeps_other_metrics(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            images / f"lora_10_0{i}_1_1.png")
    (tmp_path / "p.json").write_text(json.dumps({"00": "a", "01": "b"}))
    out = tmp_path / "s.csv"
    cmd = [sys.executable, str(REPO / "flux_eval_lora.py"), "score", "--images", str(images), "--prompts",
           str(tmp_path / "p.json"), "--out", str(out), "--judge_url",
           f"http://127.0.0.1:{_closed_port()}/v1/chat/completions", "--judge_model", "m", "--judge_timeout", "2",
           "--judge_retries", "2", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    columns, rows = read_rows(out)
    assert "judge_quality" in columns and all(row["judge_quality"] is None for row in rows)
    assert all(row["grid16"] is not None for row in rows)
    notes = json.loads((tmp_path / "s_notes.json").read_text())
    assert "unreachable" in notes["judge_quality"]
