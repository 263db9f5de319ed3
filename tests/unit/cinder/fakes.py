"""A Glance image service that keeps images in memory.

It stands in for the Glance API (a process boundary) in driver tests:
``download`` writes the stored bytes, ``update`` stores the uploaded
bytes, ``show`` returns the metadata with ``disk_format``.
"""

from __future__ import annotations

import uuid
from typing import Any

from cinder import exception

__all__ = ["ImageService"]


class ImageService:
    def __init__(self) -> None:
        self.images: dict[str, dict[str, Any]] = {}
        self.data: dict[str, bytes] = {}
        self.temp_images = None  # as GlanceImageService; Cinder sets it

    def add(self, data: bytes, disk_format: str, **meta: Any) -> str:
        image_id = str(uuid.uuid4())
        self.images[image_id] = {
            "id": image_id, "disk_format": disk_format,
            "container_format": "bare", "size": len(data),
            "status": "active", "properties": {}, **meta}
        self.data[image_id] = data
        return image_id

    def add_file(self, path: str, disk_format: str, **meta: Any) -> str:
        with open(path, "rb") as f:
            return self.add(f.read(), disk_format, **meta)

    def show(self, context: Any, image_id: str) -> dict[str, Any]:
        try:
            return dict(self.images[image_id])
        except KeyError:
            raise exception.ImageNotFound(image_id=image_id) from None

    def get_location(self, context: Any, image_id: str) -> tuple:
        meta = self.show(context, image_id)
        return meta.get("direct_url"), meta.get("locations", [])

    def download(self, context: Any, image_id: str, data: Any) -> None:
        self.show(context, image_id)
        data.write(self.data[image_id])

    def update(self, context: Any, image_id: str, metadata: dict,
               data: Any = None, purge_props: bool = False,
               store_id: str | None = None,
               base_image_ref: str | None = None) -> dict[str, Any]:
        self.show(context, image_id)
        self.images[image_id].update(metadata)
        if data is not None:
            self.data[image_id] = data.read()
        return self.images[image_id]
