"""Stage exactly what would be uploaded, then upload it.

Only an allow-list of files is staged (no checkpoints, optimizer states, logs or pickles); the saved
config and summaries are re-written with secret-looking keys and values removed, and every staged file
is checked for the token before anything is sent. The token is never printed, logged, written to a
file or put in an exception message.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from xray_train.errors import XrayTrainError
from xray_train.hub.adapter import (
    PROCESSOR_FILES,
    TOKENIZER_FILES,
    AdapterInfo,
    check_base_model,
    published_base,
    validate_adapter_dir,
    validate_repo_id,
)
from xray_train.hub.card import build_model_card
from xray_train.hub.sanitise import SECRET_VALUE, sanitise, scrub
from xray_train.outputs import atomic_write_text
from xray_train.report_plots import F1_BARS, IOU_HISTOGRAM
from xray_train.run_dir import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EVAL_RESULTS,
    LOSS_CURVE,
    RESOLVED_CONFIG,
    SUMMARY,
    RunDir,
)

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
#: Files copied verbatim (if present); configs and JSON summaries are re-written sanitised instead.
VERBATIM_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, *TOKENIZER_FILES, *PROCESSOR_FILES, *CHAT_TEMPLATE_FILES)
SANITISED_JSON = (SUMMARY, EVAL_RESULTS)
# Named plots only, never "*.png": an output dir may also hold rendered X-rays with drawn boxes, and
# dataset images must not be republished.
PLOT_FILES = (LOSS_CURVE, F1_BARS, IOU_HISTOGRAM)


def resolve_token(token: str | None = None) -> str:
    """An explicit token, else ``HF_TOKEN``, else the saved login. Never echoed anywhere."""
    candidates = [token, os.environ.get("HF_TOKEN")]
    for cand in candidates:
        if cand and cand.strip():
            return cand.strip()
    try:
        from huggingface_hub import get_token

        saved = get_token()
    except Exception as exc:  # e.g. a failed OIDC exchange; its message is not ours to repeat
        raise XrayTrainError(f"could not read the saved Hugging Face login ({type(exc).__name__})") from None
    if saved and saved.strip():
        return saved.strip()
    raise XrayTrainError(
        "no Hugging Face token: run `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN "
        "to a token with write access"
    )


def stage_upload(
    adapter_dir: Path | str,
    dest_dir: Path | str,
    repo_id: str | None = None,
    token: str | None = None,
    info: AdapterInfo | None = None,
    base_model: str | None = None,
) -> list[str]:
    """Write exactly the folder that would be uploaded; return its file names, sorted.

    ``dest_dir`` must not exist or be empty. If ``token`` is given, every staged file is checked not
    to contain it. The staged ``adapter_config.json`` and config name the base by its Hub id
    (``published_base``); the run directory itself is only read.
    """
    run_dir = RunDir(adapter_dir)
    src = run_dir.path
    dest = Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise XrayTrainError(f"{dest}: staging folder must be new or empty")
    info = info or validate_adapter_dir(src)
    config = run_dir.config_dict()
    base = published_base(run_dir.config().model.base, base_model)
    dest.mkdir(parents=True, exist_ok=True)
    for name in VERBATIM_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    adapter_config = run_dir.adapter_config()
    if adapter_config.get("base_model_name_or_path") != base:
        # peft loads the base from here; a local path would not exist on a downloader's machine.
        adapter_config["base_model_name_or_path"] = base
        atomic_write_text(dest / ADAPTER_CONFIG, json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    if model.get("base") != base:
        # ``xray_train.load_adapter`` reads the base from the config: name the Hub id, without a local
        # folder's revision.
        config["model"] = {**model, "base": base, "revision": None, "base_fingerprint": None}
    atomic_write_text(dest / RESOLVED_CONFIG, yaml.safe_dump(sanitise(config), sort_keys=False))
    for name in SANITISED_JSON:
        data = run_dir.read_json(name)
        if data is not None:
            atomic_write_text(dest / name, json.dumps(sanitise(data), indent=2) + "\n")
    for name in PLOT_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    atomic_write_text(dest / CARD_NAME, build_model_card(src, repo_id=repo_id, info=info, base_model=base))

    files = sorted(p.name for p in dest.iterdir() if p.is_file())
    for name in files:
        data = (dest / name).read_bytes()
        # Belt and braces: sanitising removes known shapes; this catches the actual token anywhere.
        if token and token.encode() in data:
            raise XrayTrainError(f"{src / name}: contains the Hub token; refusing to upload it")
        if name.endswith((".yaml", ".md", ".jinja")) or name in SANITISED_JSON:
            if SECRET_VALUE.search(data.decode("utf-8", errors="replace")):
                raise XrayTrainError(f"{dest / name}: contains a credential-like string; refusing to upload it")
    return files


def push_to_hub(
    adapter_dir: Path | str,
    repo_id: str,
    private: bool = True,
    dry_run_dir: Path | str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload xray-train adapter",
    base_model: str | None = None,
    force: bool = False,
) -> str:
    """Validate, stage and upload; return the repo URL (with ``dry_run_dir``: the staged folder, no network).

    ``private`` applies when the repo is created; an existing repo keeps its visibility. ``base_model``:
    the base's Hub id, required when the run trained from a local folder that does not name one; refused
    when the run's base is another model (``check_base_model``) unless ``force``.
    """
    repo_id = validate_repo_id(repo_id)
    info = validate_adapter_dir(adapter_dir)
    model_cfg = RunDir(adapter_dir).config().model
    if base_model is not None and not force:
        published_base(model_cfg.base, base_model)  # the id's form first: a clear error for "my base"
        check_base_model(model_cfg.base, model_cfg.revision, base_model)
    base_model = published_base(model_cfg.base, base_model)
    if dry_run_dir is not None:
        files = stage_upload(adapter_dir, dry_run_dir, repo_id=repo_id, info=info, base_model=base_model)
        logger.info("dry run: %d files staged in %s for %s", len(files), dry_run_dir, repo_id)
        return str(Path(dry_run_dir))

    token = resolve_token(token)
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from xray_train import __version__

    with tempfile.TemporaryDirectory(prefix="xray_train_push_") as tmp:
        staged = Path(tmp) / "upload"
        files = stage_upload(adapter_dir, staged, repo_id=repo_id, token=token, info=info, base_model=base_model)
        api = HfApi(endpoint=endpoint, token=token, library_name="xray-train", library_version=__version__)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            logger.info("uploading %d files to %s", len(files), repo_id)
            api.upload_folder(repo_id=repo_id, folder_path=staged, repo_type="model", commit_message=commit_message)
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status == 401:
                msg = "the Hub rejected the token (HTTP 401): run `hf auth login` or set HF_TOKEN to a valid token"
            elif status == 403:
                msg = f"no write access to {repo_id} (HTTP 403): use a token with write permission for that namespace"
            else:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                msg = f"upload to {repo_id} failed: {first}"
            raise XrayTrainError(scrub(msg, token)) from None
        except httpx.HTTPError as exc:
            raise XrayTrainError(
                scrub(f"could not reach the Hub at {endpoint or 'huggingface.co'} ({type(exc).__name__})", token)
            ) from None
    return str(url)
