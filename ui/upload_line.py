"""One uploaded file's outcome: the record ui.uploads makes and ui.render shows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UploadLine:
    """What happened to one uploaded file, in words for the page and the API."""

    name: str
    status: str  # "added" | "unchanged" | "error"
    message: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"file": self.name, "status": self.status, "message": self.message}
