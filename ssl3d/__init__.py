"""ssl3d: self-supervised pre-training of the Swin UNETR encoder on 3D CT, built to scale memory."""

__version__ = "0.1.0"
