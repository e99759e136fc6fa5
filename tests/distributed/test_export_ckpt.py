"""pretrain-ckpt on real checkpoints: a TP=2 run of each family (two gloo processes) and a
single-process GPT-2-style run, with a vocabulary padded past the tokenizer's 512 ids
(vocab_multiple=100: 600 rows at TP=2 and TP=1).

- export --hf: transformers' from_pretrained on the export directory (offline) gives the logits
  of our merged TP=1 model within 1e-4, and the tokenizer encodes as the dataset's does;
- inspect: the step, layout, tokens seen and last loss the run itself printed, and a config diff
  naming exactly the key that was changed;
- convert: the safetensors file loads strictly into a fresh model, with the same logits;
  negative control: rank 0's shard alone is refused;
- a refused option exits 2 with one error line naming it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
TEXT = "def main(argv):\n    return 0\n"
CONFIGS = {
    "gpt2": "configs/tiny.yaml",
    "llama": "configs/tiny_gpt.yaml",
    "bert": "configs/tiny_bert.yaml",
    "t5": "configs/tiny_t5.yaml",
}


def train(tmp: Path, data: str, config: str, name: str, nproc: int, *extra: str) -> str:
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    else:
        launcher = []
    cmd = [
        sys.executable,
        *launcher,
        "-m",
        "pretrain.train",
        str(ROOT / config),
        f"data.path={data}",
        f"run.output_dir={tmp}",
        f"run.name={name}",
        "run.train_steps=4",
        "run.log_interval=2",
        "run.eval_interval=0",
        "run.eval_batches=0",
        "run.sample_tokens=0",
        "optim.warmup_steps=2",
        "model.vocab_multiple=100",
        "parallel.micro_batch_size=2",
        f"parallel.tp={nproc}",
        "tracking.enabled=false",
        *extra,
    ]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def ckpt(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pretrain.ckpt_cli", *map(str, args)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


class Runs:
    """Each run trained once, when a test first needs it (a -k selection trains only its own)."""

    def __init__(self, tmp: Path, data: str):
        self.tmp, self.data, self.stdout = tmp, data, {}

    def __call__(self, name: str) -> Path:
        if name not in self.stdout:
            family, layout = name.rsplit("_", 1)
            nproc = 2 if layout == "tp2" else 1
            self.stdout[name] = train(self.tmp, self.data, CONFIGS[family], name, nproc)
        return self.tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_dataset):
    return Runs(tmp_path_factory.mktemp("export"), small_dataset)


def _inputs(tok, family: str):
    ids = torch.tensor([tok.encode(TEXT)])
    dec = torch.tensor([[tok.specials.pad_id, *tok.encode("return")]])
    return ids, dec


def _ours(model, family, ids, dec):
    with torch.no_grad():
        return model(ids, dec) if family == "t5" else model(ids)


@pytest.mark.parametrize("run", ["gpt2_tp1", "gpt2_tp2", "llama_tp2", "bert_tp2", "t5_tp2"])
def test_export_hf_matches_our_logits(runs, run, tmp_path, world1, monkeypatch):
    import transformers

    from pretrain import export
    from pretrain.generate_cli import load_model, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export.export_hf(runs(run), tmp_path / "hf")
    model, cfg = load_model(runs(run))
    assert cfg.model.vocab_size == 600 and (tmp_path / "hf" / "tokenizer.json").is_file()
    tok = load_tokenizer(cfg, None)
    assert tok.vocab_size == 512  # the export cuts the 88 padding rows
    cls = getattr(transformers, export.hf_target(cfg))
    hf = cls.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert hf_tok(TEXT, add_special_tokens=False)["input_ids"] == tok.encode(TEXT)
    assert hf_tok.eos_token_id == tok.specials.eos_id and hf_tok.pad_token_id == tok.specials.pad_id
    ids, dec = _inputs(tok, cfg.model.family)
    with torch.no_grad():
        if cfg.model.family == "t5":
            theirs = hf(input_ids=ids, decoder_input_ids=dec).logits
        else:
            theirs = hf(input_ids=ids).logits
    ours = _ours(model, cfg.model.family, ids, dec)
    assert theirs.shape[-1] == 512 and ours.shape[-1] == 600
    # Our padding rows' logits are masked (nothing to export); every real row must agree.
    assert (ours[..., 512:] == torch.finfo(ours.dtype).min).all()
    ours = ours[..., :512]
    diff = (ours - theirs).abs().max().item()
    print(f"{run}: max |logit diff| {diff:.3g} over {tuple(ours.shape)}")
    assert diff <= 1e-4


def test_inspect_reports_the_runs_values(runs, tmp_path):
    import json

    import yaml

    run_dir = runs("gpt2_tp2")
    proc = ckpt("inspect", run_dir, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    assert info["step"] == 4 and info["checkpoint"].endswith("step_00000004")
    assert info["layout"] == {
        "tp": 2, "pp": 1, "dp": 1, "world_size": 2, "zero_stage": 0, "precision": "fp32"
    }  # fmt: skip
    assert info["tokens_seen"] == 4 * 2 * 32  # steps x sequences per step x seq_len
    # The last loss is the one the run printed at step 4.
    printed = re.findall(r"step\s+4/4 \| loss ([0-9.]+)", runs.stdout["gpt2_tp2"])
    assert printed and info["last_loss"]["step"] == 4
    assert f"{info['last_loss']['loss']:.4f}" == printed[-1]
    # Config diff: the run's own config differs in nothing; one changed key is named alone.
    own = run_dir / "config.yaml"
    proc = ckpt("inspect", run_dir, "--json", "--config", own)
    assert json.loads(proc.stdout)["config_diff"] == []
    data = yaml.safe_load(own.read_text())
    data["model"]["dropout"] = 0.25
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    proc = ckpt("inspect", run_dir, "--config", changed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 key(s) differ" in proc.stdout and "model.dropout: 0.0 -> 0.25" in proc.stdout


def test_convert_round_trips(runs, tmp_path, world1):
    from pretrain import export
    from pretrain.generate_cli import load_model, load_tokenizer
    from pretrain.models import build_model

    run_dir = runs("llama_tp2")
    out = tmp_path / "model.safetensors"
    proc = ckpt("convert", run_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, cfg = load_model(run_dir)
    torch.manual_seed(123)  # a fresh model with other weights than the checkpoint's
    fresh = build_model(cfg.model, world1, 1).eval()
    fresh.load_state_dict(export.load_consolidated(out, fresh), strict=True)
    ids, dec = _inputs(load_tokenizer(cfg, None), "gpt")
    assert torch.equal(_ours(fresh, "gpt", ids, dec), _ours(model, "gpt", ids, dec))

    # Negative control: with rank 1's shard gone the checkpoint does not make a whole model.
    step = run_dir / "checkpoints" / "step_00000004"
    (step / "mp_rank_01_model_states.pt").rename(step / "moved.pt")
    try:
        proc = ckpt("convert", run_dir, tmp_path / "broken.safetensors")
        assert proc.returncode == 2 and "mp_rank_01_model_states.pt" in proc.stderr
    finally:
        (step / "moved.pt").rename(step / "mp_rank_01_model_states.pt")


def test_export_refuses_an_option_without_equivalent(runs, tmp_path):
    # The GPT-2-style run's saved config with GeGLU: GPT2LMHeadModel's MLP is not gated.
    import yaml

    src = runs("gpt2_tp1")
    run = tmp_path / "geglu"
    (run / "checkpoints").mkdir(parents=True)
    data = yaml.safe_load((src / "config.yaml").read_text())
    data["model"]["activation"] = "geglu"
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    (run / "checkpoints" / "step_00000004").symlink_to(src / "checkpoints" / "step_00000004")
    proc = ckpt("export", run, tmp_path / "hf", "--hf")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: config model.activation='geglu':"), proc.stderr[-2000:]
    assert "GPT2LMHeadModel" in lines[-1]
    assert not (tmp_path / "hf").exists()
