"""Corpus reading throughput (documents/s) for every form a corpus can take, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/read_corpus.py [--documents 20000] [--repeats 3]

The same synthetic documents (random words, 200 to 4,000 characters, about the size of web
pages in pretraining corpora) are written in each form, then streamed through the reader the
jobs use (``list_shards`` + ``iter_documents``: discovery, decompression, parsing, validation)
and timed, the median of ``--repeats`` passes after one warm-up. Two more rows put the figures
in context: the ``datasets`` library's own streaming JSON reader on the same ``.jsonl.gz``
(the peer a user would reach for), and reading plus tokenizing and batching with the embedded
demo's tokenizer (what a scoring unit does before its forward and backward passes). Scoring
itself runs at a few hundred documents/s on the demo (``python -m jobs.benchmark``), so a form
that reads faster than that by a wide margin is not the bottleneck.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution.data import batch_documents, iter_documents, list_shards
from tests.data.writers import FORMATS

WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were", "her", "she", "there", "been", "one", "all", "we", "their", "has", "would", "when", "if", "so", "no", "will", "more", "out", "up", "can", "said", "who", "about", "what", "also", "into", "its", "time", "only", "new", "some", "could", "these", "two", "may", "then", "do", "first", "any", "my", "now", "such", "like", "our", "over", "man", "me", "even", "most", "made", "after", "did", "many", "before", "must", "through", "back", "years", "where", "much", "your", "way", "well", "down"]


def synthetic_rows(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        length = int(rng.integers(200, 4000))
        words = rng.choice(WORDS, size=length // 4)
        rows.append({"id": f"doc-{index:07d}", "text": " ".join(words)[:length], "url": f"https://example.org/{index}"})
    return rows


def timed(passes: int, run: Callable[[], int]) -> tuple[float, int]:
    """Median seconds of ``passes`` runs after a warm-up, and the count one run returns."""
    count = run()
    seconds = []
    for _ in range(passes):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), count


def read_all(corpus: Path) -> int:
    return sum(1 for _ in iter_documents(list_shards(corpus), on_skip=lambda skip: None))


def datasets_streaming(corpus: Path) -> int:
    import datasets

    stream = datasets.load_dataset("json", data_files=str(corpus), split="train", streaming=True)
    return sum(1 for _ in stream)


def read_and_tokenize(corpus: Path, tokenizer) -> int:
    documents = iter_documents(list_shards(corpus), on_skip=lambda skip: None)
    return sum(len(batch.ids) for batch in batch_documents(tokenizer, documents, 8, 128, lambda skip: None))


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = synthetic_rows(args.documents)
    text_mb = sum(len(r["text"].encode()) for r in rows) / 1e6
    print(f"{args.documents} documents, {text_mb:.1f} MB of text; median of {args.repeats} passes after a warm-up\n")
    print("| form | on disk (MB) | documents/s | text MB/s |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        corpora = {form: writer(root / form.replace(".", "_"), rows) for form, writer in FORMATS.items()}
        for form, corpus in corpora.items():
            seconds, count = timed(args.repeats, lambda corpus=corpus: read_all(corpus))
            assert count == len(rows), (form, count)
            print(f"| {form} | {size_of(corpus) / 1e6:.1f} | {count / seconds:,.0f} | {text_mb / seconds:.0f} |")
        seconds, count = timed(args.repeats, lambda: datasets_streaming(corpora["jsonl.gz"]))
        print(f"| jsonl.gz, `datasets` streaming reader (peer) | {size_of(corpora['jsonl.gz']) / 1e6:.1f} | "
              f"{count / seconds:,.0f} | {text_mb / seconds:.0f} |")
        from transformers import AutoTokenizer

        from attribution.demo.train import ensure_demo

        tokenizer = AutoTokenizer.from_pretrained(ensure_demo().model_dir)
        for form in ("jsonl", "jsonl.zst"):
            seconds, count = timed(args.repeats, lambda form=form: read_and_tokenize(corpora[form], tokenizer))
            print(f"| {form} + tokenize and batch (demo tokenizer, 128 tokens) | {size_of(corpora[form]) / 1e6:.1f} | "
                  f"{count / seconds:,.0f} | {text_mb / seconds:.0f} |")


if __name__ == "__main__":
    main()
