"""Data-parallel training (issue 8): the --num-gpus launcher, the shipped accelerate configs, and two CPU
ranks over gloo running the real CLI end to end against a one-process run of the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xray_train import launch
from xray_train.distributed import call_through_ddp
from xray_train.errors import XrayTrainError
from xray_train.resolve import resolve

REPO = Path(__file__).resolve().parents[1]
DDP_YAML = REPO / "configs" / "accelerate" / "ddp.yaml"
ZERO2_YAML = REPO / "configs" / "accelerate" / "zero2.yaml"
CLI_ARGS = ["phase1", "--config", "c.yaml", "--set", "training.max_steps=3", "--set", "lora.r=8", "--overwrite"]


# ---------------------------------------------------------------------------------------------
# --num-gpus: the accelerate launch command it becomes


def test_command_with_config_file_passes_args_through():
    cmd = launch.build_command(2, CLI_ARGS, DDP_YAML)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[3:7] == ["--config_file", str(DDP_YAML), "--num_processes", "2"]
    assert cmd[7:10] == ["-m", "xray_train.cli", "phase1"]
    assert cmd[9:] == CLI_ARGS


def test_command_without_config_file_spells_out_single_host_ddp():
    cmd = launch.build_command(2, CLI_ARGS)
    flags = cmd[3 : cmd.index("-m", 3)]
    assert "--config_file" not in flags
    assert "--multi_gpu" in flags
    assert flags[flags.index("--num_processes") + 1] == "2"
    assert flags[flags.index("--num_machines") + 1] == "1"
    # bf16/fp16 come from the run config alone.
    assert flags[flags.index("--mixed_precision") + 1] == "no"
    assert cmd[-len(CLI_ARGS) :] == CLI_ARGS


def test_one_gpu_is_not_multi_gpu():
    assert "--multi_gpu" not in launch.build_command(1, CLI_ARGS)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_refuses_non_positive_or_non_integer_gpu_counts(bad):
    with pytest.raises(XrayTrainError, match="--num-gpus"):
        launch.build_command(bad, CLI_ARGS)


def test_refuses_missing_config_file_and_empty_command(tmp_path):
    with pytest.raises(XrayTrainError, match="not found"):
        launch.build_command(2, CLI_ARGS, tmp_path / "nope.yaml")
    with pytest.raises(XrayTrainError, match="no xray-train command"):
        launch.build_command(2, [])


def test_strip_launch_options_keeps_the_rest_in_order():
    argv = ["phase1", "--num-gpus", "4", "--config", "c.yaml", "--accelerate-config=z.yaml", "--set", "a=1"]
    assert launch.strip_launch_options(argv) == (4, "z.yaml", ["phase1", "--config", "c.yaml", "--set", "a=1"])
    assert launch.strip_launch_options(["phase2", "--num-gpus=2"]) == (2, None, ["phase2"])
    assert launch.strip_launch_options(["phase1", "--config", "c.yaml"]) == (None, None, ["phase1", "--config", "c.yaml"])
    with pytest.raises(XrayTrainError, match="whole number"):
        launch.strip_launch_options(["phase1", "--num-gpus", "two"])
    with pytest.raises(XrayTrainError, match="expected a value"):
        launch.strip_launch_options(["phase1", "--num-gpus"])


def test_launch_execs_accelerate_with_the_shipped_ddp_config(monkeypatch):
    seen = {}
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(os, "execvp", lambda file, args: seen.update(file=file, args=args))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    launch.launch(2, CLI_ARGS)
    assert seen["file"] == sys.executable
    assert seen["args"] == launch.build_command(2, CLI_ARGS, DDP_YAML)


def test_the_shipped_ddp_config_is_found_outside_a_checkout(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the copy installed with xray-train is used
    found = launch.default_config_file()
    assert found is not None and found.read_text() == DDP_YAML.read_text()


def test_launch_refuses_to_nest_inside_a_launcher(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(os, "execvp", lambda *a: pytest.fail("must not exec"))
    with pytest.raises(XrayTrainError, match="already running under"):
        launch.launch(2, CLI_ARGS)


def test_module_entry_point_prints_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        launch.main(["--num-gpus", "0", "phase1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --num-gpus") and "\n" not in err


# ---------------------------------------------------------------------------------------------
# Shipped accelerate configs


def test_shipped_accelerate_configs_are_valid_accelerate_yaml():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    ddp = load_config_from_file(str(DDP_YAML))
    assert ddp.distributed_type == DistributedType.MULTI_GPU
    zero2 = load_config_from_file(str(ZERO2_YAML))
    assert zero2.distributed_type == DistributedType.DEEPSPEED
    assert zero2.deepspeed_config["zero_stage"] == 2
    for cfg in (ddp, zero2):
        assert cfg.num_machines == 1
        assert cfg.mixed_precision == "no"  # the run config's training.bf16 decides
        assert cfg.num_processes == -1  # accelerate insists on --num_processes
    # Left to "auto" so the HF Trainer fills them from training.* (no second source of truth).
    assert "gradient_accumulation_steps" not in zero2.deepspeed_config
    assert "gradient_clipping" not in zero2.deepspeed_config


# ---------------------------------------------------------------------------------------------
# The loss must run through DDP's forward, or gradients are never all-reduced


@pytest.fixture
def gloo_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sum_loss(module, x):
    return module.weight.sum() * x.sum()


def test_call_through_ddp_runs_fn_as_the_wrapped_forward(gloo_group):
    torch.manual_seed(0)
    inner = torch.nn.Linear(3, 2, bias=False)
    ddp = torch.nn.parallel.DistributedDataParallel(inner)
    x = torch.ones(4, 3)
    seen = []

    def fn(module, batch):
        seen.append(module)
        return _sum_loss(module, batch)

    out = call_through_ddp(ddp, fn, x)
    out.backward()
    assert seen == [inner]  # fn got the unwrapped module, called from inside DDP.forward
    assert torch.allclose(inner.weight.grad, torch.full_like(inner.weight, 12.0))
    assert "forward" not in inner.__dict__  # the class forward is back
    assert torch.equal(ddp(x), inner(x))


def test_call_through_ddp_restores_an_instance_forward(gloo_group):
    # accelerate puts an autocast forward on the instance under mixed precision; it must survive.
    inner = torch.nn.Linear(3, 2, bias=False)
    ddp = torch.nn.parallel.DistributedDataParallel(inner)
    patched = inner.forward
    inner.forward = patched
    call_through_ddp(ddp, _sum_loss, torch.ones(1, 3)).backward()
    assert inner.__dict__["forward"] is patched


def test_call_through_ddp_is_a_plain_call_elsewhere():
    inner = torch.nn.Linear(3, 2, bias=False)
    assert call_through_ddp(inner, lambda m, x: ("plain", m), 1) == ("plain", inner)
    with torch.no_grad():
        assert call_through_ddp(inner, lambda m, x: m, 1) is inner


# ---------------------------------------------------------------------------------------------
# Two CPU ranks over gloo, end to end through the real CLI


def _run(cmd: list[str], env: dict, log: Path) -> str:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=150)
    out = proc.stdout + proc.stderr
    log.write_text(out)
    assert proc.returncode == 0, f"{' '.join(cmd[:6])}... exited {proc.returncode}:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """One process x batch 4, two ranks x batch 2 (via --num-gpus -> accelerate launch -> ddp.yaml),
    then the two-rank run resumed from checkpoint-2 via torchrun. Same global batch, same data order."""
    root = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ)
    env.update(
        XRAY_TRAIN_FEATURE_CACHE=str(root / "features"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # Two ranks on a 2-core machine: one thread each (oversubscribed bnb CPU kernels crawl).
        OMP_NUM_THREADS="1",
        # CPU ranks: the Trainer forms a gloo group only with this (see docs/multi_gpu.md).
        ACCELERATE_USE_CPU="true",
        # accelerate names the CPU "cpu:0", which torch.load cannot map to when resuming optimizer state.
        ACCELERATE_TORCH_DEVICE="cpu",
        PYTHONUNBUFFERED="1",
    )
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    common = [
        "--config", str(REPO / "configs" / "demo" / "phase1.yaml"),
        "--set", f"model.base={tiny_model_dir}",
        "--set", "training.max_steps=4",
        "--set", "training.save_steps=2",
        # No evaluation inside the timed steps: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit
        # weights for inference in eval mode and only unpacks them when a state_dict is taken, which
        # only rank 0 does at a checkpoint; rank 1 would then backprop through the inference kernel.
        # The final evaluation after training still runs on both ranks.
        "--set", "training.eval_strategy=no",
        "--set", "training.logging_steps=1",
        "--set", "training.report_to=[none]",
        "--set", "training.dataloader_num_workers=0",
        # Comparable runs: no dropout RNG, and a plain shuffled order. Length grouping forms its
        # megabatches from the per-device batch size, so 2 x 2 and 1 x 4 would see different batches.
        "--set", "lora.dropout=0",
        "--set", "training.group_by_length=false",
    ]
    one, two, resumed = root / "one", root / "two", root / "resumed"
    _run(
        [sys.executable, "-m", "xray_train.cli", "phase1", *common,
         "--set", f"output_dir={one}", "--set", "training.per_device_train_batch_size=4"],
        env, root / "one.log",
    )
    two_log = _run(
        [sys.executable, "-m", "xray_train.launch", "--num-gpus", "2", "phase1", *common,
         "--set", f"output_dir={two}", "--set", "training.per_device_train_batch_size=2"],
        env, root / "two.log",
    )
    # Interrupted after checkpoint-2: the last checkpoint and the final outputs never got written.
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    for name in ("xray_train_complete.json", "adapter_model.safetensors", "training_summary.json"):
        (resumed / name).unlink()
    resume_log = _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "xray_train.cli", "phase1", *common,
         "--set", f"output_dir={resumed}", "--set", "training.per_device_train_batch_size=2"],
        env, root / "resumed.log",
    )
    return {"one": one, "two": two, "resumed": resumed, "two_log": two_log, "resume_log": resume_log,
            "cache": root / "features"}


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "training_summary.json").read_text())


def _losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_ranks_finish_and_write_outputs_once(runs):
    two = runs["two"]
    summary = _summary(two)
    assert summary["num_processes"] == 2
    assert summary["global_steps"] == 4
    assert _summary(runs["one"])["num_processes"] == 1
    assert (two / "xray_train_complete.json").is_file()
    assert (two / "adapter_model.safetensors").is_file()
    assert (two / "xray_train_config.yaml").is_file()
    # Nothing half-written or doubled: no staging folder, no checkpoint renamed aside.
    leftovers = [p.name for p in two.iterdir() if p.name.startswith((".", "incomplete-"))]
    assert leftovers == []
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for ckpt in two.glob("checkpoint-*"):
        assert (ckpt / "xray_train_checkpoint_complete").is_file()
        assert {p.name for p in ckpt.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert runs["two_log"].count("phase1: 29 training") == 2  # each rank read the same data
    # One vision-feature cache for all runs and ranks, no half-built copy left behind.
    caches = list(runs["cache"].iterdir())
    assert len(caches) == 1 and not caches[0].name.startswith(".")


@pytest.mark.slow
def test_two_ranks_see_the_same_global_batches_as_one_process(runs):
    """The first two steps' losses depend only on the data each global batch holds and on the loss
    normalisation across ranks (step 1 runs at learning rate 0 under warm-up, so step 2 still sees the
    initial weights): they must match the one-process run."""
    one, two = _losses(runs["one"]), _losses(runs["two"])
    assert sorted(two) == [1, 2, 3, 4]
    for step in (1, 2):
        assert two[step] == pytest.approx(one[step], rel=1e-5), (step, one, two)


@pytest.mark.slow
def test_two_ranks_train_the_same_adapter_as_one_process(runs):
    one, two = _adapter(runs["one"]), _adapter(runs["two"])
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    scale = max(one[k].abs().max().item() for k in one)
    assert worst <= 1e-4 * scale, f"max |diff| {worst:.2e}"
    l1, l2 = _losses(runs["one"]), _losses(runs["two"])
    for step in (3, 4):
        assert l2[step] == pytest.approx(l1[step], rel=1e-5)


@pytest.mark.slow
def test_two_ranks_resume_from_the_last_complete_checkpoint(runs):
    assert runs["resume_log"].count("Resuming from checkpoint-2") >= 1
    summary = _summary(runs["resumed"])
    assert summary["num_processes"] == 2 and summary["global_steps"] == 4
    before, after = _adapter(runs["two"]), _adapter(runs["resumed"])
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-5, atol=1e-6)


def test_one_process_seeing_several_gpus_trains_its_own_batch_on_one(make_config, monkeypatch):
    """A plain `python` run on a multi-GPU host: no nn.DataParallel, and the batch is not multiplied by
    the GPU count (it was: the 1-GPU benchmark row trained 16 per step while reporting 8)."""
    from transformers import TrainingArguments

    from xray_train.train import training_arguments
    from xray_train.trainer import XrayTrainer

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: getattr(self, "_n_gpu", 1)))
    cfg = resolve(make_config("phase1", "training.per_device_train_batch_size=3", "training.group_by_length=false"))
    args = training_arguments(cfg, has_eval=False)
    args._n_gpu = 2  # what TrainingArguments finds on a 2-GPU host in one process
    model = torch.nn.Linear(2, 2)
    trainer = XrayTrainer(
        model=model, args=args, train_dataset=list(range(12)), data_collator=list, lengths=None,
        targets_only=True, head_chunk_rows=cfg.training.head_chunk_rows, head_grad_in_forward=False,
    )
    assert trainer.args.n_gpu == 1
    assert trainer._train_batch_size == 3
    assert len(next(iter(trainer.get_train_dataloader()))) == 3


def test_ddp_does_not_rebroadcast_constant_buffers_every_step(make_config):
    """In-graph dequantisation keeps the 4-bit quantisation state as buffers (~50 MB for MedGemma-4B); DDP's
    default would send them from rank 0 to every rank before each forward."""
    from xray_train.train import training_arguments

    args = training_arguments(resolve(make_config("phase1")), has_eval=False)
    assert args.ddp_broadcast_buffers is False


POISON_ONE_RANK = r"""
import os, sys
import xray_train.trainer as trainer
from xray_train.loss import targets_only_loss

calls = []


def poisoned(model, batch, *args, **kwargs):
    out = targets_only_loss(model, batch, *args, **kwargs)
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) >= 3:  # rank 1 only, from its 3rd step
        out.loss_sum = out.loss_sum * float("nan")
    return out


trainer.targets_only_loss = poisoned
from xray_train.cli import main

sys.argv = ["xray-train", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_stops_every_rank_with_the_same_message(tiny_model_dir, tmp_path):
    script = tmp_path / "poison.py"
    script.write_text(POISON_ONE_RANK)
    env = dict(os.environ, XRAY_TRAIN_FEATURE_CACHE=str(tmp_path / "features"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true",
               ACCELERATE_TORCH_DEVICE="cpu", PYTHONUNBUFFERED="1")
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "phase1", "--config", str(REPO / "configs" / "demo" / "phase1.yaml"),
           "--set", f"model.base={tiny_model_dir}", "--set", f"output_dir={out}",
           "--set", "training.max_steps=6", "--set", "training.save_steps=100", "--set", "training.logging_steps=1",
           "--set", "training.eval_strategy=no", "--set", "training.report_to=[none]",
           "--set", "training.dataloader_num_workers=0", "--set", "training.per_device_train_batch_size=2"]
    # Before the collective check only rank 1 stopped; rank 0 crashed in its next all-reduce with a gloo
    # connection error (over NCCL it would wait there until the collective timed out).
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert text.count("loss became nan at step 3") >= 2, text[-3000:]  # both ranks, the same step
    assert not (out / "adapter_model.safetensors").exists()
