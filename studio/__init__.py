"""Diffusion Studio's engine: presets, the GPU memory manager, pipelines and metadata. No gradio here."""

__version__ = "0.1.0"
