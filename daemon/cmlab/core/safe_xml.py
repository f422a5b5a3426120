"""Parsing XML that arrives from outside (manifests, state messages): size-capped, no DTDs, no
entities (defusedxml), and every failure — including an unknown encoding in the declaration —
raised as the caller's own project error."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import defusedxml.ElementTree as DET
from defusedxml import DefusedXmlException

from cmlab.core.errors import CmlabError

MAX_XML_BYTES = 16 * 1024 * 1024


def parse_xml(
    data: bytes,
    *,
    what: str,
    root: str,
    error: type[CmlabError],
    max_bytes: int = MAX_XML_BYTES,
) -> ET.Element:
    if len(data) > max_bytes:
        raise error(f"{what} is {len(data)} bytes; the limit is {max_bytes}")
    try:
        element = DET.fromstring(data, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise error(f"{what} refused: {type(exc).__name__} ({exc})") from exc
    except (ET.ParseError, LookupError, ValueError) as exc:  # LookupError: unknown encoding
        raise error(f"{what} is not well-formed XML: {exc}") from exc
    if element.tag != root:
        raise error(f"{what} root is <{element.tag}>, expected <{root}>")
    return element
