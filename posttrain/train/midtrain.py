"""Mid-training: next-token training on plain text, as OLMo 2 describes it (stage 1, then an anneal).

Data. Each source (``datasets:``; a ``.txt`` file with one document per line, or records with a
``text`` field in any format ``posttrain.data.io`` reads) is tokenized once, streaming, into a flat
``uint32`` token file under ``output_dir/tokens/`` (documents separated by the tokenizer's EOS) and
memory-mapped, so a corpus larger than memory trains in constant memory. A row is a window of
``max_seq_length`` tokens at a fixed offset; positions restart after every EOS, so no token attends
across documents, and every token at a position > 0 is trained.

Mixing is by tokens: the ``fraction`` of a source is its share of the run's rows (``0.7`` and
``0.3``: 70% of the rows come from the first source), drawn with a seeded RNG and upsampling a small
source when needed; without fractions, every row of every source once.

Schedules: stage 1 is ``lr_scheduler_type: cosine`` with ``warmup_ratio`` (``cosine_min``: cosine down
to ``min_lr_ratio`` of the peak). The anneal continues from a stage-1 checkpoint (``model:``) with
``lr_scheduler_type: linear``, no warmup, and decays linearly to zero over ``total_tokens``;
``anneal_from: RUN_DIR`` starts it at the last learning rate of that run's ``metrics.jsonl``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
from pathlib import Path

import numpy as np

from posttrain.config import MidtrainConfig
from posttrain.data.io import read_records
from posttrain.errors import UserError
from posttrain.logprobs import collate
from posttrain.models import load_model, load_tokenizer
from posttrain.train.loop import Job, Result, RowSource, finished, train
from posttrain.train.sft import sft_objective
from posttrain.util import log


def _texts(path: str, split: str, name: str | None):
    if path.endswith(".txt"):
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{path}: file not found")
        with open(p, encoding="utf-8", errors="strict") as f:
            for line in f:
                if line.strip():
                    yield line.rstrip("\n")
        return
    for rec, where in read_records(path, split, name):
        text = rec.get("text")
        if not isinstance(text, str):
            raise UserError(f"{where}: field 'text' is missing or not a string")
        yield text


def tokenize_source(src, tokenizer, out_dir: Path, chunk: int = 1024) -> Path:
    """Tokenize one source into ``out_dir/<hash>.bin`` (skipped when it exists). Streams: memory is
    bounded by ``chunk`` documents."""
    key = hashlib.sha256(json.dumps([src.path, src.split, src.name, tokenizer.name_or_path, len(tokenizer)]).encode())
    path = out_dir / f"{key.hexdigest()[:16]}.bin"
    if path.is_file():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # every process of a run may write it: its own file
    eos = tokenizer.eos_token_id
    with open(tmp, "wb") as f:
        batch: list[str] = []
        for text in [*_texts(src.path, src.split, src.name), None]:
            if text is not None:
                batch.append(text)
            if batch and (text is None or len(batch) >= chunk):
                for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                    np.asarray(ids + [eos], dtype=np.uint32).tofile(f)
                batch = []
    if tmp.stat().st_size == 0:
        tmp.unlink()
        raise UserError(f"{src.path}: no text")
    tmp.replace(path)
    return path


class TokenRows:
    """The rows of a run as a lazy sequence: ``rows[i]`` reads one window from a memory-mapped token
    file. ``index`` lists (source, window) pairs in the mixed order."""

    def __init__(self, files: list[Path], index: list[tuple[int, int]], length: int, eos: int):
        self.tokens = [np.memmap(f, dtype=np.uint32, mode="r") for f in files]
        self.index, self.length, self.eos = index, length, eos

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        source, window = self.index[i]
        ids = self.tokens[source][window * self.length:(window + 1) * self.length].astype(np.int64)
        starts = np.ones(len(ids), dtype=bool)  # a document starts at 0 and after every EOS
        starts[1:] = ids[:-1] == self.eos
        steps = np.arange(len(ids))
        positions = steps - np.maximum.accumulate(np.where(starts, steps, 0))
        return {"input_ids": ids.tolist(), "labels_mask": [True] * len(ids), "position_ids": positions.tolist(),
                "num_samples": int(starts.sum())}


def mixed_index(windows: list[int], fractions: list[float | None], total_rows: int | None, seed: int) -> list[tuple[int, int]]:
    """(source, window) pairs: every window of every source when no fraction is given; otherwise
    ``round(fraction * total_rows)`` windows of each source (a seeded sample, repeated when larger)."""
    if all(f is None for f in fractions):
        return [(s, w) for s, n in enumerate(windows) for w in range(n)]
    if any(f is None for f in fractions):
        raise UserError("config: give 'fraction' for every midtrain source or for none")
    total = total_rows if total_rows else sum(windows)
    out = []
    for s, (n, f) in enumerate(zip(windows, fractions)):
        k = round(f * total / sum(fractions))
        rng = random.Random(f"{seed}:{s}")
        copies, rest = divmod(k, n)
        out += [(s, w) for _ in range(copies) for w in range(n)] + [(s, w) for w in rng.sample(range(n), rest)]
    return out


def last_learning_rate(run: str) -> float:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"anneal_from: {path} not found")
    rates = [json.loads(x)["learning_rate"] for x in path.read_text().splitlines() if '"learning_rate"' in x]
    if not rates:
        raise UserError(f"anneal_from: {path} has no learning_rate entries")
    return float(rates[-1])


def run_midtrain(cfg: MidtrainConfig) -> Result:
    if cfg.anneal_from:
        cfg.learning_rate = last_learning_rate(cfg.anneal_from)
    length = cfg.max_seq_length
    # a token budget sets the number of steps: total_rows // global batch (every process counted)
    total_rows = math.ceil(cfg.total_tokens / length) if cfg.total_tokens else None
    if (done := finished(cfg, "midtrain")) is not None:
        return done
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer.eos_token_id is None:
        raise UserError(f"{cfg.model}: the tokenizer has no EOS token to separate documents")
    tok_dir = Path(cfg.output_dir) / "tokens"
    files = [tokenize_source(src, tokenizer, tok_dir) for src in cfg.datasets]
    windows = [int(np.memmap(f, dtype=np.uint32, mode="r").shape[0]) // length for f in files]
    for src, n in zip(cfg.datasets, windows):
        if n == 0:
            raise UserError(f"{src.path}: fewer tokens than one row of max_seq_length={length}")
    index = mixed_index(windows, [s.fraction for s in cfg.datasets], total_rows, cfg.seed)
    rows = TokenRows(files, index, length, tokenizer.eos_token_id)
    used = [sum(1 for i, _ in index if i == k) for k in range(len(files))]
    lineage = [{"path": s.path, "split": s.split, "license": s.license, "windows": n, "rows_used": u, "tokens_file": str(f)}
               for s, n, u, f in zip(cfg.datasets, windows, used, files)]
    log(f"midtrain: {len(rows)} rows of {length} tokens from {len(files)} source(s); "
        f"{'anneal from lr ' + format(cfg.learning_rate, '.3g') if cfg.anneal_from else cfg.lr_scheduler_type}")
    model = load_model(cfg.model, cfg.dtype)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return train(cfg, model, tokenizer, Job("midtrain", RowSource(rows, lambda b: collate(b, pad), max_rows=total_rows),
                                            sft_objective("mean"), lineage, {"rows": len(rows), "row_tokens": length},
                                            texts=itertools.chain.from_iterable(_texts(s.path, s.split, s.name)
                                                                                for s in cfg.datasets)))
