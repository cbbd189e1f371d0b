"""CLI: train a SentencePiece tokenizer on a corpus, with the options load_or_train_tokenizer uses.

    python -m data_pipeline.train_tokenizer --source wiki_sample --language en --vocab-size 8192 --out tok.model
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

from data_pipeline.config import SOURCES, TOKENIZER_TYPES, DataConfig
from data_pipeline.tokenizer import Tokenizer, train_from_config
from data_pipeline.tokenizer import train_tokenizer as _train_tokenizer
from data_pipeline.writable import check_writable_dir, name_problem, writable_dir_problem
from common.cli import ArgumentParser, positive_int, run_command
from common.errors import ProjectError


def main(argv: list[str] | None = None) -> int:
    return run_command("data_pipeline.train_tokenizer", _main, argv)


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(
        prog="python -m data_pipeline.train_tokenizer",
        description="Train a SentencePiece tokenizer (byte fallback, pad/unk/bos/eos = 0/1/2/3).")
    parser.add_argument("--source", default="wiki_sample", choices=SOURCES)
    parser.add_argument("--language", default="en", help="wiki_sample: en, fr, es; wiki40b: its config name")
    parser.add_argument("--files", nargs="+", default=[],
                        help="source=files: train files or globs (.parquet/.jsonl/.txt)")
    parser.add_argument("--text-field", default="text", help="column holding the text (parquet/jsonl)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--type", dest="tokenizer_type", default="unigram", choices=TOKENIZER_TYPES)
    parser.add_argument("--sample-docs", type=int, default=20000, help="at most this many train documents")
    parser.add_argument("--cache-dir", default=".cache/data", help="where wiki_sample's parquet is cached")
    parser.add_argument("--out", required=True, help="output PATH.model (PATH.vocab is written beside it)")
    args = parser.parse_args(argv)
    cfg = DataConfig(source=args.source, language=args.language, train_files=args.files, text_field=args.text_field,
                     vocab_size=args.vocab_size, tokenizer_type=args.tokenizer_type,
                     tokenizer_sample_docs=args.sample_docs, cache_dir=args.cache_dir)
    start = time.perf_counter()
    for flag, value in (("--vocab-size", args.vocab_size), ("--sample-docs", args.sample_docs)):
        positive_int(flag, value, allow_none=False)
    cfg.validate()
    out = Path(args.out).absolute()
    prefix = out.with_suffix("") if out.suffix == ".model" else out
    # SentencePiece writes .<name>.tmp-<pid>-<8 hex>.model first (data_pipeline.tokenizer.train_tokenizer)
    longest = prefix.with_name(f".{prefix.name}.tmp-{'0' * 7}-{'0' * 8}.model")
    problem = writable_dir_problem(out.parent) or name_problem(out.parent, longest)
    if problem is None and any(Path(f"{prefix}{suffix}").is_dir() for suffix in (".model", ".vocab")):
        problem = f"{prefix}.model or {prefix}.vocab is a folder"
    if problem is not None:
        raise ProjectError(f"--out {args.out} cannot be written: {problem}")
    check_writable_dir(cfg.cache_dir, "--cache-dir")
    path, documents, name = train_from_config(cfg, args.out)
    tokenizer = Tokenizer(path)
    print(f"wrote {path}: {tokenizer.vocab_size} pieces ({cfg.tokenizer_type}) from {documents} documents "
          f"of {name} in {time.perf_counter() - start:.1f} s")
    return 0


class _CallableModule(types.ModuleType):
    # Importing this module rebinds the package attribute `data_pipeline.train_tokenizer` from the
    # function to this module; making the module callable keeps `from data_pipeline import
    # train_tokenizer; train_tokenizer(...)` working after such an import.
    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return _train_tokenizer(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
