"""Jinja2 for the HTML pages (the report, task previews): one environment with
autoescape, the number formats people read, and images inlined as data URIs.

Templates live in ``auditing/templates/``. Every value a template prints is escaped
unless it is marked safe here (data URIs and captions written by this package).
Pure: rendering reads no file but the templates.
"""
from __future__ import annotations

import base64
import functools
import io
from typing import Any

import jinja2
from markupsafe import Markup

THUMBNAIL_SIDE = 224
EN_DASH = Markup("&ndash;")


def pct(value: float | None, digits: int = 2) -> str | Markup:
    """A fraction as a percentage (``0.9002`` -> ``90.02%``); a dash for None."""
    return EN_DASH if value is None else f"{100 * value:.{digits}f}%"


def fixed(value: float | None, digits: int = 3) -> str | Markup:
    return EN_DASH if value is None else f"{value:.{digits}f}"


def count(value: Any) -> str:
    """Integers with thousands separators; other numbers to 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("auditing", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=pct, fixed=fixed, count=count)
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def thumbnail_uri(data: bytes, side: int = THUMBNAIL_SIDE) -> Markup | None:
    """An encoded image as a JPEG thumbnail data URI; None if it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except (UnidentifiedImageError, OSError):
        return None
    return Markup("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
