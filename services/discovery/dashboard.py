"""Provider dashboard pages served by the discovery service (being built: issue 8)."""

from fastapi import APIRouter

router = APIRouter()
