"""The project's SentencePiece tokenizer as a Hugging Face fast tokenizer (`tokenizer.json`).

`data_pipeline.tokenizer.Tokenizer` encodes text line by line, with the user-defined "\\n" piece between
lines, so every line starts with SentencePiece's word-start marker. The fast tokenizer reproduces that
without custom code: "\\n" is an added token, which the tokenizers library splits off *before*
normalisation, and the normaliser prepends "▁" to each remaining segment (as SentencePiece's dummy
prefix does per line). Unigram/BPE with byte fallback then gives the same ids.

Known differences, all on literal markup in the text: the strings "<s>", "</s>", "<pad>" and "<unk>"
become their special ids (SentencePiece spells them out), "<0xNN>" may become that byte piece, and with a
BPE model "[CLS]"/"[SEP]"/"[MASK]" get an extra "▁" around them.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import ProjectError

# sentencepiece_model.proto piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
NEWLINE = "\n"


def sentencepiece_to_hf(model_file: str | Path, model_max_length: int | None = None):
    """A transformers `PreTrainedTokenizerFast` that encodes like `data_pipeline.tokenizer.Tokenizer`."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as FastTokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, import_protobuf

    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception:
        raise ProjectError(f"not a SentencePiece model: {model_file}") from None
    pieces = list(proto.pieces)
    ids = {p.piece: i for i, p in enumerate(pieces)}
    if proto.trainer_spec.model_type == 1:  # unigram
        # SentencePiece never matches control/unknown/byte pieces in text: rank them below every real piece.
        lowest = min((p.score for p in pieces if p.type == NORMAL), default=0.0) - 1e4
        vocab = [(p.piece, p.score if p.type in (NORMAL, USER_DEFINED) else lowest) for p in pieces]
        model = models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=True)
    elif proto.trainer_spec.model_type == 2:  # bpe: merges recovered from the piece scores
        extracted = SentencePieceExtractor(str(model_file)).extract(models.BPE)
        model = models.BPE(extracted["vocab"], extracted["merges"], unk_token=proto.trainer_spec.unk_piece,
                           fuse_unk=True, byte_fallback=True)
    else:
        raise ProjectError(f"SentencePiece model {model_file}: only unigram and bpe models can be exported")

    fast = FastTokenizer(model)
    fast.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Undo the per-line "▁" prefix after each newline and at the start, as decoding line by line does.
    fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Replace("\n ", "\n"), decoders.Strip(" ", 1, 0)])
    user_defined = [p.piece for p in pieces if p.type == USER_DEFINED]
    if NEWLINE in ids:
        fast.add_tokens([AddedToken(NEWLINE, normalized=False, special=False)])
    if proto.trainer_spec.model_type == 2:  # BPE merges cannot reach user-defined pieces
        fast.add_tokens([AddedToken(p, normalized=False, special=False) for p in user_defined if p != NEWLINE])

    def piece(index: int) -> str | None:
        return pieces[index].piece if 0 <= index < len(pieces) else None

    spec = proto.trainer_spec
    return PreTrainedTokenizerFast(
        tokenizer_object=fast, bos_token=piece(spec.bos_id), eos_token=piece(spec.eos_id),
        unk_token=piece(spec.unk_id), pad_token=piece(spec.pad_id), clean_up_tokenization_spaces=False,
        model_max_length=model_max_length or int(1e30))
