"""xray-train: two-phase QLoRA fine-tuning of MedGemma-4B into a chest X-ray report + box assistant."""

__version__ = "0.1.0"


def load_adapter(adapter_dir, **kwargs):
    """Rebuild base model + loc tokens + adapter + processor from an xray-train output dir in one call.

    See ``xray_train.model.load_adapter`` for the arguments. A problem with the input (a missing run
    directory, a moved base) raises one line, ``XrayTrainError``, without the library frames beneath it.
    """
    from xray_train.errors import XrayTrainError
    from xray_train.model import load_adapter as _load

    try:
        return _load(adapter_dir, **kwargs)
    except XrayTrainError as exc:
        raise exc.with_traceback(None) from None


__all__ = ["load_adapter", "__version__"]
