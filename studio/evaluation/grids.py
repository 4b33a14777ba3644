"""A labelled image grid, as A1111's X/Y/Z plot draws one: the X values as column headers above, the Y values as row
headers on the left, and (here) the prompt underneath, so that the one PNG says what it compares."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

BACKGROUND, INK, FAINT = (255, 255, 255), (20, 20, 20), (90, 90, 90)
MIN_CELL = 128  # small images (the embedded model's 64 px) are enlarged, pixels kept sharp, so labels fit


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font: the same everywhere, no system font


def wrapped(text: str, face: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """`text` in lines no wider than `width` pixels, broken between words (a word longer than a line keeps its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and face.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def draw_grid(images: Sequence[Sequence[Image.Image | None]], column_labels: Sequence[str],
              row_labels: Sequence[str], caption: str = "") -> Image.Image:
    """`images[row][column]` (None: a cell that was not made, drawn empty) under their headers, `caption` below."""
    rows, columns = len(images), max(len(row) for row in images)
    cell_width = max([MIN_CELL, *(image.width for row in images for image in row if image)])
    cell_height = max([MIN_CELL, *(image.height for row in images for image in row if image)])
    size = max(14, min(28, cell_width // 12))
    face, gap = font(size), max(4, size // 3)
    line_height = size + gap // 2

    column_lines = [wrapped(label, face, cell_width - gap) for label in column_labels]
    header = (max((len(lines) for lines in column_lines), default=0) * line_height + gap) if any(column_labels) else 0
    row_width = 0
    if any(row_labels):
        row_width = min(max(face.getlength(label) for label in row_labels) + 2 * gap, max(cell_width, 160))
    row_lines = [wrapped(label, face, row_width - 2 * gap + 1) for label in row_labels] if row_width else []
    caption_lines = wrapped(caption, font(max(12, size - 4)), row_width + columns * cell_width - 2 * gap) \
        if caption else []
    footer = len(caption_lines) * line_height + 2 * gap if caption else 0

    width, height = int(row_width + columns * cell_width), int(header + rows * cell_height + footer)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for column, lines in enumerate(column_lines):
        for number, line in enumerate(lines):
            centre = row_width + column * cell_width + cell_width / 2
            draw.text((centre, gap / 2 + number * line_height), line, fill=INK, font=face, anchor="ma")
    for row, lines in enumerate(row_lines):
        middle = header + row * cell_height + cell_height / 2 - len(lines) * line_height / 2
        for number, line in enumerate(lines):
            draw.text((row_width - gap, middle + number * line_height), line, fill=INK, font=face, anchor="ra")
    for row, cells in enumerate(images):
        for column, image in enumerate(cells):
            if image is None:
                continue
            fitted = enlarged(image.convert("RGB"), cell_width, cell_height)
            left = int(row_width + column * cell_width + (cell_width - fitted.width) / 2)
            top = int(header + row * cell_height + (cell_height - fitted.height) / 2)
            canvas.paste(fitted, (left, top))
    small = font(max(12, size - 4))
    for number, line in enumerate(caption_lines):
        draw.text((gap, header + rows * cell_height + gap + number * line_height), line, fill=FAINT, font=small)
    return canvas


def enlarged(image: Image.Image, width: int, height: int) -> Image.Image:
    """A small image enlarged by a whole factor (nearest: its pixels stay crisp) to fill its cell; others as they are."""
    factor = max(1, min(width // image.width, height // image.height))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
