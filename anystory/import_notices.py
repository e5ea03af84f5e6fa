"""Notices that importing diffusers prints when the optional quantization packages are installed.

torchao registers its enums with torch's pytree (torch logs a deprecation for each) and diffusers cannot import
torchao's serialised tensor types of another version; bitsandbytes, on a CPU with AVX-512 BF16, looks for an
optional CPU 4-bit kernel package. None concerns anything AnyStory does (we quantize in memory, never load
torchao-serialised checkpoints, and use bitsandbytes on CUDA only) and no user can act on them, yet every command
printed them. Only records with these exact texts are dropped; every other message of those loggers still shows.
"""
from __future__ import annotations

import logging

NOTICES = {
    "torch.utils._pytree": "is an Enum subclass and is now natively supported by torch.compile",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


def drop_import_notices() -> None:
    """Install the filters (idempotent); call before diffusers is imported."""
    for name, text in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(text))
