"""A fixed character vocabulary (`data.tokenizer_type: char`): one token per character, nothing to train.

For the synthetic Bigram-Backcopy task (data_pipeline/bigram.py), whose rules are stated per character, and
for character-level runs on any text. Special ids are SentencePiece's here (pad 0, unk 1, bos 2, eos 3,
"\\n" 4, [CLS] 5, [SEP] 6, [MASK] 7), so packing, data.bos and masked-LM examples work unchanged; the
ALPHABET follows from id 8 on. Text is case-folded (Wikipedia's capitals map to the lower-case letter),
any other character outside the alphabet becomes unk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from data_pipeline.special_tokens import BOS_ID, CLS, EOS_ID, MASK, NEWLINE, PAD_ID, SEP, UNK_ID

# Space, lower-case letters, digits, the common punctuation and the accented letters of en/fr/es Wikipedia:
# 59 characters, 67 tokens with the specials (Guo et al. 2024's vocabulary size).
ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-/&%éèáíóúñç"
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", NEWLINE, CLS, SEP, MASK)
FIRST_CHAR_ID = len(SPECIALS)


class CharTokenizer:
    """Tokenizer's interface (encode, decode, special ids, vocab_size, fingerprint) over ALPHABET."""

    def __init__(self, alphabet: str = ALPHABET) -> None:
        if len(set(alphabet)) != len(alphabet) or NEWLINE in alphabet:
            raise ValueError("alphabet must hold distinct characters and no newline")
        self.alphabet = alphabet
        self.pieces = list(SPECIALS) + list(alphabet)
        self._ids = {ch: FIRST_CHAR_ID + i for i, ch in enumerate(alphabet)}
        self._ids[NEWLINE] = SPECIALS.index(NEWLINE)
        self.vocab_size = len(self.pieces)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
        self.newline_id = SPECIALS.index(NEWLINE)
        self.cls_id, self.sep_id, self.mask_id = SPECIALS.index(CLS), SPECIALS.index(SEP), SPECIALS.index(MASK)
        self.path = None  # nothing on disk
        # A BlockStream state records it: a resume with another alphabet is refused.
        self.fingerprint = hashlib.sha256(("char:" + "\x00".join(self.pieces)).encode()).hexdigest()[:16]

    def char_id(self, ch: str) -> int:
        """The id of one character (case-folded), unk outside the alphabet."""
        found = self._ids.get(ch)
        if found is None:
            found = self._ids.get(ch.lower(), self.unk_id)
        return found

    def encode(self, text: str) -> list[int]:
        return [self.char_id(ch) for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.pieces[i] if i >= FIRST_CHAR_ID or i == self.newline_id else ""
                       for i in (int(i) for i in ids) if 0 <= i < self.vocab_size)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
