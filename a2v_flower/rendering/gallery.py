"""What people look at: PNG grids of labelled image rows, and HTML galleries of them."""

from __future__ import annotations

import html
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def save_grid(rows: list[tuple[str, list[Image.Image]]], path: str | Path,
              column_titles: list[str] | None = None, min_cell: int = 128) -> Path:
    """Write a PNG grid: one labelled row per (label, images), optional titles above the columns; images
    smaller than `min_cell` pixels (tiny pipelines make 64 px) are upscaled by a whole factor, pixels kept sharp."""
    w, h = rows[0][1][0].size
    scale = max(1, math.ceil(min_cell / min(w, h)))
    cell_w, cell_h = w * scale, h * scale
    font = ImageFont.load_default(size=14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 12 + int(max(probe.textlength(label, font=font) for label, _ in rows))
    title_h = 22 if column_titles else 0
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_w + cols * cell_w, title_h + len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(column_titles or []):
        draw.text((label_w + c * cell_w + 4, 3), title, fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        top = title_h + r * cell_h
        draw.text((6, top + cell_h // 2 - 8), label, fill="black", font=font)
        for c, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cell_w, cell_h), Image.NEAREST), (label_w + c * cell_w, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def write_gallery(folder: str | Path, header: list[str], rows: list[list[str | Path]], title: str = "a2v gallery",
                  links: dict[str, str] | None = None) -> Path:
    """Write folder/index.html: `title`, `links` (label -> href, e.g. the previous and next round), and a table
    with `header` and one row per list of cells; a Path cell is an image (relative to `folder`), others text."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def cell(value) -> str:
        if not isinstance(value, Path):
            return f"<td>{html.escape(str(value))}</td>"
        src = html.escape((value.relative_to(folder) if value.is_absolute() else value).as_posix())
        return f'<td><a href="{src}"><img src="{src}" alt="{src}"></a></td>'

    nav = " | ".join(f'<a href="{html.escape(href)}">{html.escape(label)}</a>' for label, href in (links or {}).items())
    page = ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif}} td{{padding:4px;"
            "vertical-align:middle} img{width:160px;image-rendering:pixelated}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p>{nav}</p>\n<table>\n<tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>\n"
            + "\n".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
            + "\n</table>\n</body></html>\n")
    (folder / "index.html").write_text(page, encoding="utf-8")
    return folder / "index.html"

