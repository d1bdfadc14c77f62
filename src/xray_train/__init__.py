"""xray-train: two-phase QLoRA fine-tuning of MedGemma-4B into a chest X-ray report + box assistant."""

__version__ = "0.1.0"


def load_adapter(adapter_dir, **kwargs):
    """Rebuild base model + loc tokens + adapter + processor from an xray-train output dir in one call.

    See ``xray_train.model.load_adapter`` for the arguments.
    """
    from xray_train.model import load_adapter as _load

    return _load(adapter_dir, **kwargs)


__all__ = ["load_adapter", "__version__"]
