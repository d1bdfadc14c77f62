"""Publish a trained adapter to the Hugging Face Hub with a model card that says what it really is."""

from xray_train.hub.adapter import AdapterInfo, validate_adapter_dir, validate_repo_id
from xray_train.hub.card import build_model_card
from xray_train.hub.sanitise import sanitise
from xray_train.hub.upload import push_to_hub, resolve_token, stage_upload

__all__ = [
    "AdapterInfo",
    "build_model_card",
    "push_to_hub",
    "resolve_token",
    "sanitise",
    "stage_upload",
    "validate_adapter_dir",
    "validate_repo_id",
]
