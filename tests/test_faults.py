"""Fault injection: a full disk at every write of a save, a kill between every pair of renames, a second
concurrent run, non-finite weights, damaged state folders. Each case checks the one-line message, that
the files the user had are byte-identical, that no temporary is left, and that a resume works (or is
refused clearly) afterwards.

The save machinery is driven directly with a small stand-in network (a few tensors, a real AdamW and
LambdaLR) where the behaviour does not depend on the model; whole runs use the tiny checkpoints.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library import atomic
from library.errors import UserError
from library.flux.safetensors_io import save_file_atomic
from library.train import checkpoint as C
from library.train.leftovers import clean_output_folder
from library.train.lock import acquire, release
from train_helpers import REPO, base_args, data  # noqa: F401 (data: a fixture)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if atomic.parse_temporary(p.name) or p.name.startswith(".tmp")]


def _parts(step: int) -> tuple[torch.nn.Module, C.StateParts]:
    torch.manual_seed(step)
    net = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    net(torch.randn(2, 8)).sum().backward()
    opt.step()
    ts = {"global_step": step, "loader": {"epoch": 0, "index": step, "seed": 1}, "record": {"steps": []},
          "total_steps": 10, "settings": {"optimizer_type": "AdamW"}}
    return net, C.StateParts(dict(net.state_dict()), opt, sched, [C.rng_state()], ts)


def _save(out: Path, step: int) -> None:
    net, parts = _parts(step)
    lora = out / "lora.safetensors"
    C.save_checkpoint(lora, lambda tmp: save_file_atomic({k: v.detach() for k, v in net.state_dict().items()}, tmp),
                      parts)


def _consistent(out: Path) -> int:
    """The published LoRA belongs to the published state (manifest) and `--resume` reads the state: its step."""
    state = C.load_state(out / "lora-state")
    assert state.train_state["lora"]["sha256"] == C.file_sha256(out / "lora.safetensors")
    lora = load_file(str(out / "lora.safetensors"))
    assert all(torch.equal(lora[k], state.network[k]) for k in lora)
    return state.train_state["global_step"]


# -- disk full ---------------------------------------------------------------------------------------------

def _count_writes(monkeypatch, action) -> int:
    calls = []
    real = atomic._write
    monkeypatch.setattr(atomic, "_write", lambda f, d: (calls.append(1), real(f, d)))
    action()
    monkeypatch.setattr(atomic, "_write", real)
    return len(calls)


def _full_at(monkeypatch, k: int) -> None:
    real, calls = atomic._write, []

    def write(f, data):
        calls.append(1)
        if len(calls) > k:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(atomic, "_write", write)


def test_disk_full_at_every_write_of_a_save_replaces_nothing(tmp_path: Path, monkeypatch) -> None:
    out, real = tmp_path / "out", atomic._write
    _save(out, 1)
    before = _snapshot(out)
    n = _count_writes(monkeypatch, lambda: _save(tmp_path / "probe", 2))
    assert n >= 6  # LoRA + 5 state files
    for k in range(n):
        _full_at(monkeypatch, k)
        with pytest.raises(UserError) as err:
            _save(out, 2)
        msg = str(err.value)
        assert "\n" not in msg and "disk full" in msg and "needs" in msg and "free" in msg, msg
        assert str(out) in msg
        assert _snapshot(out) == before, k  # byte-identical: nothing replaced
        assert _temporaries(out) == [], k
        monkeypatch.setattr(atomic, "_write", real)
    assert _consistent(out) == 1  # the old pair still resumes
    _save(out, 2)  # negative control: without the fault the save goes through
    assert _consistent(out) == 2


def test_disk_full_is_refused_before_writing_when_the_space_is_known(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(atomic, "free_bytes", lambda p: 1000)
    with pytest.raises(UserError, match=r"x\.safetensors: disk full: the write needs 0\.0 MB, 0\.0 MB free"):
        save_file_atomic({"a": torch.zeros(1000)}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_in_the_cache_and_text_writers(tmp_path: Path, monkeypatch) -> None:
    from library.data.cache import TensorCache

    cache = TensorCache(tmp_path / "cache", "latents")
    _full_at(monkeypatch, 0)
    with pytest.raises(UserError, match="disk full"):
        cache.put("ab" * 8, {"latents": torch.zeros(4, 2, 2)})
    with pytest.raises(UserError, match=r"c\.json: disk full"):
        atomic.write_text_atomic(tmp_path / "c.json", "{}")
    assert _temporaries(tmp_path) == [] and not (tmp_path / "c.json").exists()


def test_torch_and_safetensors_disk_full_texts_are_recognised() -> None:
    assert atomic.is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 123"))
    assert atomic.is_disk_full(Exception("Error while serializing: No space left on device (os error 28)"))
    assert not atomic.is_disk_full(RuntimeError("shape mismatch"))


# -- power loss: flushed before the rename, the folder after it ---------------------------------------------

def _record_syncs(monkeypatch) -> list[tuple[str, ...]]:
    """os.fsync (as the path its descriptor names), os.replace and os.rename calls, in order."""
    ops: list[tuple[str, ...]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd: int) -> None:
        ops.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def renamer(real):
        def rename(src, dst, **kw) -> None:
            ops.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
            real(src, dst, **kw)
        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", renamer(real_replace))
    monkeypatch.setattr(os, "rename", renamer(real_rename))
    return ops


def _check_durable(ops: list[tuple[str, ...]]) -> int:
    """Every rename onto a visible name follows an fsync of what it publishes (the file; a folder's files and
    the folder) and precedes an fsync of the folder it lands in; returns the number of such publishes."""
    publishes = [i for i, op in enumerate(ops) if op[0] == "rename" and not atomic.parse_temporary(Path(op[2]).name)]
    for i in publishes:
        src, dst = Path(ops[i][1]), Path(ops[i][2])
        synced = {op[1] for op in ops[:i] if op[0] == "fsync"}
        wanted = {str(src)} | ({str(src / f.name) for f in dst.iterdir()} if dst.is_dir() else set())
        assert wanted <= synced, (dst, sorted(wanted - synced))
        nxt = next((j for j in range(i + 1, len(ops)) if ops[j][0] == "rename"), len(ops))
        assert ("fsync", str(dst.parent)) in ops[i + 1: nxt], (dst, "folder not flushed after the rename")
    return len(publishes)


def test_every_publish_is_flushed_before_and_its_folder_after(tmp_path: Path, monkeypatch) -> None:
    """Before atomic_target flushed, a cache entry (and every other atomic_target write: samples, the loss plot,
    configs) was renamed into place unflushed: after a power loss its name could hold a zero-length file."""
    from library.data.cache import TensorCache

    out = tmp_path.resolve() / "out"
    _save(out, 1)  # the LoRA and a new state folder
    ops = _record_syncs(monkeypatch)
    _save(out, 2)  # the LoRA and a state folder replacing the first
    assert _check_durable(ops) == 2 and _consistent(out) == 2
    ops.clear()
    save_file_atomic({"a": torch.zeros(3)}, out / "plain.safetensors")
    assert _check_durable(ops) == 1
    ops.clear()
    TensorCache(out / "cache", "latents").put("ab" * 8, {"latents": torch.zeros(4, 2, 2)})
    assert _check_durable(ops) >= 1 and any(p.endswith(".safetensors") for _, _, p in
                                            [op for op in ops if op[0] == "rename"])


# -- kill between the renames ------------------------------------------------------------------------------

_KILL = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    from pathlib import Path
    import test_faults as T
    from library.train import checkpoint as C
    out, k = Path(sys.argv[1]), int(sys.argv[2])
    T._save(out, 1)
    real, n = C._rename, [0]
    def rename(a, b):
        if n[0] == k:
            os._exit(9)  # killed here: no finally, no clean-up
        n[0] += 1
        real(a, b)
    C._rename = rename
    T._save(out, 2)
""")


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_kill_between_renames_leaves_a_resumable_pair(tmp_path: Path, k: int) -> None:
    out = tmp_path / "out"
    code = _KILL.format(repo=str(REPO), tests=str(REPO / "tests"))
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(k)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == (9 if k < 3 else 0), proc.stderr
    # --resume works even before any clean-up (k == 1: only the two parked copies exist)
    assert C.load_state(out / "lora-state").train_state["global_step"] in (1, 2)
    clean_output_folder(out)
    assert _temporaries(out) == []
    step = _consistent(out)
    assert step == (1 if k == 0 else 2)  # once the new state is in place it wins; the LoRA follows it


# -- stale temporaries, only ours --------------------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_clean_up_removes_only_dead_runs_temporaries(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _save(out, 1)
    dead = _dead_pid()
    (out / f".lora-step00000002.safetensors.tmp{dead}").write_bytes(b"x" * 100)
    (out / f".lora-step00000002-state.tmp{dead}").mkdir()
    (out / "sample").mkdir()
    (out / "sample" / f".a.png.tmp{dead}").write_bytes(b"png")
    live = out / f".other.safetensors.tmp{os.getppid()}"  # a running process's file: kept
    live.write_bytes(b"y")
    user = [out / ".tmpnotes.txt", out / "notes.tmp1"]  # not our naming: kept
    for p in user:
        p.write_text("mine")
    clean_output_folder(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["lora.safetensors", "lora-state", "sample", live.name, ".tmpnotes.txt", "notes.tmp1"])
    assert list((out / "sample").iterdir()) == []


# -- a second run in the same folder -----------------------------------------------------------------------

def test_lock_refuses_a_second_holder_and_takes_over_a_stale_lock(tmp_path: Path) -> None:
    fd = acquire(tmp_path)
    info = json.loads((tmp_path / ".lock").read_text())
    assert info["pid"] == os.getpid()
    with pytest.raises(UserError, match=rf"another training run \(pid {os.getpid()} on .*--output_dir"):
        acquire(tmp_path)  # flock conflicts between open files, even in one process
    release(tmp_path, fd)
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": "h", "started": "then"}))
    release(tmp_path, acquire(tmp_path))  # a lock file nobody holds (killed run): taken over


def test_second_concurrent_training_run_is_refused(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"the first run's LoRA")
    fd = acquire(out)  # stands for a first run in progress
    try:
        proc = subprocess.run([sys.executable, str(REPO / "flux_train_network.py"),
                               *base_args(tiny_ckpts, data, out, "--max_train_steps", "1")],
                              cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        release(out, fd)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another training run" in errors[0] and "Traceback" not in proc.stderr
    assert (out / "lora.safetensors").read_bytes() == b"the first run's LoRA"
    assert sorted(p.name for p in out.iterdir()) == ["lora.safetensors"]  # nothing written (no config dump)


# -- damaged state folders (the --resume rows of the table) ------------------------------------------------

@pytest.fixture()
def state_dir(tmp_path: Path) -> Path:
    _save(tmp_path / "out", 1)
    return tmp_path / "out" / "lora-state"


@pytest.mark.parametrize("name, damage", [
    ("optimizer.pt", "truncate"), ("scheduler.pt", "truncate"), ("rng.pt", "truncate"),
    ("network.safetensors", "truncate"), ("train_state.json", "truncate"), ("train_state.json", "{}"),
    ("optimizer.pt", "garbage"),
])
def test_damaged_state_file_is_one_line_naming_it(state_dir: Path, name: str, damage: str) -> None:
    f = state_dir / name
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    elif damage == "{}":
        f.write_text("{}")
    else:
        f.write_bytes(os.urandom(300))
    with pytest.raises(UserError) as err:
        C.load_state(state_dir)
    msg = str(err.value)
    assert str(f) in msg and "--resume" in msg and "\n" not in msg, msg


def test_intact_state_loads(state_dir: Path) -> None:  # the control of the damaged cases
    assert C.load_state(state_dir).train_state["global_step"] == 1


def test_resume_with_another_optimizer_is_refused_before_models_load(state_dir: Path) -> None:
    from library.train.resume_settings import check_optimizer_matches

    saved = C.read_train_state(state_dir)["settings"]
    check_optimizer_matches(saved, "AdamW", str(state_dir))
    with pytest.raises(UserError, match="trained with --optimizer_type AdamW, this run asks for Lion"):
        check_optimizer_matches(saved, "Lion", str(state_dir))


def test_optimizer_change_without_recorded_settings_is_caught_from_the_param_groups(state_dir: Path) -> None:
    from library.train.resume_settings import check_param_groups

    saved = C.load_state(state_dir).optimizer["param_groups"]
    p = [torch.nn.Parameter(torch.zeros(2))]
    check_param_groups(saved, torch.optim.AdamW(p).state_dict()["param_groups"], "s")
    with pytest.raises(UserError, match="another optimizer"):
        check_param_groups(saved, torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True).state_dict()["param_groups"],
                           "s")


# -- hostile safetensors headers (every reader goes through read_header) -----------------------------------

def _hostile(path: Path, header: object) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 16)
    return path


@pytest.mark.parametrize("header, needle", [
    ({"a": {"dtype": "F32", "shape": [2]}}, "'data_offsets' must be [begin, end], got None"),
    ({"a": [1, 2]}, "expected {dtype, shape, data_offsets}, got list"),
    ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype 'Q7'"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "needs 12 bytes, data_offsets give 8"),
    ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "'shape' must be a list of sizes"),
    ({"__metadata__": {"k": 1}}, "__metadata__ must map names to strings"),
])
def test_malformed_headers_are_one_line(tmp_path: Path, header: object, needle: str) -> None:
    from library.flux.safetensors_io import read_header

    with pytest.raises(UserError) as err:
        read_header(_hostile(tmp_path / "h.safetensors", header))
    assert needle in str(err.value) and str(tmp_path / "h.safetensors") in str(err.value)


def test_a_well_formed_header_passes(tmp_path: Path) -> None:  # the control
    from library.flux.safetensors_io import read_header

    header = {"__metadata__": {"k": "v"}, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    assert read_header(_hostile(tmp_path / "h.safetensors", header))["a"]["shape"] == [2, 2]


def test_truncated_cache_entry_under_skip_cache_check_is_one_line(tmp_path: Path) -> None:
    from library.data.cache import TensorCache

    cache = TensorCache(tmp_path / "c", "latents", skip_check=True)
    key = "cd" * 8
    cache.put(key, {"latents": torch.ones(4, 8, 8)})
    f = cache.file(key)
    f.write_bytes(f.read_bytes()[:-50])
    assert cache.has(key)  # trusted without a look, as --skip_cache_check asks
    with pytest.raises(UserError, match="truncated.*delete it to re-encode"):
        cache.get(key)


def test_cache_clean_up_removes_dead_and_foreign_temporaries_only(tmp_path: Path) -> None:
    from library.data.cache import TensorCache

    cache = TensorCache(tmp_path / "c", "latents")
    cache.put("ef" * 8, {"latents": torch.ones(1)})
    folder = cache.file("ef" * 8).parent
    dead, live = folder / f".x.safetensors.tmp{_dead_pid()}", folder / f".y.safetensors.tmp{os.getppid()}"
    st = folder / ".tmpAb12Cd"  # safetensors' own temporary (older versions wrote them)
    for p in (dead, live, st):
        p.write_bytes(b"x")
    assert cache.remove_stale_temporaries() == 2
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, cache.file("ef" * 8).name])


def test_our_safetensors_writer_produces_safetensors_own_bytes(tmp_path: Path) -> None:
    """The streaming writer (one write seam, no `.tmpXXXXXX` of safetensors' own) is byte-identical to
    safetensors.torch.save, for every dtype, empty and 0-d tensors, with and without metadata."""
    from safetensors.torch import save

    from library.flux.safetensors_io import serialize

    g = torch.Generator().manual_seed(0)
    t = {"b": torch.randn(3, generator=g).bfloat16(), "a": torch.arange(5), "z": torch.zeros(2, dtype=torch.float16),
         "s": torch.tensor(1.5), "c": torch.randn(2, 3, generator=g), "bo": torch.tensor([True, False]),
         "u": torch.tensor([1], dtype=torch.uint8), "i8": torch.tensor([-1], dtype=torch.int8),
         "d": torch.randn(2, generator=g).double(), "i32": torch.tensor([3], dtype=torch.int32),
         "f8": torch.randn(3, generator=g).to(torch.float8_e4m3fn), "e": torch.zeros(0, 3)}
    for md in ({"k": "v"}, None):
        size, chunks = serialize(t, md)
        ours = b"".join(bytes(c) for c in chunks)
        assert ours == save(t, md) and size == len(ours)
    save_file_atomic(t, tmp_path / "x.safetensors", {"k": "v"})
    assert (tmp_path / "x.safetensors").read_bytes() == save(t, {"k": "v"})
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


# -- hostile data and names --------------------------------------------------------------------------------

def test_an_absurd_png_is_refused_from_its_header(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from library.data import images

    Image.new("L", (1, 400000)).save(tmp_path / "tall.png")  # ~1.6 KB on disk
    Image.new("L", (10, 640)).save(tmp_path / "ok.png")
    assert (tmp_path / "tall.png").stat().st_size < 4000
    monkeypatch.setattr(images.Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(images.BadImageError, match=r"1x400000 pixels: sides above 32768"):
        images.read_size(tmp_path / "tall.png")
    monkeypatch.undo()
    assert images.read_size(tmp_path / "ok.png") == (10, 640)  # the control: 1:64 is still accepted


def test_dataset_resolution_beyond_16384_is_a_config_error(tmp_path: Path) -> None:
    from library.data.config import load_dataset_config

    (tmp_path / "d.toml").write_text('[[datasets]]\nresolution = 100000\n[[datasets.subsets]]\nimage_dir = "x"\n')
    with pytest.raises(UserError, match="expected sizes of at most 16384, got 100000x100000"):
        load_dataset_config(tmp_path / "d.toml", check_paths=False)


def test_broken_and_looping_links_in_an_image_folder_are_counted(tmp_path: Path, caplog) -> None:
    from PIL import Image

    from library.data.images import list_images

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    with caplog.at_level("WARNING"):
        assert list_images(tmp_path) == [tmp_path / "a.png"]
    assert "2 image name(s) are broken or looping symbolic links" in caplog.text


@pytest.mark.parametrize("flags, needle", [
    (["--output_name", "../escaped/x"], "--output_name '../escaped/x': must be a plain file name"),
    (["--network_args", "rank_dropout=2"], "rank_dropout=2: must be a probability in [0, 1)"),
    (["--network_args", "module_dropout=nan"], "module_dropout=nan: must be a probability"),
])
def test_names_and_network_args_out_of_range(flags: list[str], needle: str) -> None:
    from library.train.cli import parse_args
    from library.train.config import build_config
    from library.train.models import network_kwargs
    from networks.lora_args import parse_network_args

    with pytest.raises(UserError) as err:
        parse_network_args(network_kwargs(build_config(parse_args(flags))))
    assert needle in str(err.value)


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path: Path, monkeypatch, caplog) -> None:
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING"):
        fd = acquire(tmp_path)
    assert fd is None and "cannot lock the output folder (No locks available)" in caplog.text
    release(tmp_path, fd)


def test_disk_full_while_writing_a_png_is_one_line(tmp_path: Path, monkeypatch) -> None:
    from library.train.reporting import LossRecord, draw_loss_plot

    record = LossRecord()
    for step in range(1, 4):
        record.add(step, 1.0 / step)
    _full_at(monkeypatch, 0)
    with pytest.raises(UserError, match=r"loss\.png: disk full"):
        draw_loss_plot(record, tmp_path / "loss.png")
    assert list(tmp_path.iterdir()) == []


def test_a_hostile_header_is_one_line_in_the_trainer_and_the_tools(tiny_ckpts, data: Path, tmp_path: Path) -> None:
    import flux_train_network
    from networks import convert_flux_lora, verify_lora

    bad = _hostile(tmp_path / "bad.safetensors", {"a": {"dtype": "F32", "shape": [2]}})  # no data_offsets
    args = base_args(tiny_ckpts, data, tmp_path / "out")
    args[args.index("--ae") + 1] = str(bad)
    for call in (lambda: flux_train_network.main(args),
                 lambda: flux_train_network.main([*base_args(tiny_ckpts, data, tmp_path / "out"),
                                                  "--network_weights", str(bad)]),
                 lambda: verify_lora.main([str(bad)]),
                 lambda: convert_flux_lora.main(["--src_path", str(bad), "--dst_path", str(tmp_path / "c.safetensors"),
                                                 "--dst", "diffusers"])):
        with pytest.raises(UserError, match=r"bad\.safetensors: not a valid safetensors file: tensor 'a': "
                                            r"'data_offsets'"):
            call()
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.safetensors").exists()
