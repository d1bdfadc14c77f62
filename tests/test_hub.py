"""Model card, adapter refusal rules, staging and the upload path against a local stand-in Hub."""

from __future__ import annotations

import base64
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import save_file

from xray_train.config import RunConfig, dump_config
from xray_train.errors import XrayTrainError
from xray_train.hub import (
    build_model_card,
    push_to_hub,
    resolve_token,
    sanitise,
    stage_upload,
    validate_adapter_dir,
    validate_repo_id,
)
from xray_train.hub.adapter import published_base
from xray_train.run_dir import LINEAGE, RunDir, sha256_of

FAKE_TOKEN = "hf_TESTSECRET1234567890abcdefABCDEF"
LM = "base_model.model.model.language_model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
EXPECTED_UPLOAD = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "eval_results.json",
    "loss_curve.png",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "training_summary.json",
    "xray_train_config.yaml",
}


def _tensors(lora_b_zero: bool = False, vision: bool = False) -> dict:
    rng = np.random.default_rng(0)
    t = {}
    for i in range(2):
        for m in ("q_proj", "v_proj"):
            t[LM.format(i=i, m=m, ab="A")] = rng.standard_normal((4, 16)).astype(np.float32)
            b = np.zeros((16, 4), np.float32) if lora_b_zero else rng.standard_normal((16, 4)).astype(np.float32)
            t[LM.format(i=i, m=m, ab="B")] = b
    t["base_model.model.model.multi_modal_projector.mm_input_projection_weight"] = np.ones((8, 8), np.float32)
    if vision:
        key = "base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
        t[key] = np.ones((4, 16), np.float32)
    return t


def make_adapter(
    root: Path,
    phase: str = "phase2",
    eval_results: dict | None = None,
    tensors: dict | None = None,
    extra_yaml: str = "",
) -> Path:
    d = root / f"run_{phase}"
    d.mkdir(parents=True)
    save_file(_tensors() if tensors is None else tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": "google/medgemma-4b-it",
        "target_modules": r".*language_model.*\.(q_proj|v_proj)",
    }))
    loc = [{"id": 262145 + i, "content": f"<loc{i:04d}>", "special": False} for i in range(1024)]
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": loc if phase == "phase2" else []}))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    (d / "processor_config.json").write_text(json.dumps({"processor_class": "Gemma3Processor"}))
    (d / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['role'] }}{% endfor %}")
    data = (
        {"dataset": "indiana", "image_root": "/data/iu/images", "reports_csv": "/data/iu/r.csv",
         "projections_csv": "/data/iu/p.csv"}
        if phase == "phase2"
        else {"dataset": "padchest", "csv": "/data/pc/labels.csv.gz", "image_root": "/data/pc"}
    )
    cfg = RunConfig(
        phase=phase, output_dir=str(d), data=data,
        model={"base": "google/medgemma-4b-it", "revision": "a" * 40},
        lora={"r": 8, "alpha": 16},
        training={"learning_rate": 1.5e-4, "max_steps": 300, "report_to": ["wandb"]},
    )
    (d / "xray_train_config.yaml").write_text(dump_config(cfg) + extra_yaml)
    (d / "training_summary.json").write_text(json.dumps({
        "global_step": 300, "train_runtime_s": 812.5, "data": {"train_examples": 2868, "val_examples": 160},
    }))
    if eval_results is not None:
        (d / "eval_results.json").write_text(json.dumps(eval_results))
    (d / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    # Things that must never be uploaded.
    (d / "optimizer.pt").write_bytes(b"pickle!")
    (d / "training_args.bin").write_bytes(b"pickle!")
    (d / "checkpoint-100").mkdir()
    (d / "checkpoint-100" / "adapter_model.safetensors").write_bytes(b"x")
    (d / "events.out.tfevents.123").write_bytes(b"log")
    (d / "example_prediction.png").write_bytes(b"\x89PNG\r\n\x1a\nan X-ray")  # dataset image: not published
    return d


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


# ---------------------------------------------------------------------------------------------
# Card


def test_card_front_matter_and_sections(tmp_path):
    d = make_adapter(tmp_path, "phase2")
    card = build_model_card(d, repo_id="my-lab/cxr-lora")
    fm = _front_matter(card)
    assert fm["base_model"] == "google/medgemma-4b-it"
    assert fm["library_name"] == "peft"
    assert fm["pipeline_tag"] == "image-text-to-text"
    assert {"medical", "radiology", "chest-x-ray", "lora", "qlora", "medgemma", "xray-train"} <= set(fm["tags"])
    assert fm["datasets"] == ["Indiana University Chest X-ray collection (OpenI)"]
    assert fm["license"] == "other" and "health-ai-developer-foundations" in fm["license_link"]
    assert "NOT FOR CLINICAL USE" in card
    assert "AutoModelForImageTextToText" in card and "PaliGemma" not in card.replace("not a PaliGemma model", "")
    assert 'AutoProcessor.from_pretrained(ADAPTER)' in card and 'ADAPTER = "my-lab/cxr-lora"' in card
    assert "resize_token_embeddings(len(processor.tokenizer))" in card
    assert "PeftModel.from_pretrained" in card and "xray_train.load_adapter" in card
    assert "Weak box labels" in card  # Indiana + MeSH atlas boxes
    assert "<loc0000>" in card and "round(v * 1023)" in card
    assert "r = 8, alpha = 16" in card and "`q_proj` and `v_proj`" in card
    assert "trained and saved with the adapter" in card  # projector in phase 2
    assert "| learning_rate | 0.00015 |" in card  # not rounded to 0.0001 or 0.0002
    assert "| max_steps | 300 |" in card
    assert "| data.train_examples | 2868 |" in card
    assert "**Not evaluated.**" in card
    assert "model, processor = xray_train.load_adapter(snapshot_download(\"my-lab/cxr-lora\"))" in card
    assert "not recorded" in card  # phase 2 alone: lineage unknown, not claimed
    assert "![Training loss](loss_curve.png)" in card


def test_card_reads_base_from_saved_config(tmp_path):
    d = make_adapter(tmp_path, "phase1")
    text = (d / "xray_train_config.yaml").read_text().replace("google/medgemma-4b-it", "google/medgemma-4b-pt")
    (d / "xray_train_config.yaml").write_text(text)
    card = build_model_card(d)
    assert _front_matter(card)["base_model"] == "google/medgemma-4b-pt"
    assert 'BASE = "google/medgemma-4b-pt"' in card
    assert _front_matter(card)["datasets"] == ["PadChest (BIMCV)"]
    assert "Weak box labels" not in card and "<loc0000>" not in card
    assert "frozen (base weights)" in card


def test_card_reports_eval_numbers_and_nothing_invented(tmp_path):
    results = {
        "split": "test",
        "phase2": {"mean_iou": 0.41237, "hit_rate_50": 0.3856, "map50": 0.2719, "ious": [0.1, 0.9],
                   "per_label": {"cardiomegaly": {"ap50": 0.6125, "n_reference": 40}}},
        "parse_rate": 0.9875,
    }
    card = build_model_card(make_adapter(tmp_path, "phase2", eval_results=results))
    for number in ("0.4124", "0.3856", "0.2719", "0.9875", "0.6125"):
        assert number in card
    assert "Not evaluated" not in card
    assert "0.1000" not in card  # the raw IoU list is not dumped into the card


def test_card_from_eval_results_json_alone_names_the_parse_counts(tmp_path):
    results = {"n_examples": 40, "n_parsed": 39, "n_unparsed": 1, "parse_rate": 0.975, "f1": 0.5,
               "baseline": {"n_parsed": 0, "n_unparsed": 40, "parse_rate": 0.0, "f1": 0.0}}
    card = build_model_card(make_adapter(tmp_path, "phase2", eval_results=results))
    section = card.split("## Evaluation\n", 1)[1].split("\n## Usage", 1)[0]
    assert section.strip().startswith("Answers in the trained format: adapter 39 of 40, base model 0 of 40.")
    assert "never as a normal study" in section


def test_card_evaluation_is_the_table_of_eval_results_md(tmp_path):
    """The card's Evaluation section embeds the tables ``xray-train evaluate`` wrote, not flattened keys,
    and shows neither a local path nor a secret that reached the file."""
    from xray_train.evaluate import markdown_report

    results = {
        "adapter": "run_phase2", "phase": "phase2", "task": "detect", "split": "test", "dataset": "indiana",
        "n_examples": 40, "parse_rate": 0.9875, "map50": 0.2719, "iou": 0.41237,
        "per_finding": {"cardiomegaly": {"support": 12, "predicted": 10, "f1": 0.6125}},
        "boxes": {"per_label": {"cardiomegaly": {"n_reference": 12, "n_predicted": 9, "ap50": 0.5,
                                                 "mean_iou": 0.45}}},
        "baseline": {"parse_rate": 0.0, "map50": 0.0},
    }  # fmt: skip
    d = make_adapter(tmp_path, "phase2", eval_results=results)
    leak = f"\nRun on /home/alice/data/iu/images with {FAKE_TOKEN}.\n"
    (d / "eval_results.md").write_text(markdown_report(results) + leak)
    card = build_model_card(d, repo_id="my-lab/cxr-lora")
    section = card.split("## Evaluation\n", 1)[1].split("\n## Usage", 1)[0]
    assert "| answers in the trained format (`parse_rate`) | 0.988 | 0.000 | +0.988 |" in section
    assert "| mAP@0.5 (`map50`) | 0.272 | 0.000 | +0.272 |" in section
    assert "#### Per finding (top 25 by support)" in section  # nested under the card's section
    assert "| cardiomegaly | 12 | 10 | 0.613 | n/a |" in section
    assert "#### Boxes per label" in section
    assert "# Evaluation: run_phase2" not in card  # the file's own title
    assert "| metric | value |" not in section and "per_finding.cardiomegaly" not in section  # no flattened keys
    assert "/home/alice" not in card and "/data/iu" not in card and FAKE_TOKEN not in card
    assert "Not evaluated" not in card


def test_card_shows_the_phase1_parent_recorded_in_the_lineage(tmp_path):
    d = make_adapter(tmp_path, "phase2")
    p1 = make_adapter(tmp_path / "p1", "phase1")
    RunDir(p1).mark_finished("phase1", 300)
    RunDir(d).write_lineage("phase2", RunDir(p1))
    card = build_model_card(d)
    assert _front_matter(card)["datasets"] == ["PadChest (BIMCV)", "Indiana University Chest X-ray collection (OpenI)"]
    assert "Phase 1 - structured report" in card and "Phase 2 - localisation" in card
    assert "Phase 2 continued the Phase-1 adapter `run_phase1`" in card
    assert sha256_of(p1 / "adapter_model.safetensors") in card
    assert str(p1) not in card and "not recorded" not in card
    # The snippet asks with the exact training instruction of the last phase, and names the earlier one.
    from xray_train.collate import TASK_PROMPTS

    assert json.dumps(TASK_PROMPTS["detect"]) in card
    assert f"# phase1 was trained with the prompt {json.dumps(TASK_PROMPTS['report'])}" in card
    staged = stage_upload(d, tmp_path / "staged")
    assert LINEAGE not in staged  # the card carries the lineage; the file names folders of this machine
    assert str(p1) not in (tmp_path / "staged" / "README.md").read_text()


def test_card_of_a_phase2_run_without_phase1_says_so(tmp_path):
    d = make_adapter(tmp_path, "phase2")
    RunDir(d).write_lineage("phase2", None)
    card = build_model_card(d)
    assert "started from a fresh adapter" in card
    assert "Phase 1 - structured report" not in card and "not recorded" not in card


# ---------------------------------------------------------------------------------------------
# Refusals


def test_validate_accepts_trained_adapter(tmp_path):
    info = validate_adapter_dir(make_adapter(tmp_path))
    assert info.n_lora_b == 4 and info.n_trained_lora_b == 4
    assert info.other_modules == ("multi_modal_projector",)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({}, "holds no tensors"),
        (_tensors(lora_b_zero=True), "untrained"),
        ({"w": np.zeros((4, 4), np.float32)}, "no LoRA"),
        (_tensors(vision=True), "vision tower"),
        ({**_tensors(), LM.format(i=9, m="q_proj", ab="B"): np.full((2, 2), np.nan, np.float32)}, "NaN"),
    ],
)
def test_refuses_bad_weights(tmp_path, tensors, message):
    d = make_adapter(tmp_path, tensors=tensors)
    with pytest.raises(XrayTrainError, match=message) as exc:
        validate_adapter_dir(d)
    assert "\n" not in str(exc.value) and "adapter_model.safetensors" in str(exc.value)


def test_refuses_corrupt_safetensors(tmp_path):
    d = make_adapter(tmp_path)
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(XrayTrainError, match="not a readable safetensors file"):
        validate_adapter_dir(d)


@pytest.mark.parametrize(
    "remove, message",
    [
        (["processor_config.json"], "processor files missing"),
        (["tokenizer.json"], "tokenizer files missing"),
        (["adapter_config.json"], "adapter_config.json: missing"),
        (["adapter_model.safetensors"], "adapter_model.safetensors: missing"),
        (["xray_train_config.yaml"], "xray_train_config.yaml: missing"),
    ],
)
def test_refuses_missing_files(tmp_path, remove, message):
    d = make_adapter(tmp_path)
    for name in remove:
        (d / name).unlink()
    with pytest.raises(XrayTrainError, match=message):
        validate_adapter_dir(d)


def test_refuses_phase2_tokenizer_without_loc_tokens(tmp_path):
    d = make_adapter(tmp_path)
    (d / "tokenizer.json").write_text(json.dumps({"added_tokens": []}))
    with pytest.raises(XrayTrainError, match="<locNNNN>"):
        validate_adapter_dir(d)


def test_preprocessor_config_alone_is_enough(tmp_path):
    d = make_adapter(tmp_path, "phase1")
    (d / "processor_config.json").rename(d / "preprocessor_config.json")
    assert validate_adapter_dir(d).n_trained_lora_b == 4
    staged = stage_upload(d, tmp_path / "staged")
    assert "preprocessor_config.json" in staged and "processor_config.json" not in staged
    (d / "preprocessor_config.json").unlink()
    with pytest.raises(XrayTrainError, match="processor files missing"):
        validate_adapter_dir(d)


@pytest.mark.parametrize(
    "repo_id",
    ["noslash", "a/b/c", "/name", "org/", "org/na me", "org/-name", "org/name.", "org/a--b", "org/a..b",
     "org/name.git", "org/" + "x" * 97, "org/näme", ""],
)
def test_bad_repo_ids(repo_id):
    with pytest.raises(XrayTrainError, match="repo id"):
        validate_repo_id(repo_id)


@pytest.mark.parametrize("repo_id", ["my-lab/medgemma-cxr-lora", "User_1/model.v2", "a/b"])
def test_good_repo_ids(repo_id):
    assert validate_repo_id(repo_id) == repo_id


# ---------------------------------------------------------------------------------------------
# Token


def test_resolve_token_order_and_missing(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", "hf_fromenvironment")
    assert resolve_token("hf_explicit") == "hf_explicit"
    assert resolve_token() == "hf_fromenvironment"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_saved_login")
    assert resolve_token() == "hf_saved_login"
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(XrayTrainError, match="huggingface-cli login") as exc:
        resolve_token()
    assert "HF_TOKEN" in str(exc.value)


def test_sanitise_keeps_every_real_config_key(tmp_path):
    saved = yaml.safe_load((make_adapter(tmp_path) / "xray_train_config.yaml").read_text())
    assert sanitise(saved) == saved


def test_validate_reads_bfloat16_weights(tmp_path):
    import torch
    from safetensors.torch import save_file as save_torch

    d = make_adapter(tmp_path)
    tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in _tensors().items()}
    save_torch(tensors, str(d / "adapter_model.safetensors"))
    assert validate_adapter_dir(d).n_trained_lora_b == 4
    zero_b = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in tensors.items()}
    save_torch(zero_b, str(d / "adapter_model.safetensors"))
    with pytest.raises(XrayTrainError, match="untrained"):
        validate_adapter_dir(d)


def test_sanitise_removes_secrets_keeps_lookalikes():
    cfg = {
        "hub_token": "anything",
        "model": {"add_loc_tokens": True, "revision": "a" * 40},
        "training": {"report_to": ["wandb"], "wandb_api_key": "k", "note": FAKE_TOKEN},
        "tokens": [FAKE_TOKEN, "ok"],
        "pad_token": "<pad>",
    }
    assert sanitise(cfg) == {
        "model": {"add_loc_tokens": True, "revision": "a" * 40},
        "training": {"report_to": ["wandb"]},
        "tokens": ["ok"],
        "pad_token": "<pad>",
    }


# ---------------------------------------------------------------------------------------------
# Staging and dry run


def test_dry_run_stages_exact_folder(tmp_path):
    d = make_adapter(tmp_path, eval_results={"phase2": {"map50": 0.25}}, extra_yaml=f"hub_token: {FAKE_TOKEN}\n")
    out = tmp_path / "dry"
    assert push_to_hub(d, "my-lab/cxr-lora", dry_run_dir=out) == str(out)
    assert {p.name for p in out.iterdir()} == EXPECTED_UPLOAD
    assert (out / "adapter_model.safetensors").read_bytes() == (d / "adapter_model.safetensors").read_bytes()
    staged_cfg = yaml.safe_load((out / "xray_train_config.yaml").read_text())
    assert "hub_token" not in staged_cfg and staged_cfg["model"]["base"] == "google/medgemma-4b-it"
    for p in out.iterdir():
        assert FAKE_TOKEN.encode() not in p.read_bytes(), p.name
    # The folder must be new or empty: never mix a stale staging with a new one.
    with pytest.raises(XrayTrainError, match="new or empty"):
        stage_upload(d, out)


def test_stage_refuses_file_holding_the_token(tmp_path):
    d = make_adapter(tmp_path)
    (d / "chat_template.jinja").write_text(f"{{# {FAKE_TOKEN} #}}")
    with pytest.raises(XrayTrainError, match="contains the Hub token") as exc:
        stage_upload(d, tmp_path / "staged", token=FAKE_TOKEN)
    assert FAKE_TOKEN not in str(exc.value)


# ---------------------------------------------------------------------------------------------
# Upload against a stand-in Hub (a real HTTP server on 127.0.0.1)


class _StandInHub:
    """Implements the endpoints ``create_repo`` + ``upload_folder`` use when every file is 'regular':
    POST /api/repos/create, /api/validate-yaml (README front matter), /api/models/{repo}/preupload/{rev}
    and /api/models/{repo}/commit/{rev}. Answering "regular" to preupload makes the client send each
    file base64-encoded inside the commit's NDJSON body, so nothing goes to xet/LFS storage. Any other
    request (e.g. huggingface_hub's agent-registry GET) gets a 404 and is recorded.
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.created: list[dict] = []
        self.validated: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _reply(self, status: int, obj) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
                self._reply(404, {"error": "not implemented in stand-in"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = self.path.split("?")[0]
                hub.requests.append({"method": "POST", "path": path, "headers": dict(self.headers), "body": body})
                base = f"http://{self.headers['Host']}"
                if path == "/api/validate-yaml":
                    hub.validated.append(json.loads(body)["content"])
                    self._reply(200, {"errors": [], "warnings": []})
                elif path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    self._reply(200, {"url": f"{base}/{payload['organization']}/{payload['name']}"})
                elif "/preupload/" in path:
                    files = json.loads(body)["files"]
                    self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]})
                elif "/commit/" in path:
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    self._reply(200, {"commitUrl": f"{base}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
                else:
                    self._reply(404, {"error": f"stand-in has no {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants

    real_getaddrinfo = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        # huggingface_hub 1.x fetches an agent registry from its default ENDPOINT while building
        # headers; any such stray call must fail here rather than reach the real Hub.
        if host not in ("127.0.0.1", "localhost"):
            raise OSError(f"test network guard: refused to resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # hf_xet starts a session (and its log files) on upload even when no file goes to xet storage.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "hf_home" / "xet"))
    with _StandInHub() as hub:
        # Default-endpoint requests (not ours) land on the stand-in too, and are answered 404.
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        yield hub


def test_push_uploads_to_stand_in_and_token_never_leaks(tmp_path, hub_env, caplog, capsys):
    hub = hub_env
    d = make_adapter(tmp_path, eval_results={"phase2": {"map50": 0.25}})
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    caplog.set_level(logging.DEBUG)

    url = push_to_hub(d, "my-lab/cxr-lora", token=FAKE_TOKEN, endpoint=hub.url)

    assert url == f"{hub.url}/my-lab/cxr-lora"
    assert hub.created == [{"name": "cxr-lora", "organization": "my-lab", "visibility": "private", "type": "model"}]
    assert set(hub.files) == EXPECTED_UPLOAD
    assert hub.files["adapter_model.safetensors"] == before[d / "adapter_model.safetensors"]
    card = hub.files["README.md"].decode()
    assert hub.validated == [card]
    assert _front_matter(card)["library_name"] == "peft" and "| phase2.map50 | 0.25 |" in card
    # The token travels only as the Authorization header of requests to the stand-in.
    posts = [r for r in hub.requests if r["method"] == "POST"]
    assert [r["path"] for r in posts] == [
        "/api/repos/create",
        "/api/validate-yaml",
        "/api/models/my-lab/cxr-lora/preupload/main",
        "/api/models/my-lab/cxr-lora/commit/main",
    ]
    assert posts and all(r["headers"].get("authorization") == f"Bearer {FAKE_TOKEN}" for r in posts)
    for r in hub.requests:
        assert FAKE_TOKEN.encode() not in r.get("body", b"")
        assert FAKE_TOKEN not in r["path"]
    for name, data in hub.files.items():
        assert FAKE_TOKEN.encode() not in data, name
    # Nothing written into the adapter dir, and nothing printed or logged carries it.
    after = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert after == before
    assert not any(FAKE_TOKEN.encode() in data for data in after.values())
    for p in (tmp_path / "hf_home").rglob("*"):  # huggingface_hub / hf_xet caches and logs
        assert not p.is_file() or FAKE_TOKEN.encode() not in p.read_bytes(), p
    out, err = capsys.readouterr()
    assert FAKE_TOKEN not in out + err + caplog.text
    assert "hf_TESTSECRET" not in caplog.text


def test_push_error_is_one_line_without_token(tmp_path, hub_env, monkeypatch):
    hub = hub_env
    d = make_adapter(tmp_path)
    # Point at a path the stand-in does not serve: create_repo gets a 404.
    with pytest.raises(XrayTrainError) as exc:
        push_to_hub(d, "my-lab/cxr-lora", token=FAKE_TOKEN, endpoint=hub.url + "/nowhere")
    assert FAKE_TOKEN not in str(exc.value) and "\n" not in str(exc.value)
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_push_without_token_fails_before_network(tmp_path, hub_env, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(XrayTrainError, match="no Hugging Face token"):
        push_to_hub(make_adapter(tmp_path), "my-lab/cxr-lora", endpoint=hub_env.url)
    assert hub_env.requests == []


def test_push_refuses_untrained_before_network(tmp_path, hub_env):
    d = make_adapter(tmp_path, tensors=_tensors(lora_b_zero=True))
    with pytest.raises(XrayTrainError, match="untrained"):
        push_to_hub(d, "my-lab/cxr-lora", token=FAKE_TOKEN, endpoint=hub_env.url)
    assert hub_env.requests == []


# ---------------------------------------------------------------------------------------------
# Publishing an adapter trained from a local copy of the base


def test_published_base_comes_from_the_flag_or_the_local_folder(tmp_path):
    assert published_base("google/medgemma-4b-it") == "google/medgemma-4b-it"
    local = tmp_path / "medgemma"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(XrayTrainError, match="--base-model") as exc:
        published_base(str(local))
    assert "\n" not in str(exc.value)
    assert published_base(str(local), "google/medgemma-4b-it") == "google/medgemma-4b-it"
    with pytest.raises(XrayTrainError, match="--base-model 'my base'"):
        published_base(str(local), "my base")
    (local / "config.json").write_text(json.dumps({"_name_or_path": "google/medgemma-4b-it"}))
    assert published_base(str(local)) == "google/medgemma-4b-it"
    (local / "config.json").write_text(json.dumps({"_name_or_path": str(local)}))  # a path names no Hub id
    with pytest.raises(XrayTrainError, match="--base-model"):
        published_base(str(local))
    snapshot = tmp_path / "hf" / "models--google--medgemma-4b-it" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert published_base(str(snapshot)) == "google/medgemma-4b-it"


@pytest.mark.slow
def test_adapter_trained_from_a_local_base_is_published_under_its_hub_id(tmp_path, tiny_model_dir, monkeypatch):
    """`push-to-hub --base-model google/medgemma-4b-it --dry-run` on a run whose model.base is a local
    folder: the card and the staged adapter_config.json name the Hub id, no local path is published, the
    run dir is untouched, and peft loads the staged adapter from that Hub id."""
    import shutil

    from peft import PeftConfig, PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForImageTextToText
    from typer.testing import CliRunner

    from xray_train.cli import app
    from xray_train.config import RunConfig
    from xray_train.model import build_training_model
    from xray_train.resolve import resolve

    from .conftest import SAMPLES

    local_base = tmp_path / "downloads" / "medgemma-local-copy"
    shutil.copytree(tiny_model_dir, local_base)
    cfg = resolve(RunConfig.model_validate({
        "phase": "phase1", "output_dir": str(tmp_path / "run"), "model": {"base": str(local_base)},
        "data": {"dataset": "padchest", "image_root": str(SAMPLES), "csv": str(SAMPLES / "x.csv")},
    }))
    model, processor = build_training_model(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)  # a trained adapter: the all-zero initial lora_B is refused
    run_dir = RunDir(cfg.output_dir)
    model.save_pretrained(run_dir.path, save_embedding_layers=False)
    processor.save_pretrained(run_dir.path)
    run_dir.write_config(cfg)
    assert run_dir.adapter_config()["base_model_name_or_path"] == str(local_base)
    before = {p: p.read_bytes() for p in run_dir.path.rglob("*") if p.is_file()}

    # The local copy is that Hub model: the Hub's config.json for the id is the copy's own.
    import xray_train.preflight

    monkeypatch.setattr(xray_train.preflight, "hub_config_file", lambda repo_id, revision: local_base / "config.json")
    runner = CliRunner()
    refused = runner.invoke(app, ["push-to-hub", str(run_dir.path), "--repo-id", "my-lab/cxr", "--dry-run",
                                  str(tmp_path / "refused")])
    assert refused.exit_code != 0 and "--base-model" in str(refused.exception)
    staged = tmp_path / "staged"
    result = runner.invoke(app, ["push-to-hub", str(run_dir.path), "--repo-id", "my-lab/cxr", "--dry-run", str(staged),
                                 "--base-model", "google/medgemma-4b-it"])
    assert result.exit_code == 0, result.output

    card = (staged / "README.md").read_text()
    assert "base_model: google/medgemma-4b-it" in card and _front_matter(card)["base_model"] == "google/medgemma-4b-it"
    assert 'BASE = "google/medgemma-4b-it"' in card
    for name in staged.iterdir():
        text = name.read_bytes()
        assert str(local_base).encode() not in text and local_base.name.encode() not in text, name.name
    assert json.loads((staged / "adapter_config.json").read_text())["base_model_name_or_path"] == "google/medgemma-4b-it"
    staged_model = yaml.safe_load((staged / "xray_train_config.yaml").read_text())["model"]
    assert staged_model["base"] == "google/medgemma-4b-it"
    assert staged_model["base_fingerprint"] is None  # the fingerprint was of the local folder, not of the Hub id
    assert {p: p.read_bytes() for p in run_dir.path.rglob("*") if p.is_file()} == before  # only read

    # A downloader: peft reads the base from the staged adapter_config.json; a local folder stands in
    # for the Hub repo of that id.
    hub = tmp_path / "hub"
    shutil.copytree(tiny_model_dir, hub / "google" / "medgemma-4b-it")
    monkeypatch.chdir(hub)
    base_id = PeftConfig.from_pretrained(staged).base_model_name_or_path
    assert base_id == "google/medgemma-4b-it"
    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_id), staged)
    expected = get_peft_model_state_dict(model)
    got = get_peft_model_state_dict(loaded)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key].float(), value.float(), msg=key)



# ---------------------------------------------------------------------------------------------
# The card names the data actually read; --base-model must be the model the run trained on


def _with_data(d: Path, data: dict) -> None:
    path = d / "xray_train_config.yaml"
    config = yaml.safe_load(path.read_text())
    config["data"] = {**config["data"], **data}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def test_card_of_a_run_on_the_bundled_samples_says_synthetic_not_padchest(tmp_path):
    from .conftest import SAMPLES, padchest_overrides

    d = make_adapter(tmp_path, "phase1")
    _with_data(d, dict(o.removeprefix("data.").split("=", 1) for o in padchest_overrides(SAMPLES)))
    card = build_model_card(d)
    assert _front_matter(card)["datasets"] == []  # the Hub's dataset metadata names no dataset it never saw
    assert "Trained on synthetic samples" in card
    assert "the synthetic samples bundled with xray-train, in PadChest (BIMCV) format (drawn films, not real X-rays)" in card
    assert "label sources" not in card  # PadChest's labelling notes describe data it did not read
    assert "Trained and evaluated on the synthetic samples bundled" in card

    real = make_adapter(tmp_path / "real", "phase1")
    card = build_model_card(real)
    assert _front_matter(card)["datasets"] == ["PadChest (BIMCV)"] and "synthetic" not in card


def test_card_of_a_phase2_run_names_a_synthetic_phase1_parent(tmp_path):
    from .conftest import SAMPLES

    d = make_adapter(tmp_path, "phase2")
    _with_data(d, {"image_root": str(SAMPLES / "indiana" / "images" / "images_normalized")})
    parent = {"path": "/gone", "phase": "phase1", "dataset": "padchest", "adapter_sha256": "0" * 64,
              "synthetic_sample": True}
    (d / LINEAGE).write_text(json.dumps({"phase": "phase2", "parent": parent}))
    card = build_model_card(d)
    assert _front_matter(card)["datasets"] == []
    assert "- phase1: the synthetic samples bundled with xray-train, in PadChest (BIMCV) format" in card
    assert "Weak box labels" not in card  # no MeSH atlas boxes were read either


def _local_base(root: Path, **text_config) -> Path:
    folder = root / "local-base"
    folder.mkdir(parents=True)
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
              "text_config": {"vocab_size": 262208, "hidden_size": 2560, "num_hidden_layers": 34, **text_config},
              "vision_config": {"hidden_size": 1152, "num_hidden_layers": 27}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _hub_medgemma(tmp_path, monkeypatch) -> None:
    """google/medgemma-4b-it's config.json, as the Hub (or its cache) would give it."""
    import xray_train.preflight

    hub = _local_base(tmp_path / "hub")
    monkeypatch.setattr(xray_train.preflight, "hub_config_file",
                        lambda repo_id, revision: hub / "config.json" if repo_id == "google/medgemma-4b-it" else
                        (_ for _ in ()).throw(XrayTrainError(f"model.base: {repo_id} was not found on the Hub")))


@pytest.mark.parametrize("mismatch", [{"hidden_size": 64, "num_hidden_layers": 2}, {"vocab_size": 1000}])
def test_base_model_that_is_not_the_runs_base_is_refused_unless_forced(tmp_path, monkeypatch, mismatch):
    _hub_medgemma(tmp_path, monkeypatch)
    d = make_adapter(tmp_path, "phase1")
    _with_data(d, {})
    config = yaml.safe_load((d / "xray_train_config.yaml").read_text())
    config["model"].update(base=str(_local_base(tmp_path / "tiny", **mismatch)), revision=None)
    (d / "xray_train_config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(XrayTrainError, match="--base-model google/medgemma-4b-it: the run was trained on another model") as exc:
        push_to_hub(d, "my-lab/cxr", dry_run_dir=tmp_path / "refused", base_model="google/medgemma-4b-it")
    assert "--force" in str(exc.value) and "\n" not in str(exc.value)
    key = "hidden_size" if "hidden_size" in mismatch else "vocab_size"
    assert f"text_config.{key}" in str(exc.value)
    assert not (tmp_path / "refused").exists()
    staged = push_to_hub(d, "my-lab/cxr", dry_run_dir=tmp_path / "forced", base_model="google/medgemma-4b-it", force=True)
    assert _front_matter((Path(staged) / "README.md").read_text())["base_model"] == "google/medgemma-4b-it"


def test_base_model_matching_the_runs_base_is_published(tmp_path, monkeypatch):
    _hub_medgemma(tmp_path, monkeypatch)
    d = make_adapter(tmp_path, "phase1")
    config = yaml.safe_load((d / "xray_train_config.yaml").read_text())
    config["model"].update(base=str(_local_base(tmp_path / "copy")), revision=None)
    (d / "xray_train_config.yaml").write_text(yaml.safe_dump(config))
    staged = push_to_hub(d, "my-lab/cxr", dry_run_dir=tmp_path / "ok", base_model="google/medgemma-4b-it")
    assert json.loads((Path(staged) / "adapter_config.json").read_text())["base_model_name_or_path"] == "google/medgemma-4b-it"
    # Unknown to the Hub and its cache: cannot be checked, so refused with the way round it.
    with pytest.raises(XrayTrainError, match="cannot check that the run's base is that model.*--force"):
        push_to_hub(d, "my-lab/cxr", dry_run_dir=tmp_path / "other", base_model="my-lab/other-base")


@pytest.mark.parametrize("source, fmt, revision, title, hub", [
    ("someone/cxr-reports", "auto", "0123abc", "someone/cxr-reports (Hugging Face Hub, revision 0123abc)",
     ["someone/cxr-reports"]),
    ("/private/alice/reports.parquet", "parquet", None, "local files (parquet) read with Hugging Face datasets", []),
    ("alice/*.parquet", "auto", None, "local files read with Hugging Face datasets", []),  # a glob, not an id
])
def test_card_of_an_hf_run_names_its_hub_dataset_and_hides_a_local_path(tmp_path, source, fmt, revision, title, hub):
    d = make_adapter(tmp_path, "phase1")
    _with_data(d, {"dataset": "hf", "source": source, "format": fmt, "revision": revision,
                   "columns": {"image": "image", "report": ["report"]}})
    card = build_model_card(d)
    assert f"- phase1: {title}" in card
    assert _front_matter(card)["datasets"] == hub
    assert "alice" not in card
