"""Tokenizers: one interface, two kinds, one resolver.

Contract (every tool that encodes or decodes goes through this; see docs/data.md):

- :class:`TextTokenizer` is the interface. Attributes: ``kind`` (``"sentencepiece"`` or ``"hf"``), ``name``
  (what it was loaded from), ``vocab_size`` V (every id the tokenizer can emit is < V), ``bos_id``,
  ``eos_id``, ``pad_id`` (ints; ``pad_id`` falls back to ``eos_id``), ``mask_id`` = V (one past the last
  piece: never emitted, the model reserves the row), ``files`` (name -> absolute path of the files a run
  must carry to reproduce the tokenizer). Methods: ``encode(texts) -> list[np.ndarray]`` (no BOS/EOS
  added), ``decode(ids) -> str`` (EOS as a paragraph break, the mask id as ``[MASK]``, BOS and pad as
  nothing), ``save(directory)`` (copies ``files`` there).
- Kinds: :class:`SentencePieceTokenizer` (the project's own model, trained by tools/prepare_data.py;
  ``Tokenizer`` is its old name and stays) and :class:`HFTokenizer` (a Hugging Face ``tokenizer.json``
  directory, loaded offline through ``tokenizers``; a hub name such as ``gpt2`` through ``transformers``
  where the machine is online).
- :func:`load_tokenizer` is the one resolver: a prepared data directory (its manifest's ``tokenizer``
  entry), a run directory (``config.resolved.yaml`` -> ``data.path``), a tokenizer directory, a
  ``tokenizer.model`` file, an exported HF directory, or a hub name. A bad source raises
  :class:`TokenizerError` with one line naming it and the fix.

SentencePiece conventions:

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
import json
import os
import re
import shutil
from typing import Iterable, Optional, Sequence

import numpy as np
import sentencepiece as spm
import yaml

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


def _as_ids(ids) -> list[int]:
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


class TextTokenizer:
    """The interface (see the module docstring). Subclasses set the attributes and ``_encode``/``_decode_run``."""

    kind: str = ""
    name: str = ""
    vocab_size: int = 0
    bos_id: int = -1
    eos_id: int = -1
    pad_id: int = -1
    files: dict[str, str] = {}

    @property
    def mask_id(self) -> int:
        return self.vocab_size  # one past the last piece; the model's padded vocabulary reserves the row

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text as int32 arrays (no BOS/EOS added)."""
        raise NotImplementedError

    def _decode_run(self, ids: list[int]) -> str:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], *, eos_text: str = "\n\n", mask_text: str = "[MASK]") -> str:
        """Text of ``ids``: EOS becomes ``eos_text`` (a paragraph break by default), the mask id ``mask_text``,
        BOS and pad (when not EOS) nothing; the runs between them are decoded by the tokenizer itself."""
        out: list[str] = []
        run: list[int] = []
        for i in _as_ids(ids):
            if i == self.eos_id or i == self.mask_id or i == self.bos_id or i == self.pad_id:
                out.append(self._decode_run(run))
                run = []
                out.append(eos_text if i == self.eos_id else mask_text if i == self.mask_id else "")
            elif 0 <= i < self.vocab_size:
                run.append(i)
            else:
                raise TokenizerError(f"token id {i} is outside [0, {self.vocab_size}] for tokenizer '{self.name}'")
        out.append(self._decode_run(run))
        return "".join(out)

    def save(self, directory: str) -> dict[str, str]:
        """Copy :attr:`files` into ``directory``; returns name -> path of the copies."""
        os.makedirs(directory, exist_ok=True)
        copied = {}
        for fname, src in sorted(self.files.items()):
            dst = os.path.join(directory, fname)
            if os.path.abspath(src) != os.path.abspath(dst):
                tmp = dst + ".tmp"
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            copied[fname] = dst
        return copied

    def describe(self) -> dict:
        """The manifest's tokenizer entry (without file digests)."""
        return {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "mask_id": self.mask_id}


class SentencePieceTokenizer(TextTokenizer):
    """A loaded SentencePiece model plus this project's conventions (EOS, mask id)."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str = "<bytes>") -> None:
        self.source = self.name = source
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # noqa: BLE001 - sentencepiece raises OSError/RuntimeError variously
            raise TokenizerError(f"'{source}' is not a SentencePiece model: {exc}") from None
        self.vocab_size: int = self.sp.get_piece_size()
        self.eos_id: int = self.sp.eos_id()
        self.bos_id: int = self.sp.bos_id()
        pad = self.sp.pad_id()
        self.pad_id: int = pad if 0 <= pad < self.vocab_size else self.eos_id
        self.files = {"tokenizer.model": os.path.abspath(source)} if os.path.isfile(source) else {}

    @classmethod
    def from_file(cls, path: str) -> "SentencePieceTokenizer":
        try:
            with open(path, "rb") as fh:
                return cls(fh.read(), source=path)
        except OSError as exc:
            raise TokenizerError(f"cannot read tokenizer '{path}': {exc} (run tools/prepare_data.py)") from None

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.sp.encode(list(texts))]

    def _decode_run(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def decode(self, ids: Sequence[int], *, eos_text: str = "\n\n", mask_text: str = "[MASK]") -> str:
        """As :meth:`TextTokenizer.decode`; SentencePiece itself would drop EOS and reject the mask id."""
        return super().decode(ids, eos_text=eos_text, mask_text=mask_text)


Tokenizer = SentencePieceTokenizer  # the old name (tools and tests written before the hf kind)

HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""The files of an HF tokenizer directory that a run carries (those present; tokenizer.json required)."""


def _token_content(value) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(TextTokenizer):
    """A Hugging Face fast tokenizer (``tokenizer.json``), run through ``tokenizers`` directly: the same ids
    as ``transformers.AutoTokenizer`` with ``add_special_tokens=False``, without its per-call overhead."""

    kind = "hf"

    def __init__(self, backend, name: str, special: dict, files: dict[str, str]) -> None:
        self.backend = backend
        self.name = name
        self.files = dict(files)
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))

        def tid(key: str) -> Optional[int]:
            content = _token_content(special.get(key))
            return None if content is None else backend.token_to_id(content)

        eos = tid("eos_token")
        if eos is None:  # BERT-style: [SEP] closes a sequence, [CLS] opens it
            eos = tid("sep_token")
            special.setdefault("bos_token", special.get("cls_token"))
        if eos is None:  # GPT-2-style files without a config: the document separator is the EOS
            for content in ("<|endoftext|>", "</s>", "<eos>"):
                eos = backend.token_to_id(content)
                if eos is not None:
                    break
        if eos is None:
            raise TokenizerError(f"tokenizer '{name}' names no EOS token (add \"eos_token\" to its "
                                 "tokenizer_config.json)")
        bos = tid("bos_token")
        pad = tid("pad_token")
        self.eos_id = int(eos)
        self.bos_id = int(bos) if bos is not None else self.eos_id  # GPT-2: <|endoftext|> is both
        self.pad_id = int(pad) if pad is not None else self.eos_id

    @classmethod
    def from_dir(cls, directory: str) -> "HFTokenizer":
        # lazy: loads tokenizers; importing this module does not need it
        import tokenizers

        path = os.path.join(directory, "tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as exc:  # noqa: BLE001 - tokenizers raises its own Exception subclass
            raise TokenizerError(f"cannot load '{path}' as a Hugging Face tokenizer: {' '.join(str(exc).split())[:200]}"
                                 ) from None
        special: dict = {}
        for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
            p = os.path.join(directory, fname)
            if os.path.isfile(p):
                try:
                    with open(p, encoding="utf-8") as fh:
                        special.update({k: v for k, v in json.load(fh).items() if k.endswith("_token")})
                except (OSError, ValueError) as exc:
                    raise TokenizerError(f"cannot read '{p}': {exc}") from None
        files = {f: os.path.abspath(os.path.join(directory, f)) for f in HF_FILES
                 if os.path.isfile(os.path.join(directory, f))}
        return cls(backend, os.path.abspath(directory), special, files)

    @classmethod
    def from_hub(cls, name: str) -> "HFTokenizer":
        """A hub name (``gpt2``) through transformers and the HF cache; needs the network the first time."""
        try:
            # lazy: loads transformers; importing this module does not need it
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(name)
            backend = hf.backend_tokenizer
        except Exception as exc:  # noqa: BLE001 - offline, unknown name, slow-only tokenizer
            raise TokenizerError(f"tokenizer '{name}' is neither a file, a directory nor a loadable hub name "
                                 f"({' '.join(str(exc).split())[:160]}); pass a tokenizer directory holding "
                                 "tokenizer.json, a tokenizer.model, a prepared data or run directory") from None
        special = {k: getattr(hf, k, None) for k in ("bos_token", "eos_token", "pad_token", "cls_token", "sep_token")}
        tok = cls(backend, name, special, {})
        tok._hub = hf
        return tok

    def save(self, directory: str) -> dict[str, str]:
        if not self.files and getattr(self, "_hub", None) is not None:  # a hub tokenizer: write its files once
            os.makedirs(directory, exist_ok=True)
            self._hub.save_pretrained(directory)
            self.files = {f: os.path.join(directory, f) for f in HF_FILES if os.path.isfile(os.path.join(directory, f))}
            return dict(self.files)
        return super().save(directory)

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32)
                for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def _decode_run(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False) if ids else ""


def load_tokenizer(source: str) -> TextTokenizer:
    """The tokenizer named by ``source`` (see the module docstring for what it may be)."""
    if not source:
        raise TokenizerError("no tokenizer given: pass a prepared data directory, a run directory, a tokenizer "
                             "directory (tokenizer.json) or a tokenizer.model file")
    if os.path.isdir(source):
        manifest = os.path.join(source, "manifest.json")
        if os.path.isfile(manifest):
            try:
                with open(manifest, encoding="utf-8") as fh:
                    entry = json.load(fh).get("tokenizer") or {}
            except (OSError, ValueError) as exc:
                raise TokenizerError(f"cannot read '{manifest}': {exc}") from None
            rel = entry.get("path")
            if not isinstance(rel, str) or not os.path.exists(os.path.join(source, rel)):
                raise TokenizerError(f"'{manifest}' names no tokenizer file present in '{source}' (tokenizer.path "
                                     f"{rel!r}); re-run tools/prepare_data.py --out {source}")
            return load_tokenizer(os.path.join(source, rel))
        if os.path.isfile(os.path.join(source, "tokenizer.json")):
            return HFTokenizer.from_dir(source)
        if os.path.isfile(os.path.join(source, "tokenizer.model")):
            return SentencePieceTokenizer.from_file(os.path.join(source, "tokenizer.model"))
        resolved = os.path.join(source, "config.resolved.yaml")
        if os.path.isfile(resolved):
            try:
                with open(resolved, encoding="utf-8") as fh:
                    data_path = ((yaml.safe_load(fh) or {}).get("data") or {}).get("path")
            except (OSError, yaml.YAMLError) as exc:
                raise TokenizerError(f"cannot read '{resolved}': {exc}") from None
            if not data_path:
                raise TokenizerError(f"'{resolved}' has no data.path; pass the prepared data directory")
            candidates = [data_path] if os.path.isabs(data_path) else [data_path, os.path.join(source, data_path)]
            for cand in candidates:
                if os.path.isdir(cand):
                    return load_tokenizer(cand)
            raise TokenizerError(f"data.path '{data_path}' of '{resolved}' does not exist here; pass the prepared "
                                 "data directory (or its tokenizer) explicitly")
        raise TokenizerError(f"'{source}' holds no tokenizer (no manifest.json, tokenizer.json, tokenizer.model or "
                             "config.resolved.yaml); pass a prepared data, run or tokenizer directory")
    if os.path.isfile(source):
        if os.path.basename(source) == "tokenizer.json":
            return HFTokenizer.from_dir(os.path.dirname(os.path.abspath(source)))
        return SentencePieceTokenizer.from_file(source)
    # A hub name is "name" or "org/name"; anything else (or whose first component exists here) is a path.
    hub_like = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", source) and not source.endswith((".model", ".json"))
    if not hub_like or os.path.exists(source.split("/")[0]):
        raise TokenizerError(f"tokenizer '{source}' does not exist; pass a prepared data directory, a run directory, "
                             "a tokenizer directory (tokenizer.json) or a tokenizer.model file")
    return HFTokenizer.from_hub(source)
