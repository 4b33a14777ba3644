"""Event options the tabs share, and why they are needed."""

# gradio 6.31 keeps, for the whole page, every component an event has shown progress on (the event's outputs,
# unless show_progress_on names others). At each progress message of any job afterwards (several a second) it
# updates each of them and re-reads it and all its children: using a tab's small events made every later image
# dearer for the page (bench/inpaint_editor_page.py). An event that shows no progress names no component. (gr.Examples'
# own event, loading an example into the prompt and the preset, is gradio's: those two stay in the map.)
NO_PROGRESS = dict(show_progress="hidden", show_progress_on=[])

# An event that only changes the page (no GPU, no wait): not queued, no progress, not in the API.
INSTANT = dict(api_visibility="private", queue=False, **NO_PROGRESS)

# Queued, so that gradio shows its error as a toast (it shows none for unqueued events), but outside the GPU's
# concurrency group: it answers at once even while jobs run. No progress, not in the API.
QUICK = dict(api_visibility="private", concurrency_limit=None, **NO_PROGRESS)
