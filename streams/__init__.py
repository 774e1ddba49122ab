"""LightMem Streams: LightMem's three memory stages as plain functions, wired in-process
(the embedded runner) or over Apache Kafka (the Faust app)."""

from streams.settings import PIPELINE_VERSION, Settings

__version__ = "0.1.0"
__all__ = ["PIPELINE_VERSION", "Settings", "__version__"]
