"""The engine's lowest layer: errors, devices, the GPU memory manager, jobs, downloads, uploaded images, tiling and
per-visitor limits. It imports nothing else of the studio."""
