"""Measuring models: CLIP score and FID, the Compare tab's X/Y/Z grids, and `python -m studio.evaluation`."""
