"""Trajectory shards: precompute determinism (1 vs 2 ranks), kill-and-resume, the reader's checks,
loader integration (workers x dp slices), corruption handling, CLI errors."""
from __future__ import annotations

import copy
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from mcd_scale.config import load_config, save_resolved
from mcd_scale.data.loader import MicroBatchLoader, TOKENS_FORMAT, TOKENS_FORMAT_VERSION
from mcd_scale.data.manifest import ManifestError, load_manifest, sha256_file, write_manifest
from mcd_scale.data.sampler import GlobalBatchSampler
from mcd_scale.data.shards import ShardedDataset, ShardError, write_shards
from mcd_scale.data.trajectories import open_trajectories, thresholds_for, verify_batch
from mcd_scale.rng import keyed_generator
from tests.mp import REPO, run_cli, venv_bin

V, L, N, S = 61, 16, 22, 6  # 22 samples in shards of 6: 6, 6, 6, 4 (counts do not divide)
TOOL = os.path.join(REPO, "tools", "precompute_trajectories.py")
TINY = ["model.hidden=32", "model.layers=2", "model.heads=2", "model.ffn_hidden=64", f"model.vocab_size={V}",
        f"model.seq_len={L}", "model.pad_vocab_multiple=32", "distill.top_k=5", "distill.dt0=0.05"]


def _cfg(extra=()):
    return load_config([os.path.join(REPO, "configs/tiny/teacher.yaml")], TINY + list(extra))


def make_teacher(directory: str, seed: int = 7) -> str:
    from mcd_scale.model.build import build_model
    from mcd_scale.model.weights import full_state_dict, save_safetensors

    cfg = _cfg([f"train.seed={seed}"])
    model = build_model(cfg, None, init=True)
    save_safetensors(full_state_dict(model), os.path.join(directory, "model.safetensors"))
    save_resolved(cfg, os.path.join(directory, "config.resolved.yaml"))
    return directory


def make_tokens(directory: str, n: int = N, tokenizer_sha: str = "tok-a") -> str:
    gen = keyed_generator("test-traj-tokens", n)
    rows = torch.randint(0, V, (n, L), generator=gen).numpy().astype(np.uint16)
    splits = {}
    for name, data in (("train", rows), ("val", rows[:4])):
        shards = write_shards(os.path.join(directory, name), ((g, {"ids": r}) for g, r in enumerate(data)), 8)
        splits[name] = {"dir": name, "num_samples": len(data), "shards": shards}
    write_manifest(directory, {"format": TOKENS_FORMAT, "format_version": TOKENS_FORMAT_VERSION, "vocab_size": V,
                               "mask_id": V, "seq_len": L, "dtype": "uint16", "splits": splits,
                               "tokenizer": {"path": "tokenizer.model", "sha256": tokenizer_sha}})
    return directory


def tool_args(teacher, data, out, *extra):
    return ["--teacher", teacher, "--data", data, "--out", out, "--samples-per-shard", str(S),
            "--batch-size", "4", "--no-progress", *extra]


def tool_cmd(teacher, data, out, *extra, ranks: int = 1):
    args = [TOOL, "--teacher", teacher, "--data", data, "--out", out, "--samples-per-shard", str(S),
            "--batch-size", "4", "--no-progress", *extra]
    if ranks == 1:
        return [sys.executable] + args
    return [venv_bin("torchrun"), "--standalone", "--nproc_per_node", str(ranks)] + args


def run_inprocess(argv, capsys=None) -> tuple[int, str]:
    """Run the tool's main() in this process (single rank; saves a ~10 s interpreter start). The
    launcher variables init_distributed exports are restored afterwards."""
    from mcd_scale.training.precompute import main

    saved = dict(os.environ)
    try:
        rc = main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return rc, (capsys.readouterr().out if capsys is not None else "")


def read_all(out: str) -> dict[int, dict]:
    m = load_manifest(out)
    ds = ShardedDataset(os.path.join(out, "train"), manifest=m["splits"]["train"])
    return {g: ds[g] for g in range(len(ds))}


def assert_same_payloads(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) == list(range(N))
    for g in a:
        assert sorted(a[g]) == sorted(b[g]) == ["ids", "tail_logp", "times", "topk_ids", "topk_logp", "topk_pos"]
        for key in ("ids", "topk_pos", "topk_ids", "times"):
            assert a[g][key].dtype == b[g][key].dtype and a[g][key].tobytes() == b[g][key].tobytes(), (g, key)
        # tolerance: other rank counts batch other samples together, so the float32 logits differ by summation
        # order (~1e-6 relative) and a float16 rounding may flip by one ulp, <= 2^-10 |logp| < 1e-3 |logp|: rtol 1e-3
        # covers it at any magnitude (atol 1e-3 for logp near 0). The tail is float32: 1e-5 = fp32 log-softmax noise.
        np.testing.assert_allclose(a[g]["topk_logp"].astype(np.float32), b[g]["topk_logp"].astype(np.float32),
                                   rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(a[g]["tail_logp"], b[g]["tail_logp"], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("traj")
    teacher = make_teacher(str(root / "teacher"))
    data = make_tokens(str(root / "tokens"))
    out = str(root / "ref")
    rc, _ = run_inprocess(tool_args(teacher, data, out))
    assert rc == 0
    return {"root": root, "teacher": teacher, "data": data, "ref": out}


def dist_cfg(env, extra=()):
    # train.seed=7: the teacher's config.resolved.yaml (the tool's default config) has seed 7.
    return _cfg(["train.seed=7", f"data.path={env['data']}", f"data.trajectories={env['ref']}",
                 f"distill.teacher={env['teacher']}", *extra])


def test_manifest_and_payload_contract(env):
    m = load_manifest(env["ref"])
    assert m["format"] == "mcd_scale.trajectories" and m["num_samples"] == N and m["top_k"] == 5
    assert m["teacher"]["sha256"] == sha256_file(os.path.join(env["teacher"], "model.safetensors"))
    assert m["source"]["tokenizer_sha256"] == "tok-a"
    assert m["source"]["manifest_sha256"] == sha256_file(os.path.join(env["data"], "manifest.json"))
    assert m["dt"] == 0.05 and m["round"] == 0 and m["thresholds"]["K"] == V + 1
    shards = m["splits"]["train"]["shards"]
    assert [s["num_samples"] for s in shards] == [6, 6, 6, 4]
    for s in shards:
        assert sha256_file(os.path.join(env["ref"], "train", s["name"])) == s["sha256"]
    items = read_all(env["ref"])
    tokens = ShardedDataset(os.path.join(env["data"], "train"))
    u = thresholds_for(torch.arange(N), m)
    for g, rec in items.items():
        assert rec["ids"].dtype == np.uint16 and np.array_equal(rec["ids"], tokens[g]["ids"])
        t, s = rec["times"]
        # tolerance: (s + dt) - s in float64 on numbers <= 1 is dt up to a few ulp (~1e-16)
        assert rec["times"].dtype == np.float64 and abs((t - s) - 0.05) < 1e-12 and m["t_min"] <= s < t <= 1
        masked_s = np.nonzero(u[g].numpy() >= 1 - (1 - m["eps"]) * s)[0]  # loglinear alpha_s
        assert np.array_equal(rec["topk_pos"].astype(np.int64), masked_s)
        assert rec["topk_logp"].dtype == np.float16 and rec["topk_ids"].shape == (len(masked_s), 5)
        assert np.all(np.diff(rec["topk_logp"].astype(np.float32), axis=1) <= 0)  # sorted
    assert len({float(items[g]["times"][0]) for g in items}) == N  # per-sample times


def test_determinism_1_vs_2_ranks(env, tmp_path):
    out = str(tmp_path / "two")
    res = run_cli(tool_cmd(env["teacher"], env["data"], out, ranks=2), timeout=300)
    assert res.returncode == 0, res.stdout
    assert_same_payloads(read_all(env["ref"]), read_all(out))
    a, b = load_manifest(env["ref"]), load_manifest(out)
    assert [s["name"] for s in a["splits"]["train"]["shards"]] == [s["name"] for s in b["splits"]["train"]["shards"]]


def test_kill_and_resume(env, tmp_path, capsys):
    out = str(tmp_path / "killed")
    res = run_cli(tool_cmd(env["teacher"], env["data"], out), timeout=240, env={"MCD_FAULT_EXIT_AFTER_SHARDS": "1"})
    assert res.returncode == 9, res.stdout
    split = os.path.join(out, "train")
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert sorted(f for f in os.listdir(split) if f.endswith(".tar")) == ["shard-000000.tar"]
    first_sha = sha256_file(os.path.join(split, "shard-000000.tar"))
    # A shard renamed but killed before its sidecar, and a stale temp file: both must be redone.
    with open(os.path.join(split, "shard-000002.tar"), "wb") as fh:
        fh.write(b"garbage")
    with open(os.path.join(split, "shard-000003.tar.tmp"), "wb") as fh:
        fh.write(b"half")
    capsys.readouterr()
    rc, stdout = run_inprocess(tool_args(env["teacher"], env["data"], out), capsys)
    assert rc == 0
    assert "1 shard(s) of rank 0 resumed" in stdout and f"computed {N - S}" in stdout
    assert sha256_file(os.path.join(split, "shard-000000.tar")) == first_sha  # not rewritten
    assert_same_payloads(read_all(env["ref"]), read_all(out))
    m = load_manifest(out)
    for s in m["splits"]["train"]["shards"]:
        assert sha256_file(os.path.join(split, s["name"])) == s["sha256"]
    assert m["splits"]["train"]["shards"] == load_manifest(env["ref"])["splits"]["train"]["shards"]
    # A finished shard whose bytes changed (same size) fails its sidecar's sha256 and is redone.
    path = os.path.join(split, "shard-000001.tar")
    with open(path, "r+b") as fh:
        fh.seek(700)
        byte = fh.read(1)
        fh.seek(700)
        fh.write(bytes([byte[0] ^ 0xFF]))
    rc, stdout = run_inprocess(tool_args(env["teacher"], env["data"], out), capsys)
    assert rc == 0 and f"computed {S}," in stdout and "3 shard(s) of rank 0 resumed" in stdout
    assert load_manifest(out) == m


def test_warning_signal_after_the_work_exits_0(env, tmp_path):
    """SLURM's warning signal (SIGUSR1) reaching a rank after precompute() returned, before the process exits
    (a rank that finished its last shard first): the set is complete, so exit 0, not SIGUSR1's default
    action (killed, 138 in a shell). The tool sends itself the signal at that point (no timing race)."""
    out = str(tmp_path / "signalled")
    shutil.copytree(env["ref"], out)  # every shard resumes: the run is short, the point is what follows it
    os.remove(os.path.join(out, "manifest.json"))
    res = run_cli(tool_cmd(env["teacher"], env["data"], out), timeout=240,
                  env={"MCD_FAULT_SIGNAL_AFTER_WORK": "1"})
    assert res.returncode == 0, (res.returncode, res.stdout[-3000:])
    assert "preemption signal after the set was complete; exit 0" in res.stdout
    assert load_manifest(out) == load_manifest(env["ref"])


def test_inprocess_main_puts_the_signal_handlers_back(env, tmp_path, capsys):
    """Only the process entry keeps its preemption handlers until exit; a caller of main() gets its own back."""
    import signal

    out = str(tmp_path / "inprocess")
    shutil.copytree(env["ref"], out)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    rc, _ = run_inprocess(tool_args(env["teacher"], env["data"], out), capsys)
    assert rc == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_cli_errors_exit_2(env, tmp_path, capsys):
    from mcd_scale.training.precompute import main

    base = ["--data", env["data"], "--samples-per-shard", str(S), "--no-progress"]
    assert main(["--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "o1"), *base]) == 2
    err = capsys.readouterr().err
    assert f"--teacher {tmp_path / 'nope'} does not exist" in err and "a run directory" in err
    assert main(["--teacher", env["teacher"], "--out", str(tmp_path / "o2"), "--set", "model.seq_len=32", *base]) == 2
    err = capsys.readouterr().err
    assert "seq_len" in err and "model.seq_len is 32" in err
    assert main(["--teacher", env["teacher"], "--out", str(tmp_path / "o3"), "--set", "parallel.tp=2", *base]) == 2
    assert "--set parallel.tp=1" in capsys.readouterr().err
    # Resuming an --out made with another round is refused, naming the field.
    assert main(["--teacher", env["teacher"], "--out", env["ref"], "--round", "1", *base]) == 2
    err = capsys.readouterr().err
    assert "round = 0" in err and "fresh --out" in err


@pytest.mark.parametrize("override, field", [
    ("distill.round=1", "round in"), ("train.seed=99", "seed in"), ("distill.dt0=0.025", "dt in"), ("distill.top_k=4", "top_k in"),
    ("diffusion.schedule=cosine", "schedule in"), ("diffusion.duality_form=gaussian", "duality_form in"),
    ("distill.temperature.start=0.9", "temperature in")])
def test_reader_refuses_config_mismatch(env, override, field):
    open_trajectories(dist_cfg(env))  # the matching config opens
    with pytest.raises(ManifestError, match=field):
        open_trajectories(dist_cfg(env, [override]))


def test_reader_refuses_other_teacher_and_tokenizer(env, tmp_path):
    other = make_teacher(str(tmp_path / "other"), seed=8)
    with pytest.raises(ManifestError, match="teacher.sha256"):
        open_trajectories(dist_cfg(env, [f"distill.teacher={other}"]))
    toks = make_tokens(str(tmp_path / "toks"), tokenizer_sha="tok-b")
    with pytest.raises(ManifestError, match="tokenizer_sha256"):
        open_trajectories(dist_cfg(env, [f"data.path={toks}"]))


def test_reader_items_loader_workers_dp(env):
    ds = open_trajectories(dist_cfg(env))
    k = 5
    item = ds[3]
    assert item["ids"].shape == (L,) and item["tk_ids"].shape == (L, k) and item["tk_logp"].dtype == np.float32
    assert item["t"].shape == () and item["t"].dtype == np.float64
    assert np.all(item["tk_tail"][~item["tk_mask"]] == -np.inf) and np.all(item["tk_ids"][~item["tk_mask"]] == 0)
    gb, steps = 4, 11  # 44 positions = exactly two epochs of 22
    seen = {}
    for workers in (0, 2):
        for dp_rank in range(2):
            sampler = GlobalBatchSampler(len(ds), gb, seed=3)
            loader = MicroBatchLoader(ds, sampler, dp_rank, 2, 1, start_step=0, num_workers=workers, max_steps=steps)
            ids = []
            for batch in loader:
                assert batch["tk_ids"].shape == (1, L, k) and batch["tk_mask"].dtype == torch.bool
                ds.verify_batch(batch)
                z_t, z_s = ds.coupled_pair(batch)
                assert torch.equal(z_s == V, batch["tk_mask"]) and bool(((z_s == V) <= (z_t == V)).all())
                g = int(batch["sample_id"][0])
                assert torch.equal(batch["tk_logp"][0], torch.from_numpy(ds[g]["tk_logp"]))
                ids.append(g)
            assert len(ids) == steps * 2  # global batch 4 = dp 2 x micro 1 x accum 2
            seen[(workers, dp_rank)] = ids
        flat = [g for r in range(2) for g in seen[(workers, r)]]
        assert sorted(flat) == sorted(list(range(N)) * 2)  # two epochs: every id exactly twice
    assert seen[(0, 0)] == seen[(2, 0)] and seen[(0, 1)] == seen[(2, 1)]
    # Per epoch exactly once: the first 22 positions of the global stream.
    sampler = GlobalBatchSampler(len(ds), gb, seed=3)
    assert sorted(sampler.ids_at(0, N)) == list(range(N))


def test_verify_batch_catches_wrong_seed(env):
    ds = open_trajectories(dist_cfg(env))
    from mcd_scale.data.loader import collate_samples

    batch = collate_samples([(g, g, ds[g]) for g in range(6)])
    verify_batch(batch, ds.manifest)
    wrong = copy.deepcopy(ds.manifest)
    wrong["thresholds"]["seed"] += 1
    with pytest.raises(ValueError, match="sample key"):
        verify_batch(batch, wrong)


def test_truncated_and_bad_shards(env, tmp_path):
    out = str(tmp_path / "bad")
    shutil.copytree(env["ref"], out)
    path = os.path.join(out, "train", "shard-000001.tar")
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    cfg = dist_cfg(env, [f"data.trajectories={out}"])
    with pytest.raises(ShardError, match="shard-000001.tar"):
        open_trajectories(cfg)
    cfg.data.skip_corrupt = True
    ds = open_trajectories(cfg)
    got = [ds[g] for g in range(N)]
    assert all(got[g] is not None for g in range(N) if not 6 <= g < 12)
    assert ds.skipped == sum(x is None for x in got) >= 1
    # A decodable sample with a wrong payload shape: the error names the shard and the key.
    rec = read_all(env["ref"])
    rec[13]["topk_logp"] = rec[13]["topk_logp"][:, :2]
    write_shards(os.path.join(out, "train"), ((g, rec[g]) for g in range(12, 18)), S, first_shard=2)
    cfg.data.skip_corrupt = False
    shutil.copy(os.path.join(env["ref"], "train", "shard-000001.tar"), path)
    ds = open_trajectories(cfg)
    ds[12]
    with pytest.raises(ShardError, match=r"shard-000002.tar.*sample key 0000000013.*topk_logp"):
        ds[13]


def test_records_match_the_teacher_recomputed_on_z_s(env):
    """Every stored record recomputed here from the teacher's weights: z_s = the clean ids with the stored
    positions (masked at s; checked against the thresholds above) set to the mask id, the teacher run on
    (z_s, s), log-softmax at the round's temperature. The stored top-k must be those log-probs: a tool
    that fed the teacher z_t (or another time) stores other values."""
    from mcd_scale.model.build import build_model
    from mcd_scale.model.weights import load_full_state_dict, load_safetensors

    m = load_manifest(env["ref"])
    items = read_all(env["ref"])
    teacher = build_model(_cfg(["train.seed=7"]), None, init=False)
    load_full_state_dict(teacher, load_safetensors(os.path.join(env["teacher"], "model.safetensors")))
    teacher.eval()
    x = torch.from_numpy(np.stack([items[g]["ids"] for g in range(N)]).astype(np.int64))
    s = torch.tensor([items[g]["times"][1] for g in range(N)], dtype=torch.float64)
    z_s = x.clone()
    for g in range(N):
        z_s[g, torch.from_numpy(items[g]["topk_pos"].astype(np.int64))] = V
    with torch.no_grad():
        logits = teacher(z_s, s.float())
    logp = torch.log_softmax(logits[..., :V].double() / m["temperature"], dim=-1)
    k = m["top_k"]
    checked = 0
    for g in range(N):
        pos = torch.from_numpy(items[g]["topk_pos"].astype(np.int64))
        want = logp[g, pos]  # [n, V]
        stored_ids = torch.from_numpy(items[g]["topk_ids"].astype(np.int64))
        stored = items[g]["topk_logp"].astype(np.float64)
        # float16 storage: relative rounding <= 2^-11; 1e-5 absorbs fp32 GEMM order (batch size differs).
        tol = dict(rtol=2.0 ** -11, atol=1e-5)
        np.testing.assert_allclose(stored, want.gather(1, stored_ids).numpy(), **tol, err_msg=f"sample {g}")
        # ... and they are the k largest (compared by value: near-ties may swap ids harmlessly).
        np.testing.assert_allclose(stored, torch.topk(want, k, dim=-1).values.numpy(), **tol, err_msg=f"sample {g}")
        rest = want.scatter(1, stored_ids, float("-inf"))
        # tail stored in float32 (relative 6e-8) from an fp32 softmax: 1e-5 is the fp32 log-softmax noise.
        np.testing.assert_allclose(items[g]["tail_logp"], torch.logsumexp(rest, -1).numpy(), rtol=1e-5, atol=1e-5)
        checked += len(pos)
    assert checked > N, "too few masked positions to check"
