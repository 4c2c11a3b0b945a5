"""The SentencePiece BPE tokenizer: deterministic training, lossless encoding, mask-aware decoding.

Conventions (see docs/data.md):

- Pieces: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` (EOS) = 2, then ``"\\n"`` as a user-defined piece
  (newlines survive, as one token), 256 byte pieces (``byte_fallback``: any character outside the
  learned pieces is spelled in UTF-8 bytes, so nothing ever becomes ``<unk>``), then merges.
- ``normalization_rule_name="identity"``, no dummy prefix, no whitespace collapsing: so
  ``decode(encode(text)) == text`` for every string (the data tool checks it for every document).
- The **mask id is V = piece count**, one past the last piece. It is not a piece: SentencePiece
  never emits it, and the model's output table (``model.padded_vocab`` > V) reserves the row.
- SentencePiece silently skips training sentences longer than ``max_sentence_length`` bytes, so
  :func:`split_long_line` cuts lines at whitespace below that first.
"""
from __future__ import annotations

import io
import re
from typing import Iterable, Sequence

import sentencepiece as spm

from mcd_scale.errors import InputError

MAX_LINE_BYTES = 4000
"""Training lines are cut below SentencePiece's 4192-byte max_sentence_length (which it skips
silently, losing that text from the vocabulary statistics)."""

_TRAIN_OPTIONS = dict(
    model_type="bpe",
    normalization_rule_name="identity",  # no NFKC: the text we train on is the text we decode to
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,  # indentation / double spaces become pieces, not bytes
    split_digits=True,
    byte_fallback=True,
    character_coverage=1.0,
    user_defined_symbols=["\n"],
    # Determinism: one thread, every sentence used, none shuffled or sampled.
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    max_sentence_length=4192,
    hard_vocab_limit=True,  # exactly the requested size, or a clear error
    minloglevel=2,
)


class TokenizerError(InputError):
    """Tokenizer training or loading failed; the message says why and what to change."""


def split_long_line(line: str, max_bytes: int = MAX_LINE_BYTES) -> list[str]:
    """Cut ``line`` into pieces of at most ``max_bytes`` UTF-8 bytes, at whitespace where possible.

    ``"".join(pieces) == line`` always (the whitespace stays at the end of the left piece); a run
    without whitespace longer than ``max_bytes`` is cut at a character boundary.
    """
    if max_bytes < 4:  # one UTF-8 character can take 4 bytes
        raise ValueError(f"max_bytes must be >= 4, got {max_bytes}")
    if len(line.encode("utf-8")) <= max_bytes:
        return [line]
    pieces: list[str] = []
    rest = line
    while len(rest.encode("utf-8")) > max_bytes:
        # Longest character prefix within the byte budget ("ignore" drops only a cut multi-byte char).
        head = rest[:max_bytes].encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
        cut = max((m.end() for m in re.finditer(r"\s+", head)), default=0) or len(head)
        pieces.append(rest[:cut])
        rest = rest[cut:]
    if rest:
        pieces.append(rest)
    return pieces


def training_lines(documents: Iterable[str]) -> Iterable[str]:
    """SentencePiece's training sentences: the non-empty lines of each document, long ones cut."""
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield from split_long_line(line)


def train_tokenizer(lines: Iterable[str], vocab_size: int) -> bytes:
    """Train a BPE model on ``lines`` deterministically; return the serialized model proto."""
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out,
                                       vocab_size=vocab_size, **_TRAIN_OPTIONS)
    except RuntimeError as exc:
        msg = str(exc)
        hint = re.search(r"<= (\d+)", msg)
        if "Vocabulary size" in msg and "too high" in msg and hint:
            raise TokenizerError(f"--vocab-size {vocab_size} is too large for this corpus; the corpus supports "
                                 f"at most {hint.group(1)} pieces (pass a smaller --vocab-size or more text)") from None
        raise TokenizerError(f"SentencePiece training failed: {msg}") from None
    return out.getvalue()


class Tokenizer:
    """A loaded SentencePiece model plus this project's conventions (EOS, mask id)."""

    def __init__(self, model_proto: bytes, source: str = "<bytes>") -> None:
        self.source = source
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # noqa: BLE001 - sentencepiece raises OSError/RuntimeError variously
            raise TokenizerError(f"'{source}' is not a SentencePiece model: {exc}") from None
        self.vocab_size: int = self.sp.get_piece_size()
        self.eos_id: int = self.sp.eos_id()
        self.mask_id: int = self.vocab_size  # one past the last piece; see the module docstring

    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        try:
            with open(path, "rb") as fh:
                return cls(fh.read(), source=path)
        except OSError as exc:
            raise TokenizerError(f"cannot read tokenizer '{path}': {exc} (run tools/prepare_data.py)") from None

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS added)."""
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int], *, eos_text: str = "\n\n", mask_text: str = "[MASK]") -> str:
        """Text of ``ids``. EOS becomes ``eos_text`` (a paragraph break by default) and the mask id
        ``mask_text``; SentencePiece itself would drop the first and reject the second."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id or i == self.mask_id:
                out.append(self.sp.decode(run))
                out.append(eos_text if i == self.eos_id else mask_text)
                run = []
            elif 0 <= i < self.vocab_size:
                run.append(i)
            else:
                raise TokenizerError(f"token id {i} is outside [0, {self.vocab_size}] for tokenizer '{self.source}'")
        out.append(self.sp.decode(run))
        return "".join(out)
