"""Models: presets, model families, loading (diffusers folders, Hub repos, single-file checkpoints), the stages that
run them on the memory manager's leases, LoRA add-ons, upscalers and face restoration."""
