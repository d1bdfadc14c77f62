"""Third-party messages printed on every run that name nothing a user of xray-train can change, silenced
one by one by their message (never a whole logger or warning category), for the command line and for
``xray_train.load_adapter`` alike."""

from __future__ import annotations

import logging
import warnings

#: (logger, start of the message) of log records dropped.
QUIET_LOGS = (
    # bitsandbytes' CPU backend asks for the optional `kernels` package, which would fetch a kernel from
    # the Hub at import; the built-in CPU path is used without it.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # Once per machine.
    ("matplotlib.font_manager", "Matplotlib is building the font cache"),
)
#: (message regex, category) of warnings ignored.
QUIET_WARNINGS = (
    # peft reads `model.is_gradient_checkpointing`, which newer transformers renamed.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)


class _DropByMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_what_users_cannot_act_on() -> None:
    """Install the filters (idempotent). Before bitsandbytes is imported: it logs at import."""
    for name, prefix in QUIET_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropByMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropByMessage(prefix))
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
