"""Sharded checkpoints in and out, in bounded memory (docs/checkpoints-at-scale.md).

Hugging Face folders are written here by transformers' own ``save_pretrained`` or by
``huggingface_hub``'s splitter and ``safetensors``; DCP folders by
``torch.distributed.checkpoint.save`` and ``polyak.distributed.save`` in one process (no process
group). Outputs are loaded back with ``from_pretrained``, ``safetensors`` and torch, and compared
with float64 averages computed here. Every refused input writes nothing: no output and no
temporary folder beside it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import polyak
import polyak.distributed
from polyak import files
from polyak.cli import main
from polyak.files import FormatError


def make_state(seed: int, *, big: int = 64, small: int = 12, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A few large tensors and many small ones, an integer counter and a BatchNorm statistic."""
    g = torch.Generator().manual_seed(seed)
    state = {"embed.weight": torch.randn(big, 32, generator=g).to(dtype)}
    for i in range(small):
        state[f"layers.{i}.weight"] = torch.randn(8, 8, generator=g).to(dtype)
        state[f"layers.{i}.bias"] = torch.randn(8, generator=g).to(dtype)
    state["head.weight"] = torch.randn(big, 32, generator=g).to(dtype)
    state["bn.running_var"] = torch.rand(8, generator=g).to(dtype)
    state["bn.num_batches_tracked"] = torch.tensor(100 + seed)
    return state


def expected(states: list[dict[str, Tensor]], weights: list[float] | None = None) -> dict[str, Tensor]:
    weights = weights or [1.0] * len(states)
    total = sum(weights)
    out = {}
    for k, last in states[-1].items():
        if last.is_floating_point():
            out[k] = sum(w / total * s[k].double() for w, s in zip(weights, states, strict=True)).to(last.dtype)
        else:
            out[k] = last
    return out


def assert_same(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        if want[k].dtype in (torch.bfloat16, torch.float16):  # one rounding of a float64 sum
            torch.testing.assert_close(got[k], want[k])
        elif want[k].is_floating_point():
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0)
        else:
            assert torch.equal(got[k], want[k]), k


def hf_save(folder: Path, state: dict[str, Tensor], max_shard_size: int | str = 4000) -> Path:
    """A Hugging Face folder as ``save_pretrained`` writes one, with huggingface_hub's splitter."""
    from huggingface_hub import split_torch_state_dict_into_shards

    folder.mkdir(parents=True)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for name, keys in split.filename_to_tensors.items():
        save_file({k: state[k].contiguous() for k in keys}, str(folder / name), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def dcp_save(folder: Path, state: dict) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def read_folder(folder: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        part = load_file(str(f))
        assert not set(part) & set(out), f"{f.name} repeats a tensor"
        out.update(part)
    return out


def run(*argv: object) -> int:
    return main([str(a) for a in argv])


def error(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    assert run(*argv, "-q") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def leftovers(parent: Path) -> list[str]:
    """Temporary files or folders of a write that did not finish."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old")))


# -- Hugging Face folders out --------------------------------------------------------------------


def test_a_sharded_output_loads_with_from_pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three real models saved by save_pretrained in shards, averaged into a folder of several
    shards with config.json, generation_config.json and the tokenizer's file copied: it loads
    with from_pretrained (a local folder, no hub) and with safetensors, and holds the average."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.GPT2Config(
        vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    folders, states = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config)
        model.save_pretrained(tmp_path / f"run{seed}", max_shard_size="40KB")
        (tmp_path / f"run{seed}" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32 + seed}))
        folders.append(tmp_path / f"run{seed}")
        states.append(read_folder(tmp_path / f"run{seed}"))
    assert (folders[0] / "model.safetensors.index.json").is_file()

    out = tmp_path / "soup"
    assert run("average", *folders, "-o", f"{out}/", "--max-shard-size", "50KB", "-q") == 0
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) >= 3
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", n) for n in shards)
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json"} <= set(
        names
    )
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 34  # the last input's
    index = json.loads((out / "model.safetensors.index.json").read_text())
    want = expected(states)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    assert set(index["weight_map"]) == set(want) and set(index["weight_map"].values()) == set(shards)
    assert all((out / n).stat().st_size <= 50_000 + 1000 for n in shards)  # header aside
    assert_same(read_folder(out), want)

    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    got = loaded.state_dict()
    for k, t in want.items():
        torch.testing.assert_close(got[k], t, rtol=1e-6, atol=0)
    assert got["lm_head.weight"].data_ptr() == got["transformer.wte.weight"].data_ptr()  # still tied
    assert run("inspect", out, "--json", "-q") == 0


def test_one_shard_is_model_safetensors_and_single_files_work_as_before(tmp_path: Path) -> None:
    states = [make_state(i) for i in range(2)]
    paths = [hf_save(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    assert run("average", *paths, "-o", f"{tmp_path / 'one'}/", "-q") == 0  # default: 50GB shards
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]
    assert_same(load_file(str(tmp_path / "one" / "model.safetensors")), expected(states))
    for name in ("avg.safetensors", "avg.pt"):
        assert run("average", *paths, "-o", tmp_path / name, "-q") == 0
    assert_same(load_file(str(tmp_path / "avg.safetensors")), expected(states))
    assert_same(torch.load(tmp_path / "avg.pt", weights_only=True)["state_dict"], expected(states))


def test_an_existing_folder_as_output_is_replaced_whole(tmp_path: Path) -> None:
    states = [make_state(i) for i in range(2)]
    paths = [hf_save(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    out = tmp_path / "out"
    assert run("average", *paths, "-o", f"{out}/", "--max-shard-size", "3KB", "-q") == 0
    many = sorted(p.name for p in out.iterdir())
    assert len(many) > 3
    assert run("average", *paths, "-o", out, "-q") == 0  # an existing folder: no slash needed
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]  # the old shards are gone
    assert leftovers(tmp_path) == []


def test_the_output_folder_s_mode_is_not_the_temporary_folder_s(tmp_path: Path) -> None:
    states = [make_state(i) for i in range(2)]
    paths = [hf_save(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    old = os.umask(0o022)
    try:
        assert run("average", *paths, "-o", f"{tmp_path / 'out'}/", "-q") == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


# -- DCP in --------------------------------------------------------------------------------------


def test_a_dcp_checkpoint_written_by_torch_is_read_one_tensor_at_a_time(tmp_path: Path) -> None:
    """dcp.save of a training checkpoint ({"model", "optimizer", "step"}): the weights are the
    keys under model. (found by default, or --key model); the rest is never read."""
    states = [make_state(i) for i in range(3)]
    folders = []
    for i, s in enumerate(states):
        optimizer = {"state": {k: {"exp_avg": torch.zeros_like(v)} for k, v in s.items() if v.is_floating_point()}}
        folders.append(dcp_save(tmp_path / f"dcp{i}", {"model": s, "optimizer": optimizer, "step": 10 * i}))
    reader = files.open_weights(folders[0])
    assert isinstance(reader, files.DCPFolder) and reader.where == "model"
    assert reader.keys() == list(states[0])
    assert torch.equal(reader.read("embed.weight"), states[0]["embed.weight"])
    buffer = torch.empty(1 << 16, dtype=torch.uint8)
    view = reader.read("layers.3.weight", buffer)
    assert view.data_ptr() == buffer.data_ptr() and torch.equal(view, states[0]["layers.3.weight"])
    assert run("average", *folders, "-o", tmp_path / "a.safetensors", "-q") == 0
    assert_same(load_file(str(tmp_path / "a.safetensors")), expected(states))
    assert run("average", *folders, "--key", "model", "-o", tmp_path / "b.safetensors", "-q") == 0
    assert_same(load_file(str(tmp_path / "b.safetensors")), expected(states))


def test_a_dcp_checkpoint_written_by_polyak_distributed_save(tmp_path: Path) -> None:
    """polyak.distributed.save needs no process group: {"average": state_dict()} is written in
    one process, and its weights are the keys under average.module."""
    states = []
    folders = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
        ema = polyak.ExponentialMovingAverage(model, momentum=0.5)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update_parameters(model)
        polyak.distributed.save(ema, tmp_path / f"ema{seed}")
        folders.append(tmp_path / f"ema{seed}")
        states.append({k: v.clone() for k, v in ema.module.state_dict().items()})
    reader = files.open_weights(folders[0])
    assert reader.where == "average.module (polyak.distributed.save)" and reader.keys() == list(states[0])
    assert run("average", *folders, "-o", f"{tmp_path / 'out'}/", "-q") == 0
    assert_same(load_file(str(tmp_path / "out" / "model.safetensors")), expected(states))
    # export: the average of a DCP training checkpoint, to a Hugging Face folder (averaged-model format)
    assert run("export", folders[0], "-o", f"{tmp_path / 'exported'}/", "--max-shard-size", "100", "-q") == 0
    assert_same(read_folder(tmp_path / "exported"), states[0])
    assert len(list((tmp_path / "exported").glob("*.safetensors"))) > 1
    # convert: polyak's checkpoint format from the DCP folder (read into memory)
    assert run("convert", folders[0], "-o", tmp_path / "c.pt", "--class", "ExponentialMovingAverage", "-q") == 0
    converted = torch.load(tmp_path / "c.pt", weights_only=True)
    assert_same(converted["state_dict"], states[0])
    assert converted["polyak"]["averages"]["average"]["steps"] == 1


def test_inspect_describes_both_kinds_of_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
    ema = polyak.ExponentialMovingAverage(model, momentum=0.5)
    ema.update_parameters(model)
    polyak.distributed.save(ema, tmp_path / "ema")
    capsys.readouterr()
    assert run("inspect", tmp_path / "ema", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["read_with"] == "dcp" and info["folder"]["kind"] == "dcp"
    assert info["format"] == "averaged-model" and info["averages"][0]["averages"]["average"]["steps"] == 1
    assert info["tensors"] == 8 and info["folder"]["weight_tensors"] == 7
    assert run("inspect", tmp_path / "ema") == 0
    text = capsys.readouterr().out
    assert "torch.distributed.checkpoint folder" in text and "restricted unpickler" in text

    paths = [hf_save(tmp_path / f"m{i}", make_state(i)) for i in range(2)]
    assert run("average", *paths, "-o", f"{tmp_path / 'soup'}/", "--max-shard-size", "3KB", "-q") == 0
    for target in (tmp_path / "soup", tmp_path / "soup" / "model.safetensors.index.json"):
        capsys.readouterr()
        assert run("inspect", target, "--json") == 0
        info = json.loads(capsys.readouterr().out)
        assert info["format"] == "polyak-average" and info["folder"]["kind"] == "hf-folder"
        assert info["metadata"]["format"] == "pt" and info["metadata"]["polyak_format"] == "polyak-average"
        assert info["averages"][0]["averages"]["average"]["description"] == "the uniform average of 2 checkpoints"


# -- mixing kinds ----------------------------------------------------------------------------------


def test_a_dcp_folder_a_hugging_face_folder_and_a_file_are_averaged_together(tmp_path: Path) -> None:
    states = [make_state(i) for i in range(4)]
    inputs = [
        dcp_save(tmp_path / "dcp", {"model": states[0], "step": 1}),
        hf_save(tmp_path / "hf", states[1], max_shard_size=2000) / "model.safetensors.index.json",
        tmp_path / "c.pt",
        tmp_path / "d.safetensors",
    ]
    torch.save({"state_dict": states[2], "epoch": 3}, inputs[2])
    save_file(states[3], str(inputs[3]))
    written = files.average_checkpoints(
        inputs, tmp_path / "out", folder=True, max_shard_size=3000, weights=[1, 2, 3, 4]
    )
    assert written.folder and len(written.files) > 1 and written.tensors == len(states[0])
    assert_same(read_folder(tmp_path / "out"), expected(states, [1, 2, 3, 4]))
    taken = {"model", "model.safetensors.index.json (4 shards)", "state_dict", "safetensors"}
    assert json.loads(written.metadata["taken_from"]) == sorted(taken)
    assert run("average", *inputs, "--weights", "1,2,3,4", "-o", tmp_path / "o.safetensors", "-q") == 0
    assert_same(load_file(str(tmp_path / "o.safetensors")), expected(states, [1, 2, 3, 4]))


def test_bf16_inputs_and_the_buffers_option(tmp_path: Path) -> None:
    states = [make_state(i, dtype=torch.bfloat16) for i in range(3)]
    inputs = [hf_save(tmp_path / "a", states[0]), dcp_save(tmp_path / "b", {"model": states[1]}), tmp_path / "c.pt"]
    torch.save(states[2], inputs[2])
    assert run("average", *inputs, "--buffers", "last", "-o", f"{tmp_path / 'out'}/", "-q") == 0
    got = read_folder(tmp_path / "out")
    want = expected(states)
    want["bn.running_var"] = states[2]["bn.running_var"]
    assert_same(got, want)


# -- memory ----------------------------------------------------------------------------------------

MEASURE = """
import re, sys
import torch, polyak.files as files
if sys.argv[1] == "baseline":  # the same code, imports included, with no large tensor read
    for path in sys.argv[3:]:
        source = files.open_weights(path)
        source.read(min(source.keys(), key=source.nbytes))
else:
    files.average_checkpoints(sys.argv[3:], sys.argv[2], folder=True, max_shard_size="64MB")
with open("/proc/self/status") as f:
    print(int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) * 1024)
"""


def _peak_rss(*argv: object) -> int:
    """The peak resident size of a child process running MEASURE, in bytes: its own ``VmHWM``
    (``wait4``'s ``ru_maxrss`` would include the resident size of this process, which the
    child had until it ran ``exec``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *map(str, argv)], env=env, capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1])


@pytest.mark.timeout(120)
def test_peak_memory_stays_near_one_tensor_per_input(tmp_path: Path) -> None:
    """Three 200 MB checkpoints (a Hugging Face folder of 4 shards, a DCP folder, a safetensors
    file; the largest tensor 8 MB) averaged into a folder of 64 MB shards: the child's peak
    resident size grows by a few times the largest tensor over that of a child that opens the
    same inputs and reads one small tensor of each (the same imports), far below the 200 MB
    model (inputs that stayed mapped would add up to 600 MB)."""
    largest = 2 << 20  # elements: 8 MB in float32
    g = torch.Generator().manual_seed(0)
    state = {f"big.{i}": torch.randn(largest, generator=g) for i in range(16)}  # 128 MB
    state.update({f"small.{i}": torch.randn(36_000, generator=g) for i in range(500)})  # 72 MB
    size = sum(t.numel() * 4 for t in state.values())
    assert 195e6 < size < 215e6
    hf_save(tmp_path / "hf", state, max_shard_size=60_000_000)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) == 4
    for t in state.values():
        t.mul_(-1)
    dcp_save(tmp_path / "dcp", {"model": state})
    save_file(state, str(tmp_path / "c.safetensors"))
    del state

    inputs = [tmp_path / "hf", tmp_path / "dcp", tmp_path / "c.safetensors"]
    base = _peak_rss("baseline", tmp_path / "out", *inputs)
    peak = _peak_rss("average", tmp_path / "out", *inputs)
    growth = peak - base
    assert growth < 6 * largest * 4 + (32 << 20), f"peak {peak >> 20} MB, baseline {base >> 20} MB"
    assert growth < size / 2, f"peak {peak >> 20} MB, baseline {base >> 20} MB"
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 4


# -- safety: each refusal names the problem and writes nothing ------------------------------------


def _two_inputs(tmp_path: Path) -> list[Path]:
    """Two Hugging Face folders of 4 shards each."""
    return [hf_save(tmp_path / f"m{i}", make_state(i), max_shard_size=3000) for i in range(2)]


def _refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, inputs: list[Path], match: str) -> None:
    out = tmp_path / "out"
    message = error(capsys, "average", *inputs, "-o", f"{out}/")
    assert re.search(match, message), message
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(FormatError, match=match):
        files.average_checkpoints(inputs, out, folder=True)
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_missing_shard_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _two_inputs(tmp_path)
    (b / "model.safetensors.index.json").unlink()
    (b / "model-00002-of-00004.safetensors").unlink()
    _refused(capsys, tmp_path, [a, b], r"shard model-00002-of-00004\.safetensors is missing")


def test_an_index_that_names_a_file_not_present_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _two_inputs(tmp_path)
    (b / "model-00003-of-00004.safetensors").unlink()
    _refused(capsys, tmp_path, [a, b], r"names shard model-00003-of-00004\.safetensors, which is not in the folder")


def test_an_index_that_reaches_outside_its_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _two_inputs(tmp_path)
    index = json.loads((b / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../m0/model-00001-of-00004.safetensors"
    (b / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(capsys, tmp_path, [a, b], r"which is not a file name in the folder")


def test_a_tensor_in_two_shards_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _two_inputs(tmp_path)
    first = b / "model-00001-of-00004.safetensors"
    part = load_file(str(first))
    part["head.weight"] = make_state(5)["head.weight"]
    save_file(part, str(first))
    _refused(capsys, tmp_path, [a, b], r"tensor 'head\.weight' is in two shards")
    (b / "model.safetensors.index.json").unlink()  # without an index too
    _refused(capsys, tmp_path, [a, b], r"tensor 'head\.weight' is in two shards")


def test_a_shape_that_differs_between_inputs_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = hf_save(tmp_path / "a", make_state(0))
    b = dcp_save(tmp_path / "b", {"model": make_state(1, big=65)})
    _refused(capsys, tmp_path, [a, b], r"tensor 'embed\.weight' has shape \(64, 32\) in .*a but \(65, 32\) in .*b")


def test_a_metadata_file_that_does_not_parse_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = hf_save(tmp_path / "a", make_state(0))
    b = dcp_save(tmp_path / "b", {"model": make_state(1)})
    (b / ".metadata").write_bytes(b"\x80\x04not a pickle")
    _refused(capsys, tmp_path, [a, b], r"\.metadata does not parse as torch\.distributed\.checkpoint metadata")
    (b / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    _refused(capsys, tmp_path, [a, b], r"\.metadata does not parse .*: the file is dict, not Metadata")


def test_a_metadata_file_that_asks_to_run_code_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = hf_save(tmp_path / "a", make_state(0))
    b = dcp_save(tmp_path / "b", {"model": make_state(1)})
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    (b / ".metadata").write_bytes(pickle.dumps(Payload()))
    _refused(capsys, tmp_path, [a, b], r"the file is posix\.system, not Metadata")
    assert not marker.exists()


def test_a_dcp_file_name_outside_the_folder_or_too_short_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = hf_save(tmp_path / "a", make_state(0))
    b = dcp_save(tmp_path / "b", {"model": make_state(1)})
    (data,) = b.glob("*.distcp")
    raw = (b / ".metadata").read_bytes()
    assert data.name.encode() in raw
    (b / ".metadata").write_bytes(raw.replace(data.name.encode(), b"../" + data.name.encode()[3:]))
    _refused(capsys, tmp_path, [a, b], r"not a file in the folder")
    (b / ".metadata").write_bytes(raw)
    with open(data, "r+b") as f:
        f.truncate(100)
    _refused(capsys, tmp_path, [a, b], r"is 100 bytes, but .* puts a chunk")


@pytest.mark.timeout(60)
def test_a_fifo_among_shards_is_refused_by_name_never_opened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _two_inputs(tmp_path)
    shard = b / "model-00002-of-00004.safetensors"
    shard.unlink()
    os.mkfifo(shard)  # opening it would block for ever
    _refused(capsys, tmp_path, [a, b], r"model-00002-of-00004\.safetensors is a FIFO")
    (b / "model.safetensors.index.json").unlink()
    _refused(capsys, tmp_path, [a, b], r"model-00002-of-00004\.safetensors is a FIFO")
    c = dcp_save(tmp_path / "c", {"model": make_state(1)})
    (data,) = c.glob("*.distcp")
    data.unlink()
    os.mkfifo(data)
    _refused(capsys, tmp_path, [a, c], r"\.distcp is a FIFO")
    (c / ".metadata").unlink()
    os.mkfifo(c / ".metadata")
    _refused(capsys, tmp_path, [a, c], r"\.metadata is a FIFO")


def test_an_output_folder_that_is_an_input_inside_one_or_holding_one_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _two_inputs(tmp_path)
    before = sorted(p.name for p in b.iterdir())
    for out, match in (
        (f"{b}/", "is one of the inputs"),
        (b, "is one of the inputs"),
        (f"{b}/sub/", "is inside the input"),
        (f"{tmp_path}/", "holds the input"),
        (b / "avg.safetensors", "is inside the input"),
    ):
        message = error(capsys, "average", a, b, "-o", out)
        assert match in message, message
    assert sorted(p.name for p in b.iterdir()) == before
    index = b / "model.safetensors.index.json"
    assert "is one of the inputs" in error(capsys, "average", a, index, "-o", f"{b}/")


def test_an_existing_folder_holding_other_files_is_not_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _two_inputs(tmp_path)
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    message = error(capsys, "average", a, b, "-o", out)
    assert "holds more than a model folder (notes.txt)" in message
    assert (out / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []
    assert "end it with / to write a Hugging Face folder" in error(capsys, "average", a, b, "-o", tmp_path / "new")


def test_an_interrupted_write_leaves_no_folder(tmp_path: Path) -> None:
    a, b = _two_inputs(tmp_path)
    seen = []

    def progress(items, n):  # type: ignore[no-untyped-def]
        for item in items:
            seen.append(item[0])
            if len(seen) == 10:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        files.average_checkpoints([a, b], tmp_path / "out", folder=True, max_shard_size=2000, progress=progress)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_bad_sizes_are_refused_before_anything_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _two_inputs(tmp_path)
    assert "max_shard_size" in error(capsys, "average", a, b, "-o", f"{tmp_path / 'o'}/", "--max-shard-size", "5XB")
    assert files.parse_size("2GB") == 2 * 10**9 and files.parse_size("1GiB") == 1 << 30
    assert not (tmp_path / "o").exists()


def test_shards_are_planned_as_save_pretrained_plans_them() -> None:
    """huggingface_hub's splitter (what save_pretrained calls) and polyak's plan agree."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state = make_state(0)
    state["huge"] = torch.zeros(3000)  # larger than a shard: a shard of its own, numbered where it comes
    order = list(state)
    state = {k: state[k] for k in [*order[:5], "huge", *order[5:-1]]}
    for limit in (1000, 3000, 10_000, 10**9):
        split = split_torch_state_dict_into_shards(state, max_shard_size=limit)
        layout = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        plan = files.plan_shards(layout, limit)
        assert {name: keys for name, keys in plan} == split.filename_to_tensors


def test_the_peers_install_no_command_that_averages_checkpoints() -> None:
    """README's row on sharded checkpoints: the console scripts the installed peers install
    (torch: torchrun, torchfrtrace; diffusers: diffusers-cli; Lightning: fabric; mmengine and
    ema-pytorch: none) and the subcommands of diffusers-cli (its ``commands`` modules) and fabric
    (``@_main.command`` in its ``cli.py``), read without importing them: none averages or merges
    checkpoints, and Lightning's ``fabric consolidate`` joins a sharded checkpoint into one file."""
    import importlib.metadata as md
    import importlib.util
    import pkgutil

    scripts = {}
    for dist in ("torch", "mmengine-lite", "ema-pytorch", "diffusers", "lightning"):
        try:
            found = md.distribution(dist)
        except md.PackageNotFoundError:
            pytest.skip(f"{dist} is not installed")
        scripts[dist] = sorted(e.name for e in found.entry_points if e.group == "console_scripts")
    assert scripts["mmengine-lite"] == [] and scripts["ema-pytorch"] == []
    assert "diffusers-cli" in scripts["diffusers"] and "fabric" in scripts["lightning"]
    diffusers = importlib.util.find_spec("diffusers")
    lightning = importlib.util.find_spec("lightning")
    assert diffusers is not None and diffusers.origin and lightning is not None and lightning.origin
    commands = {m.name for m in pkgutil.iter_modules([str(Path(diffusers.origin).parent / "commands")])}
    source = (Path(lightning.origin).parent / "fabric" / "cli.py").read_text()
    commands |= set(re.findall(r"@_main\.command\(\s*\"?(\w*)", source))
    assert "consolidate" in commands and "env" in commands
    names = commands | {n for names in scripts.values() for n in names}
    assert not [n for n in names if re.search("averag|merge|soup", n, re.IGNORECASE)]
