"""Averaging sharded checkpoints in bounded memory: peak resident memory and time of
``polyak average`` on Hugging Face folders, against the largest tensor, the model's size and
reading the inputs once, with mergekit's linear merge beside it (``make bench-checkpoints``).

The inputs are three random float32 checkpoints shaped like a Llama model (two large embedding
matrices, many smaller projection matrices, small norms), each a Hugging Face folder of
safetensors shards with its index and ``config.json``, written with ``safetensors`` and
``huggingface_hub``'s splitter (not with polyak). Each tool runs in a child process that reports
its own peak resident size (``VmHWM`` of ``/proc/self/status``, read at exit: ``wait4``'s
``ru_maxrss`` would include the resident size of this process, which a child has until it
calls ``exec``); this process also samples the child's anonymous and file-backed resident
memory (``RssAnon``, ``RssFile``) every 10 ms. Before each timed run the page cache is dropped
(``/proc/sys/vm/drop_caches``, as root) when that is allowed, so every run reads from the disk;
otherwise every run reads from a warm cache (the report says which). The times are compared
with reading the inputs once (``cat`` of the same files into ``/dev/null``) and with that plus
writing one checkpoint's bytes with an ``fsync`` (polyak fsyncs its output), measured in the same
run.

    python benchmarks/checkpoint_average.py [--dir /tmp/polyak-bench] [--layers 18] [--keep]
        [--mergekit-python PATH | --no-mergekit] [--json results.json]

mergekit (``pip install "polyak[merge]"``, or any Python with mergekit, ``--mergekit-python``;
``make bench-checkpoints`` makes a venv of its own for it)
runs ``mergekit-yaml`` with ``merge_method: linear``, ``normalize: true``, ``dtype: float32``,
the same shard size, no tokenizer and no model card; its output is compared tensor by tensor
with polyak's (max absolute difference).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

SHARD_SIZE = "500MB"
MB = 1 << 20

#: The child that runs polyak: the command line, then its own peak resident size.
POLYAK_CHILD = r"""
import re, sys
from polyak.cli import main
code = main(["average", *sys.argv[2:], "-o", sys.argv[1] + "/", "--max-shard-size", "{shard}", "-q"])
with open("/proc/self/status") as f:
    print("VmHWM", int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024)
sys.exit(code)
"""

#: The same child's start: Python, torch and polyak imported, no tensor read.
BASELINE_CHILD = r"""
import re
import polyak.cli
with open("/proc/self/status") as f:
    print("VmHWM", int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024)
"""

#: The child that runs mergekit-yaml, reporting its peak resident size when it exits.
MERGEKIT_CHILD = r"""
import atexit, re, sys
def report():
    with open("/proc/self/status") as f:
        print("VmHWM", int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024, flush=True)
atexit.register(report)
from mergekit.scripts.run_yaml import main
sys.argv = ["mergekit-yaml", *sys.argv[1:]]
main()
"""


def llama_layout(layers: int) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """Names and shapes of a Llama-shaped model (hidden 1536, MLP 4096, 12 heads, 4 KV heads,
    vocabulary 32000, untied head) and its config.json."""
    hidden, inter, heads, kv, vocab = 1536, 4096, 12, 4, 32000
    kv_dim = hidden // heads * kv
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    return shapes, config


def write_input(folder: Path, shapes: dict[str, tuple[int, ...]], config: dict[str, Any], seed: int) -> None:
    """A Hugging Face folder of random float32 weights, shard by shard (huggingface_hub plans
    the shards as save_pretrained does; safetensors writes them)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=SHARD_SIZE)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for name, keys in split.filename_to_tensors.items():
        shard = {k: torch.randn(shapes[k], generator=g) * 0.02 for k in keys}
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        del shard
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    os.replace(tmp, folder)


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache; False where that is not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


class Sampler(threading.Thread):
    """The largest RssAnon and RssFile of a running process, sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.anon, self.file = pid, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    text = f.read()
            except OSError:
                return
            for key in ("RssAnon", "RssFile"):
                m = re.search(key + r":\s+(\d+) kB", text)
                if m:
                    value = int(m.group(1)) * 1024
                    if key == "RssAnon":
                        self.anon = max(self.anon, value)
                    else:
                        self.file = max(self.file, value)
            time.sleep(0.01)


def run_child(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = Sampler(child.pid)
    sampler.start()
    out, err = child.communicate()
    wall = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({child.returncode}):\n{err[-3000:]}")
    hwm = [int(line.split()[1]) for line in out.splitlines() if line.startswith("VmHWM")]
    return {"seconds": wall, "peak_rss": hwm[-1], "peak_rss_anon": sampler.anon, "peak_rss_file": sampler.file}


def read_once(files: list[Path]) -> float:
    start = time.perf_counter()
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", *map(str, files)], stdout=null, check=True)
    return time.perf_counter() - start


def write_once(path: Path, size: int) -> float:
    """Seconds to write ``size`` bytes of random data to ``path`` and fsync it (what writing the
    output costs at least), the file removed after."""
    block = os.urandom(16 * MB)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(math.ceil(size / len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def max_abs_difference(a: Path, b: Path) -> tuple[float, int]:
    """The largest absolute difference between two folders' tensors, and how many were compared."""
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    wa, wb = where(a), where(b)
    if set(wa) != set(wb):
        raise RuntimeError(f"the outputs hold different tensors: {sorted(set(wa) ^ set(wb))[:5]}")
    worst = 0.0
    for k in wa:
        with safe_open(str(wa[k]), "pt") as fa, safe_open(str(wb[k]), "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst, len(wa)


def find_mergekit(given: str | None) -> str | None:
    if given:
        return given
    probe = subprocess.run([sys.executable, "-c", "import mergekit"], capture_output=True)
    return sys.executable if probe.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/polyak-bench"), help="where the checkpoints go")
    parser.add_argument("--layers", type=int, default=18, help="decoder layers (18: 2.2 GB per checkpoint)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (and reuse them next time)")
    parser.add_argument("--mergekit-python", help="a Python with mergekit installed (default: this one, if it has it)")
    parser.add_argument("--no-mergekit", action="store_true", help="leave mergekit out")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    shapes, config = llama_layout(args.layers)
    sizes = {k: math.prod(s) * 4 for k, s in shapes.items()}
    model = sum(sizes.values())
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if free < 6 * model:
        sys.exit(f"{args.dir}: {free / 1e9:.1f} GB free, {6 * model / 1e9:.1f} GB needed")
    inputs = [args.dir / f"ckpt-{i}" for i in range(3)]
    start = time.perf_counter()
    for i, folder in enumerate(inputs):
        if not folder.exists():
            write_input(folder, shapes, config, seed=i)
    print(f"inputs ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    files = sorted(p for f in inputs for p in f.glob("*.safetensors"))
    shards = len(files) // 3

    cold = drop_caches()
    cat = read_once(files)
    drop_caches()
    write = write_once(args.dir / "write-once.bin", model)
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "page_cache": "dropped before each run" if cold else "warm (dropping it is not allowed here)",
        "checkpoints": 3,
        "checkpoint_bytes": model,
        "shards_per_checkpoint": shards,
        "tensors": len(shapes),
        "largest_tensor_bytes": max(sizes.values()),
        "read_inputs_once_seconds": cat,
        "write_one_checkpoint_once_seconds": write,
    }

    out = args.dir / "polyak-out"
    shutil.rmtree(out, ignore_errors=True)
    drop_caches()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    results["polyak"] = run_child(
        [sys.executable, "-c", POLYAK_CHILD.replace("{shard}", SHARD_SIZE), str(out), *map(str, inputs)], env
    )
    results["polyak"]["output_shards"] = len(list(out.glob("*.safetensors")))
    results["polyak"]["peak_rss_at_start"] = run_child([sys.executable, "-c", BASELINE_CHILD], env)["peak_rss"]

    mergekit = None if args.no_mergekit else find_mergekit(args.mergekit_python)
    if mergekit is None:
        results["mergekit"] = "not run: mergekit is not installed (pip install 'polyak[merge]' or --mergekit-python)"
    else:
        mk_out = args.dir / "mergekit-out"
        shutil.rmtree(mk_out, ignore_errors=True)
        spec = {
            "merge_method": "linear",
            "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in inputs],
            "parameters": {"normalize": True},
            "dtype": "float32",
        }
        cfg = args.dir / "mergekit.yml"
        cfg.write_text(json.dumps(spec))  # JSON is YAML
        drop_caches()
        mk_env = {**env, "HF_HUB_OFFLINE": "1"}
        argv = [mergekit, "-c", MERGEKIT_CHILD, str(cfg), str(mk_out), "--out-shard-size", "500M"]
        argv += ["--no-copy-tokenizer", "--no-write-model-card"]
        results["mergekit"] = run_child(argv, mk_env)
        results["mergekit"]["output_shards"] = len(list(mk_out.glob("*.safetensors")))
        diff, n = max_abs_difference(out, mk_out)
        results["mergekit"]["max_abs_difference_vs_polyak"] = diff
        results["mergekit"]["tensors_compared"] = n
        if not args.keep:
            shutil.rmtree(mk_out, ignore_errors=True)
    if not args.keep:
        for f in inputs:
            shutil.rmtree(f, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)

    largest = results["largest_tensor_bytes"]
    print(
        f"3 checkpoints of {model / 1e9:.2f} GB ({shards} shards, {len(shapes)} tensors, largest "
        f"{largest / MB:.0f} MiB), float32; page cache {results['page_cache']}"
    )
    print(f"reading the inputs once (cat > /dev/null): {cat:.1f} s; writing one checkpoint + fsync: {write:.1f} s")
    rows = [("polyak", results["polyak"])]
    if isinstance(results["mergekit"], dict):
        rows.append(("mergekit", results["mergekit"]))
    for name, r in rows:
        peak = r["peak_rss"]
        print(
            f"{name:9s} {r['seconds']:6.1f} s ({r['seconds'] / cat:.2f}x reading once, "
            f"{r['seconds'] / (cat + write):.2f}x reading and writing once), peak RSS {peak / MB:.0f} MiB "
            f"= {peak / largest:.1f}x the largest tensor, {peak / model:.2f}x one checkpoint "
            f"(sampled RssAnon {r['peak_rss_anon'] / MB:.0f} MiB, RssFile {r['peak_rss_file'] / MB:.0f} MiB), "
            f"{r['output_shards']} shards"
        )
    start_rss = results["polyak"]["peak_rss_at_start"]
    grown = results["polyak"]["peak_rss"] - start_rss
    print(
        f"polyak's process holds {start_rss / MB:.0f} MiB once Python, torch and polyak are imported; averaging "
        f"added {grown / MB:.0f} MiB = {grown / largest:.1f}x the largest tensor"
    )
    if isinstance(results["mergekit"], dict):
        print(f"max |mergekit - polyak| = {results['mergekit']['max_abs_difference_vs_polyak']:.3g}")
    else:
        print(results["mergekit"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
