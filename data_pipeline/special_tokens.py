"""Special token ids and pieces every tokenizer of this project shares (SentencePiece's ids, then the user
symbols): the trained SentencePiece models (tokenizer.py) and the fixed character vocabulary (char_tokenizer.py)."""

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NEWLINE = "\n"
CLS, SEP, MASK = "[CLS]", "[SEP]", "[MASK]"
USER_SYMBOLS = [NEWLINE, CLS, SEP, MASK]  # ids 4, 5, 6, 7
