"""Jobs and events as JSON for the Celery backend: nothing crosses the network as pickle.

A :class:`JobRequest` travels in the Celery task message, which is JSON; JSON has no bytes, so
the images go as base64. Events travel back in a Redis stream per job, one entry per event:
its type name, its other fields as JSON, and each bytes field (a PNG) as a raw field of its
own (stream fields are binary-safe, so results skip base64's third more bytes). Both sides
treat what they read as untrusted: a malformed entry raises :class:`WireError`, never
anything that would run code.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from typing import Any

from core.jobs.events import (
    Done,
    Event,
    Failed,
    JobCancelled,
    JobRequest,
    Preview,
    ProgressUpdate,
    Started,
)
from core.settings import Settings

EVENT_TYPES: dict[str, type] = {
    cls.__name__: cls for cls in (Started, ProgressUpdate, Preview, Done, Failed, JobCancelled)
}
"""What a worker may send (Queued belongs to the runner alone)."""
_BYTES_PREFIX = "b:"


class WireError(ValueError):
    """A message that is not a well-formed Pastiche request or event."""


def request_to_json(request: JobRequest) -> dict[str, Any]:
    """The task's argument: plain JSON types only."""
    return {
        "content": _b64(request.content),
        "styles": [[_b64(data), weight] for data, weight in request.styles],
        "settings": request.settings.to_dict(),
        "label": request.label,
        "animation_format": request.animation_format,
    }


def request_from_json(data: Any) -> JobRequest:
    """Rebuild a request; raises WireError (malformed) or SettingsError (bad values)."""
    if not isinstance(data, dict) or set(data) - {"animation_format"} != {
        "content", "styles", "settings", "label",
    }:  # fmt: skip
        raise WireError("not a Pastiche job request")
    clip_format = data.get("animation_format")
    if clip_format is not None and not isinstance(clip_format, str):
        raise WireError("malformed animation format")
    styles = data["styles"]
    if not isinstance(styles, list) or not all(
        isinstance(s, list) and len(s) == 2 and isinstance(s[1], (int, float)) for s in styles
    ):
        raise WireError("malformed style list")
    if not isinstance(data["label"], str):
        raise WireError("malformed label")
    settings = Settings.from_dict(data["settings"])
    return JobRequest(
        _unb64(data["content"]),
        tuple((_unb64(image), float(weight)) for image, weight in styles),
        settings,
        data["label"],
        animation_format=clip_format,
    )


def event_to_fields(event: Event, detail: str | None = None) -> dict[str, bytes | str]:
    """One stream entry; ``detail`` (a traceback for the operator's log) rides along."""
    name = type(event).__name__
    if name not in EVENT_TYPES:
        raise WireError(f"{name} does not travel over the wire")
    plain: dict[str, Any] = {}
    fields: dict[str, bytes | str] = {"type": name}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if f.name == "job_id":
            continue
        if isinstance(value, bytes):
            fields[_BYTES_PREFIX + f.name] = value
        else:
            plain[f.name] = value
    fields["json"] = json.dumps(plain, default=_jsonable)
    if detail:
        fields["detail"] = detail
    return fields


def event_from_fields(fields: dict[bytes, bytes], job_id: str) -> tuple[Event, str | None]:
    """The event of a stream entry, for ``job_id`` whatever the entry claims; and its detail."""
    try:
        name = fields[b"type"].decode()
        cls = EVENT_TYPES[name]
        values = json.loads(fields[b"json"])
        if not isinstance(values, dict):
            raise WireError("event fields are not an object")
        for key, raw in fields.items():
            key_text = key.decode()
            if key_text.startswith(_BYTES_PREFIX):
                values[key_text[len(_BYTES_PREFIX) :]] = bytes(raw)
        names = {f.name for f in dataclasses.fields(cls)} - {"job_id"}
        if set(values) != names:
            raise WireError(f"{name} has fields {sorted(values)}, expected {sorted(names)}")
        event = cls(job_id=job_id, **values)
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        raise WireError(f"malformed event: {exc!r}") from None
    detail = fields.get(b"detail")
    return event, detail.decode(errors="replace") if detail else None


def _jsonable(value: Any) -> Any:
    """Metadata may hold tuples (lists in JSON) or objects a worker only meant to display."""
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    return str(value)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise WireError("image data must be base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WireError("image data is not valid base64") from None


__all__ = [
    "EVENT_TYPES",
    "WireError",
    "event_from_fields",
    "event_to_fields",
    "request_from_json",
    "request_to_json",
]
