"""Phase 1 -> Phase 2 end to end on the tiny 4-bit base: outputs, continuation, reload, generation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from xray_train.config import read_yaml
from xray_train.errors import XrayTrainError
from xray_train.run_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DONE_MARKER, LOSS_CURVE, RESOLVED_CONFIG, SUMMARY
from xray_train.train import run


@pytest.fixture(scope="module")
def two_phase_run(tmp_path_factory, tiny_model_dir, feature_cache_dir):
    from xray_train.config import load_config

    from .conftest import REPO, indiana_overrides, padchest_overrides

    root = tmp_path_factory.mktemp("runs")
    common = [
        f"model.base={tiny_model_dir}",
        "training.max_steps=4",
        "training.save_steps=2",
        "training.eval_steps=2",
        "training.logging_steps=1",
        "training.report_to=[none]",
        "training.dataloader_num_workers=0",
    ]
    cfg1 = load_config(REPO / "configs/demo/phase1.yaml", common + padchest_overrides() + [f"output_dir={root / 'p1'}"])
    cfg2 = load_config(REPO / "configs/demo/phase2.yaml", common + indiana_overrides() + [f"output_dir={root / 'p2'}"])
    run(cfg1)
    run(cfg2, resume_from=cfg1.output_dir)
    return cfg1, cfg2


def tensors(path):
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def test_each_phase_writes_the_documented_outputs(two_phase_run):
    for cfg in two_phase_run:
        out = cfg.output_dir
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, RESOLVED_CONFIG, SUMMARY, DONE_MARKER, LOSS_CURVE,
                     "tokenizer.json", "tokenizer_config.json", "processor_config.json"):
            assert (out / name).is_file(), f"{cfg.phase}: {name} missing"
        summary = json.loads((out / SUMMARY).read_text())
        assert summary["global_steps"] == 4 and summary["train_samples_per_s"] > 0
        assert "eval_token_accuracy" in summary["metrics"]
        assert summary["metrics"]["torch_compiles"] == 0  # CPU: the decoder layers are not compiled
        assert read_yaml(out / RESOLVED_CONFIG)["phase"] == cfg.phase


def test_adapters_hold_trained_tensors_in_the_right_places(two_phase_run):
    cfg1, cfg2 = two_phase_run
    p1 = tensors(cfg1.output_dir / ADAPTER_WEIGHTS)
    p2 = tensors(cfg2.output_dir / ADAPTER_WEIGHTS)
    assert p1 and all("lora_" in k for k in p1)  # Phase 1: LoRA only, no projector
    assert any(t.abs().sum() > 0 for k, t in p1.items() if "lora_B" in k)  # trained, not the zero init
    assert not any("vision_tower" in k for k in p1 | p2)
    assert any("multi_modal_projector" in k for k in p2)  # Phase 2 saves the projector it trained
    loc_rows = [t for k, t in p2.items() if "trainable_tokens" in k]
    assert len(loc_rows) == 1 and loc_rows[0].shape[0] == 1024  # loc rows only, no 262k-row copy
    # Phase 2 started from Phase 1: its LoRA A weights stayed close to Phase 1's, not a fresh init.
    for key, a1 in p1.items():
        if "lora_A" in key:
            a2 = p2[key]
            assert torch.nn.functional.cosine_similarity(a1.flatten().float(), a2.flatten().float(), dim=0) > 0.9


def test_loaded_adapter_is_the_trained_one_and_generates(two_phase_run):
    from peft.utils import get_peft_model_state_dict

    from xray_train.collate import PromptEncoder
    from xray_train.inputs import PixelLoader
    from xray_train.model import load_adapter

    from .conftest import SAMPLES

    _, cfg2 = two_phase_run
    model, processor = load_adapter(cfg2.output_dir)
    # The reloaded adapter holds exactly the saved tensors (LoRA, projector, loc rows).
    saved = tensors(cfg2.output_dir / ADAPTER_WEIGHTS)
    loaded = get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys()
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key].float(), value.float(), msg=key)
    assert len(processor.tokenizer) > 262145  # the loc tokens came back with the processor

    encoder = PromptEncoder(processor, cfg2.system_prompt)
    image = sorted((SAMPLES / "indiana").rglob("*-1001.dcm.png"))[0]
    ids = torch.tensor([encoder.prompt_ids("detect")])
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        token_type_ids=(ids == encoder.ids.image).long(),
        pixel_values=PixelLoader(processor)(image)[None],
    )
    with torch.no_grad():
        with_adapter = model(**inputs).logits[0, -1]
        with model.disable_adapter():
            without = model(**inputs).logits[0, -1]
    assert not torch.allclose(with_adapter, without)  # the trained adapter changes the answer
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    again = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1] and torch.equal(out, again)  # greedy decoding is deterministic
    assert isinstance(encoder.decode_answer(out[0, ids.shape[1]:].tolist()), str)


def test_finished_run_is_not_overwritten_and_overwrite_starts_fresh(two_phase_run, tmp_path):
    import shutil

    cfg1, _ = two_phase_run
    out = tmp_path / "p1"
    shutil.copytree(cfg1.output_dir, out)
    cfg = cfg1.model_copy(update={"output_dir": out})
    before = (out / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(XrayTrainError, match="--overwrite"):
        run(cfg)
    assert (out / ADAPTER_WEIGHTS).read_bytes() == before

    (out / "left-over.txt").write_text("from the old run")
    shorter = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_steps": 1})})
    messages = []
    run(shorter, overwrite=True, echo=messages.append)
    assert not any("Resuming" in m for m in messages)  # nothing of the old run is resumed
    assert not (out / "left-over.txt").exists()
    assert not (out / "checkpoint-2").exists() and not (out / "checkpoint-4").exists()
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["global_steps"] == 1 and summary["resumed_from_step"] is None
    assert (out / DONE_MARKER).is_file() and (out / ADAPTER_WEIGHTS).read_bytes() != before


def test_every_run_dir_and_checkpoint_records_its_resolved_settings_and_lineage(two_phase_run):
    """A finished run says how it ran: no "auto" left in the saved config, in the final dir and in each
    checkpoint; Phase 2 names the Phase-1 adapter it continued by path and sha256."""
    from xray_train.resolve import RESOLVED_KEYS, unresolved
    from xray_train.run_dir import LINEAGE, RunDir, sha256_of

    cfg1, cfg2 = two_phase_run
    for cfg in (cfg1, cfg2):
        run_dir = RunDir(cfg.output_dir)
        checkpoints = sorted(cfg.output_dir.glob("checkpoint-*"))
        assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-4"]
        for place in [run_dir, *map(RunDir, checkpoints)]:
            saved = place.config()
            assert unresolved(saved) == [], place
            raw = read_yaml(place.file(RESOLVED_CONFIG))
            for key in RESOLVED_KEYS:
                section, name = key.split(".")
                assert raw[section][name] is not None, (place, key)
            # What the run did on this machine (CPU): no compile, no checkpointing, no bf16.
            assert saved.training.torch_compile is False and saved.training.gradient_checkpointing is False
            assert saved.training.bf16 is False and saved.training.checkpoint_layers == 0
            assert saved.model.add_loc_tokens is (cfg.phase == "phase2")
            assert place.lineage() == run_dir.lineage()
        assert (cfg.output_dir / "checkpoint-4" / LINEAGE).read_bytes() == (cfg.output_dir / LINEAGE).read_bytes()

    assert RunDir(cfg1.output_dir).lineage() == {"phase": "phase1", "parent": None}
    parent = RunDir(cfg2.output_dir).parent()
    assert parent == {
        "path": str(cfg1.output_dir.resolve()),
        "phase": "phase1",
        "dataset": "padchest",
        "synthetic_sample": True,  # the tests train on the bundled samples
        "adapter_sha256": sha256_of(cfg1.output_dir / ADAPTER_WEIGHTS),
    }
    assert json.loads((cfg2.output_dir / SUMMARY).read_text())["parent"] == parent
    # Phase 2 resolved the in-forward head gradient off: its <loc> rows make the tied head trainable.
    assert RunDir(cfg2.output_dir).config().training.head_grad_in_forward is False
    assert RunDir(cfg1.output_dir).config().training.head_grad_in_forward is True


def test_rerun_resumes_from_latest_checkpoint(make_config, capsys):
    cfg = make_config("phase1", "training.max_steps=2")
    run(cfg)
    (cfg.output_dir / DONE_MARKER).unlink()  # as if killed after the checkpoint
    longer = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_steps": 4})})
    messages = []
    run(longer, echo=messages.append)
    assert any("Resuming from checkpoint-2" in m for m in messages)
    summary = json.loads((cfg.output_dir / SUMMARY).read_text())
    assert summary["global_steps"] == 4


def test_training_uses_the_configured_head_chunk(make_config, monkeypatch, tmp_path):
    """training.head_chunk_rows bounds the LM-head transient at the memory peak and
    training.head_grad_in_forward picks the head's backward: both must reach the loss."""
    from xray_train import trainer
    from xray_train.loss import targets_only_loss

    seen = []

    def spy(model, batch, chunk_rows, grad_in_forward):
        seen.append((chunk_rows, grad_in_forward))
        return targets_only_loss(model, batch, chunk_rows, grad_in_forward)

    monkeypatch.setattr(trainer, "targets_only_loss", spy)
    run(make_config("phase1", "training.max_steps=1", "training.head_chunk_rows=5", "training.eval_strategy=no"))
    assert seen and set(seen) == {(5, True)}
    seen.clear()
    run(make_config("phase1", "training.max_steps=1", "training.head_grad_in_forward=false",
                    "training.eval_strategy=no", output_dir=tmp_path / "recomputed-head"))
    assert seen and {grad for _, grad in seen} == {False}


def test_loss_guard_defers_gpu_reads_until_the_copy_is_done_or_a_save_needs_it():
    """The CUDA path of NonFiniteLossGuard, with the CUDA event replaced by a stand-in (CI has no GPU)."""
    from xray_train.trainer import NonFiniteLossGuard

    class Event:
        def __init__(self):
            self.done = False
            self.waited = False

        def query(self):
            return self.done

        def synchronize(self):
            self.waited = True

    guard = NonFiniteLossGuard()
    first, second = Event(), Event()
    guard._pending = [(7, torch.tensor(1.5), first), (8, torch.tensor(float("nan")), second)]
    guard.check(wait=False)  # nothing copied yet: nothing read, nothing raised
    assert len(guard._pending) == 2 and not first.waited
    first.done = True
    guard.check(wait=False)  # step 7 is readable and finite; step 8 still in flight
    assert len(guard._pending) == 1
    with pytest.raises(XrayTrainError, match="loss became nan at step 8"):
        guard.check(wait=True)  # before a checkpoint: wait for it
    assert second.waited and not guard._pending


def test_compile_count_counts_each_compile_and_recompile():
    from xray_train.train import compile_count

    fn = torch.compile(lambda x: x * 2 + 1, backend="eager")
    before = compile_count()
    fn(torch.ones(3))
    fn(torch.ones(3))  # same shape: no new graph
    assert compile_count() == before + 1
    fn(torch.ones(5))  # a new shape recompiles
    assert compile_count() == before + 2


def test_distance_aware_loc_targets_reach_the_phase2_loss(make_config, monkeypatch):
    """training.loc_label_sigma / loc_l1_weight reach the Phase-2 loss with the <loc> ids."""
    from xray_train import trainer
    from xray_train.loss import LocTargets, targets_only_loss

    seen = []

    def spy(model, batch, chunk_rows, grad_in_forward, loc=None):
        seen.append(loc)
        return targets_only_loss(model, batch, chunk_rows, grad_in_forward, loc=loc)

    monkeypatch.setattr(trainer, "targets_only_loss", spy)
    run(make_config("phase2", "training.max_steps=1", "training.eval_strategy=no",
                    "training.loc_label_sigma=12", "training.loc_l1_weight=0.5"))
    assert seen and all(isinstance(loc, LocTargets) for loc in seen)
    assert (seen[0].n_bins, seen[0].sigma, seen[0].l1_weight) == (1024, 12.0, 0.5)


def test_two_stage_phase2_updates_lora_only_from_lora_start_step(make_config):
    """training.lora_start_step=2: steps 1-2 move the <loc> rows and the projector, not LoRA; step 3 does."""
    from transformers import TrainerCallback

    snapshots = []

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            named = dict(model.named_parameters())
            lora = {n: p.detach().clone() for n, p in named.items() if "lora_" in n}
            other = {n: p.detach().clone() for n, p in named.items() if p.requires_grad and "lora_" not in n}
            snapshots.append((lora, other))

    start = {}

    class First(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            start["lora"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    run(make_config("phase2", "training.max_steps=3", "training.eval_strategy=no", "training.warmup_steps=0",
                    "training.lora_start_step=2"), callbacks=[First(), Snap()])
    assert len(snapshots) == 3
    for lora, _ in snapshots[:2]:
        assert all(torch.equal(lora[n], start["lora"][n]) for n in lora)
    assert any(not torch.equal(snapshots[2][0][n], start["lora"][n]) for n in start["lora"])
    assert any(not torch.equal(snapshots[1][1][n], snapshots[0][1][n]) for n in snapshots[0][1])


def test_an_epoch_that_reads_no_image_runs_without_dataloader_workers():
    from accelerate import Accelerator, skip_first_batches

    from xray_train.trainer import WorkersOnlyWhileReadingCallback

    class Films(torch.utils.data.Dataset):
        """Says whether it reads images; each item names the worker that made it (-1: this process)."""

        reads = True

        def __len__(self):
            return 6

        def reads_images(self):
            return self.reads

        def __getitem__(self, i):
            worker = torch.utils.data.get_worker_info()
            return torch.tensor([i, -1 if worker is None else worker.id])

    def epoch(loader):
        callback.on_epoch_begin(None, None, None, train_dataloader=loader)
        batches = list(loader)
        return [b[:, 0].tolist() for b in batches], {w for b in batches for w in b[:, 1].tolist()}

    films = Films()
    loader = Accelerator(cpu=True).prepare(
        torch.utils.data.DataLoader(films, batch_size=2, num_workers=2, prefetch_factor=4))
    callback = WorkersOnlyWhileReadingCallback(films)
    order, workers = epoch(loader)
    assert workers == {0, 1}  # images to read: the workers read them
    films.reads = False
    assert epoch(loader) == (order, {-1})  # the same batches, made in this process
    # Resuming part-way through such an epoch rebuilds the loader from this one: it must accept no workers.
    assert [b[:, 1].tolist() for b in skip_first_batches(loader, 1)] == [[-1, -1], [-1, -1]]


def test_the_run_s_inputs_are_read_selected_and_resolved_once(make_config, monkeypatch):
    from xray_train import train

    calls = []
    real_split = train.split_examples
    monkeypatch.setattr(train, "split_examples", lambda *a: calls.append(1) or real_split(*a))
    inputs = train.run_inputs(make_config("phase1"))
    assert calls == [1] and inputs.unresolved is None
    assert inputs.cfg.training.compile_vision_cache is not None  # resolved
    assert inputs.image_paths == sorted({ex.image_path for ex in inputs.train + inputs.validation}, key=str)
    assert len(inputs.train) == len(inputs.splits["train"]) and inputs.validation


def test_config_validate_keeps_settings_it_cannot_resolve(make_config, monkeypatch):
    from xray_train import train

    def refuse(cfg, images=0):
        raise XrayTrainError("training.bf16: this GPU has no bf16")

    monkeypatch.setattr(train, "resolve", refuse)
    cfg = make_config("phase1")
    with pytest.raises(XrayTrainError, match="no bf16"):
        train.run_inputs(cfg)
    inputs = train.run_inputs(cfg, strict=False)
    assert inputs.unresolved == "training.bf16: this GPU has no bf16" and inputs.cfg is cfg and inputs.train


def test_cache_features_runs_the_frozen_tower_alone_and_makes_the_cache_a_run_opens(make_config, monkeypatch,
                                                                                   tmp_path):
    from xray_train import features, model, train
    from xray_train.collate import PromptEncoder
    from xray_train.features import FeatureMode

    monkeypatch.setenv("XRAY_TRAIN_FEATURE_CACHE", str(tmp_path / "cache"))
    cfg = make_config("phase1", "training.fill_cache_during_epoch=false")
    real_build = model.build_training_model

    def no_training_model(*a, **k):
        raise AssertionError("cache-features built the training model")

    monkeypatch.setattr(model, "build_training_model", no_training_model)
    source = train.cache_features(cfg, echo=lambda *a: None)
    assert source.mode is FeatureMode.CACHED and source.folder.is_dir()

    # A training run of the same config finds that cache: it builds nothing.
    def no_build(*a, **k):
        raise AssertionError("the training run built the cache again")

    monkeypatch.setattr(features, "build_features", no_build)
    inputs = train.run_inputs(cfg)
    trained, processor = real_build(inputs.cfg)
    data = train.prepare_data(inputs.cfg, PromptEncoder(processor, inputs.cfg.system_prompt), inputs)
    train_set, _ = train.build_datasets(inputs.cfg, trained, processor, data)
    assert train_set.features.mode is FeatureMode.CACHED and train_set.features.folder == source.folder

    with pytest.raises(XrayTrainError, match="cache_vision_features is false"):
        train.cache_features(make_config("phase1", "training.cache_vision_features=false"), echo=lambda *a: None)
