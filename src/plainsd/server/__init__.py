"""The HTTP server: AUTOMATIC1111's API (/sdapi/v1/...) with a job queue, and a web page at /.

Needs the `serve` extra (FastAPI, uvicorn): pip install 'plainsd[serve]'.
"""

from .api import Limits
from .app import create_app

__all__ = ["create_app", "Limits"]
