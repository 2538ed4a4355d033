"""ssl3d: self-supervised pre-training of the Swin UNETR encoder on 3D CT, built to scale memory."""

from __future__ import annotations

import logging
import warnings

__version__ = "0.1.0"

# MONAI's LoadImage builds every reader it knows, the GPU DICOM one (NvImgCodecPydicomReader) included, even when
# asked for NibabelReader; without nvImageCodec that reader logs a warning and warns again, on every command that
# reads a volume. ssl3d reads NIfTI with nibabel and DICOM with pydicom's own decoders: neither line is the user's
# business. Installed here, on import of any ssl3d module, so every command and loader worker is covered; only
# these two messages are dropped, the same logger's other records still show.
_NVIMGCODEC_LOGGER = "monai.data.nvimgcodec_pydicom_plugin"
_NVIMGCODEC_MISSING = "nvImageCodec is not available; skipping pydicom decoder plugin registration"


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with ``prefix``; a named class so a repeated import adds no twin."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _quiet_monai_nvimgcodec() -> None:
    """Silence MONAI's "nvImageCodec is not available" log line and its UserWarning twin, nothing else."""
    logger = logging.getLogger(_NVIMGCODEC_LOGGER)  # no MONAI import: the logger object exists before its module
    if not any(isinstance(f, _DropMessage) and f.prefix == _NVIMGCODEC_MISSING for f in logger.filters):
        logger.addFilter(_DropMessage(_NVIMGCODEC_MISSING))
    warnings.filterwarnings(
        "ignore",
        message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register successfully",
        category=UserWarning,
        module="monai.data.image_reader",
    )


_quiet_monai_nvimgcodec()
