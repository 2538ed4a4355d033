"""Downstream use of the pre-trained encoder: fine-tuning MONAI's SwinUNETR and probing the frozen encoder."""
