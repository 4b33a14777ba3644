"""The bridge between the Inpaint tab's ImageEditor and the server, which never reads the editor itself.

gradio 6.31 re-reads every component that an event with a status has touched at each status update of any later
event, and reading an ImageEditor makes the browser export and upload its image and every layer; and an update to
the editor makes it report an "upload" again. So the editor is never an input or output of a server event: the page
copies its value (the files it uploaded) into a hidden field when a handler needs it (editor_files, editor_images
read it back), applies the server's updates to it (APPLY_EDITOR_UPDATE_JS), and measures an uploaded image itself
(UPLOAD_SIZE_JS, parse_measured_size). See docs/inpaint.md, "The editor".
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr
from gradio import processing_utils, utils
from gradio.components.image_editor import EditorData
from gradio.data_classes import FileData
from PIL import Image

from components.running import user_error
from studio.core.errors import InvalidRequest, StudioError
from studio.core.images import check_pixels

# The Inpaint editor is built with one layer (layers=False): a value with more than a few did not come from it,
# and every layer would be decoded
MAX_LAYERS = 4

# Installed on page load: remembers the size of the next image put into the editor (a file chosen or dropped),
# measured in the browser; the editor's "upload" event then takes it once. (gradio's Paste button fires no upload
# event, so a pasted image keeps the tools as they were.)
UPLOAD_SIZE_JS = """
() => {
  if (window.studioInpaintUploads) return;
  const editor = () => document.querySelector("#inpaint-editor");
  const uploads = window.studioInpaintUploads = {count: 0, pending: null};
  const measure = (blob) => {
    if (!blob || !blob.type.startsWith("image/")) return;
    const number = ++uploads.count;
    uploads.pending = createImageBitmap(blob)
      .then((bitmap) => `${bitmap.width}x${bitmap.height}#${number}`, () => null);
  };
  document.addEventListener("change", (event) => {
    if (event.target.type === "file" && editor()?.contains(event.target)) measure(event.target.files?.[0]);
  }, true);
  document.addEventListener("drop", (event) => {
    if (editor()?.contains(event.target)) measure(event.dataTransfer?.files?.[0]);
  }, true);
}
"""
TAKE_MEASURED_UPLOAD_JS = """
async () => {
  const uploads = window.studioInpaintUploads;
  const pending = uploads?.pending;
  if (!pending) return document.querySelector("#inpaint-upload-size textarea")?.value ?? "";
  uploads.pending = null;
  return (await pending) ?? "";
}
"""


# Applies a to_editor update ({"value"?, "brush"}) to the editor; file URLs are made relative to the page, so
# they work under a proxy's path prefix too.
APPLY_EDITOR_UPDATE_JS = """
(update) => {
  if (!update) return undefined;
  const encoded = (path) => path.split("/").map(encodeURIComponent).join("/");  // a file name may hold # or ?
  const withUrl = (file) => file && {...file, url: new URL(`gradio_api/file=${encoded(file.path)}`,
                                                           document.baseURI).href};
  const value = update.value === undefined ? {} : {value: update.value && {
    background: withUrl(update.value.background), layers: [], composite: withUrl(update.value.composite)}};
  return {__type__: "update", ...value, brush: update.brush};
}
"""

# Picks an editor's Brush tool, so that the first drag draws, as in A1111: gradio's editor opens on its Image tool,
# where a drag selects the page's text instead. The tool bar may be re-rendered just then, hence the retries
# (for 3 s: a slow first render).
PICK_BRUSH_JS = """
const pickBrush = (elemId) => {
  let tries = 0;
  const pick = () => {
    const brush = document.querySelector(`#${elemId} button[aria-label="Brush"]`);
    if (brush && !brush.className.includes("highlight")) brush.click();
    else if (!brush && ++tries < 60) setTimeout(pick, 50);
  };
  setTimeout(pick, 50);
};
"""


def pick_brush_js(elem_id: str) -> str:
    """JS for an event: the editor `elem_id`'s Brush picked (a drawing canvas opened)."""
    return f"() => {{ {PICK_BRUSH_JS} pickBrush({elem_id!r}); }}"


def select_brush_js(elem_id: str, blank_paper_mode: str) -> str:
    """JS for the Inpaint editor's events: the Brush picked once there is something to draw on, an image (an
    upload: called with (mode); one the server put there: (mode, update) with `update.value`) or, in
    `blank_paper_mode` (Sketch to image), the blank canvas, which is the paper."""
    return (f"(mode, update) => {{ {PICK_BRUSH_JS} const hasImage = update === undefined || Boolean(update?.value);"
            f" if (mode === {blank_paper_mode!r} || hasImage) pickBrush({elem_id!r}); }}")


def brush_props(chosen: gr.Brush) -> dict:
    """A brush as the editor's `brush` property in the page."""
    return {"default_size": chosen.default_size, "colors": chosen.colors, "default_color": chosen.default_color,
            "color_mode": chosen.color_mode}


def file_for_page(component: gr.components.Component, image) -> dict:
    """An image (a path or a PIL image) as a file the page may load: copied into gradio's cache for
    `component`, as gradio does for a component's outputs."""
    if isinstance(image, Image.Image):
        cached = processing_utils.save_pil_to_cache(image, component.GRADIO_CACHE, format="png")
    else:
        cached = component.move_resource_to_block_cache(image)
    return FileData(path=cached, orig_name=Path(cached).name).model_dump()


def editor_files(sent, max_pixels: int, component: gr.ImageEditor | None = None) -> EditorData | None:
    """The editor's value as the page sent it into from_editor (files it uploaded), checked: only files uploaded
    to this server, whose headers show images within `max_pixels`. None for an empty editor. A value the page
    sent as an id (its images streamed to `component` beforehand: see blob_files) comes back as files too."""
    if not sent:
        return None
    try:
        data = EditorData.model_validate(sent)
    except ValueError:
        raise user_error(InvalidRequest(["The editor's image did not arrive whole: try again."]),
                         "Cannot read the editor") from None
    if data.id is not None:
        data = blob_files(component, data.id, max_pixels)
    if len(data.layers) > MAX_LAYERS:  # each would be decoded: the page's editor sends one
        raise user_error(InvalidRequest([f"The editor sends at most {MAX_LAYERS} layers (got {len(data.layers)})."]),
                         "Cannot read the editor")
    upload_folder = utils.abspath(utils.get_upload_folder())
    for file in (data.background, data.composite, *data.layers):
        if file is not None and not utils.is_in_or_equal(utils.abspath(file.path), upload_folder):
            raise user_error(InvalidRequest(["The editor's image must be uploaded through the page."]),
                             "Cannot read the editor")
        if file is not None:
            check_image_header(file.path, max_pixels)
    return data


# The folders blob_files writes are named by a keyed hash of the page's id: their paths cannot be guessed from
# outside (gradio serves the upload folder), and only the exact id finds them. One key per server process, never
# changed; the folders last an hour.
BLOB_FOLDER_KEY = secrets.token_bytes(32)
BLOB_FOLDER_AGE_S = 3600


def blob_files(component: gr.ImageEditor | None, blob_id: str, max_pixels: int) -> EditorData:
    """The images the page streamed to `component` under `blob_id`, as files in gradio's upload folder.

    Once a stroke is drawn, gradio's editor may stream its images to the server as they change (its accept_blobs)
    and then send only {"id": ...}; gradio's own preprocess takes the images out of the editor's store on the
    first read. A job reads the value twice (its check, then its run) and a mode switch reads it again, so the
    images are written to files at the first read (each checked to be an image within `max_pixels` first) and
    later reads find them there."""
    digest = hmac.new(BLOB_FOLDER_KEY, blob_id.encode(), hashlib.sha256).hexdigest()[:40]
    upload_folder = Path(utils.abspath(utils.get_upload_folder()))
    folder = upload_folder / f"editor-{digest}"
    cached = component.blob_storage.pop(blob_id, None) if component is not None else None
    if cached is not None:
        blobs = [("background", cached.background), ("composite", cached.composite),
                 *((f"layer_{index}", layer) for index, layer in enumerate(cached.layers))]
        blobs = [(name, blob) for name, blob in blobs if blob is not None]
        if len(blobs) > MAX_LAYERS + 2:
            raise user_error(InvalidRequest([f"The editor sends at most {MAX_LAYERS} layers."]),
                             "Cannot read the editor")
        for _, blob in blobs:
            check_image_header(io.BytesIO(blob), max_pixels)
        remove_old_blob_folders(upload_folder)
        # written beside it and moved into place whole: a read of the same id meanwhile finds all or nothing
        partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=upload_folder))
        for name, blob in blobs:
            (partial / f"{name}.png").write_bytes(blob)
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    if not folder.exists():  # nothing streamed (an empty canvas sends an id too), as gradio reads an unknown id
        return EditorData()
    os.utime(folder)  # in use: the hourly clean-up counts from the last read

    def file(name: str) -> FileData | None:
        path = folder / f"{name}.png"
        return FileData(path=str(path), orig_name=path.name) if path.exists() else None

    layers = sorted(folder.glob("layer_*.png"), key=lambda path: int(path.stem.split("_")[1]))
    return EditorData(background=file("background"), composite=file("composite"),
                      layers=[FileData(path=str(path), orig_name=path.name) for path in layers])


def check_image_header(source, max_pixels: int) -> None:
    """That `source` (a path, or a file object of bytes) is an image within `max_pixels`, from its header (nothing
    is decoded), else a toast."""
    try:
        with Image.open(source) as header:
            check_pixels(header.size, "image", max_pixels)
    except (OSError, Image.DecompressionBombError):
        raise user_error(InvalidRequest(["The editor's image could not be read as an image."]),
                         "Cannot read the editor") from None
    except StudioError as error:
        raise user_error(error, "Cannot use this image") from None


def remove_old_blob_folders(upload_folder: Path) -> None:
    """blob_files' folders older than an hour (a job reads its folder within seconds of its first read)."""
    cutoff = time.time() - BLOB_FOLDER_AGE_S
    for folder in upload_folder.glob("editor-*"):
        try:
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # removed meanwhile by another request
            pass


def editor_images(component: gr.ImageEditor, sent, max_pixels: int) -> dict:
    """The editor's value as the page sent it (see editor_files), preprocessed as the editor itself would hand it
    to a handler: {"background", "layers", "composite"} as images."""
    data = editor_files(sent, max_pixels, component)
    return (component.preprocess(data) or {}) if data is not None else {}


def parse_measured_size(measured: str | None) -> tuple[int, int] | None:
    """(width, height) from the page's "WxH#n", None when there is none."""
    match = re.fullmatch(r"([1-9]\d{0,5})x([1-9]\d{0,5})#\d+", measured or "")
    return (int(match[1]), int(match[2])) if match else None


def image_size(image) -> tuple[int, int]:
    """The size of an image given as a PIL image or a file path (only the header is read)."""
    if isinstance(image, Image.Image):
        return image.size
    with Image.open(image) as opened:
        return opened.size
