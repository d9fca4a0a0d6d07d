"""ST-LINK traffic forecasting: a spatially-aware LLM run as a reproducible MLOps pipeline."""
__version__ = "0.1.0"
